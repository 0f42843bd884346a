"""Random access to LLaVA-format instruction data (a JSON list plus an image folder).

    [{"id": "000000033471",
      "image": "coco/train2017/000000033471.jpg",          # relative to image_folder
      "conversations": [{"from": "human", "value": "<image>\\nWhat is in the image?"},
                        {"from": "gpt", "value": "A bus."},
                        {"from": "human", "value": "What colour is it?"},
                        {"from": "gpt", "value": "White and red."}]}, ...]

A record holds the (question, answer) turns in order, with LLaVA's "<image>" marker removed
(CogVLM puts the image span before the prompt itself; the marker is not text to train on).
"human"/"user" and "gpt"/"assistant" are accepted as roles. A .jsonl file (one object per
line) works too.

Checked when the source is built: a conversation must be non-empty and alternate
human, gpt, human, gpt, ...; one that does not is dropped and counted
(`stats["malformed"]`), since no sensible training example can be made from it. Entries
without an "image" are text-only: `image=None, image_bytes=None, error=None`.

Checked when a record is read: a missing or unreadable image file gives the record with
`image_bytes=None` and an `error` string; the pipeline masks the image and counts it.
(Image files are not stat'ed up front: that would be hundreds of thousands of calls on a
network disk before the first step.)

The parsed entries are kept as one compact JSON bytes buffer plus offsets, so that pickling
the source to worker processes copies two buffers, not a million small Python objects.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

from cogvlm_jax import fileio

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


def strip_image_marker(text: str) -> str:
  """Removes LLaVA's "<image>" marker and the newline that joins it to the text."""
  if IMAGE_MARKER not in text:
    return text
  text = text.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "")
  return text.replace(IMAGE_MARKER, "").strip()


def parse_conversation(conversations) -> tuple[list[tuple[str, str]], Optional[str]]:
  """LLaVA "conversations" -> ([(question, answer), ...], None) or ([], why it is malformed)."""
  if not isinstance(conversations, list) or not conversations:
    return [], "no conversation"
  if len(conversations) % 2:
    return [], f"{len(conversations)} messages: not question/answer pairs"
  turns = []
  for i in range(0, len(conversations), 2):
    q, a = conversations[i], conversations[i + 1]
    if not (isinstance(q, dict) and isinstance(a, dict)):
      return [], f"message {i} is not an object"
    if q.get("from") not in _HUMAN or a.get("from") not in _GPT:
      return [], (f"messages {i}, {i + 1} are from {q.get('from')!r}, {a.get('from')!r}; "
                  f"expected human then gpt")
    if not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
      return [], f"message {i} or {i + 1} has no text value"
    turns.append((strip_image_marker(q["value"]), strip_image_marker(a["value"])))
  return turns, None


def _load_entries(path: str) -> list:
  """The entries of a .json list or a .jsonl file; a parse error names the file and line."""
  data = fileio.read_bytes(path)
  if path.endswith(".jsonl"):
    return fileio.parse_jsonl(path, data)
  entries = fileio.parse_json(path, data)
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
  return entries


def read_packed(buffer: bytes, offsets: np.ndarray, index: int) -> dict:
  """JSON record `index` (negative counts from the end) of records packed back to back in
  `buffer`, record i at bytes offsets[i]:offsets[i + 1] (the module docstring says why
  packed); IndexError outside them. Shared by LlavaSource and the GUI source."""
  count = len(offsets) - 1
  index = int(index)
  if not -count <= index < count:
    raise IndexError(f"index {index} out of range for {count} records")
  index %= count
  return json.loads(buffer[offsets[index]:offsets[index + 1]])


class LlavaSource:
  """Grain random-access source over LLaVA instruction JSON; one record per conversation.

  Args:
    json_path: the LLaVA .json (a list) or .jsonl file.
    image_folder: the folder the entries' "image" paths are relative to (may be gs://).

  A record: source (the json path), key (the entry id, or its position), image (relative
  path or None), image_bytes (bytes | None), turns [(question, answer), ...], error
  (None | str).
  """

  def __init__(self, json_path: str, image_folder: str):
    self.json_path = os.fspath(json_path)
    self.image_folder = os.fspath(image_folder)
    entries = _load_entries(self.json_path)
    kept, malformed, text_only = [], 0, 0
    for position, entry in enumerate(entries):
      if not isinstance(entry, dict):
        malformed += 1
        continue
      turns, why = parse_conversation(entry.get("conversations"))
      key = str(entry.get("id", position))
      if why:
        malformed += 1
        if malformed <= 5:
          log.warning("%s: entry %s dropped: %s", self.json_path, key, why)
        continue
      image = entry.get("image")
      if image is not None and not isinstance(image, str):
        malformed += 1  # e.g. a list of images: CogVLM takes one per conversation
        continue
      text_only += image is None
      kept.append(json.dumps({"key": key, "image": image, "turns": turns},
                             ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if malformed > 5:
      log.warning("%s: %d malformed entries dropped in all", self.json_path, malformed)
    sizes = np.fromiter((len(b) for b in kept), dtype=np.int64, count=len(kept))
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._buffer = b"".join(kept)
    self.stats = {"entries": len(entries), "records": len(kept), "malformed": malformed,
                  "text_only": text_only}

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict:
    entry = read_packed(self._buffer, self._offsets, index)
    record = {"source": self.json_path, "key": entry["key"], "image": entry["image"],
              "image_bytes": None, "turns": [tuple(t) for t in entry["turns"]],
              "error": None}
    if entry["image"] is not None:
      path = fileio.join(self.image_folder, entry["image"])
      try:
        record["image_bytes"] = fileio.read_bytes(path)
      except FileNotFoundError:
        record["error"] = f"image file not found: {path}"
      except OSError as e:
        record["error"] = f"cannot read image file {path}: {e}"
    return record

  def __repr__(self) -> str:
    return (f"LlavaSource(json_path={self.json_path!r}, image_folder={self.image_folder!r}, "
            f"records={len(self)})")


def turns_to_prompt_parts(turns: Sequence[tuple[str, str]]):
  """(history, query, answer) for the last turn: the split `build_conversation_input_ids`
  takes (history = the earlier turns)."""
  if not turns:
    raise ValueError("a conversation needs at least one (question, answer) turn")
  *history, (query, answer) = turns
  return list(history), query, answer
