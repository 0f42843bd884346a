"""Random access to GUI screenshots with element boxes: LLaVA-style JSON plus an image folder.

The GUI / grounding data of CogAgent's recipe (arXiv 2312.08914 trains on screenshots with
the boxes of their elements). One entry per screenshot:

    [{"id": "login-0",
      "image": "shots/login-0.png",                    # relative to the image folder
      "elements": [{"text": "Sign in", "box": [412, 300, 520, 332]},   # pixel corners
                   {"text": "Password", "box": [300, 240, 620, 270]}],
      "conversations": [                                # optional (LLaVA's format)
          {"from": "human", "value": "<image>\\nHow do I log in?"},
          {"from": "gpt", "value": "Type the password, then click Sign in <box:0>."}]},
     ...]

Boxes are [x0, y0, x1, y1] in the screenshot's own pixels (SeeClick / Mind2Web style corners,
not COCO's [x, y, w, h]); the image size is read from the image file's header when the record
is read. In conversation text, `<box:N>` stands for element N's box and becomes CogVLM's box
text `[[x0,y0,x1,y1]]` (000..999, `cogvlm_jax.boxes.format_box`). Entries without
"conversations" get one turn per element, by `task`:

    grounding  `GROUNDING_QUERY` with the element's text -> its box (referring expressions)
    ocr        `OCR_QUERY` with the element's box -> its text (grounded OCR)
    both       the grounding turn, then the ocr turn, for each element

A record is a LLaVA-style conversation ("turns"), so `ExampleBuilder` renders it with its chat
template and trains on every answer. Checked when the source is built (the entry is dropped and
counted in `stats["malformed"]`): a malformed conversation, an element without text or with a
box that is not four numbers, a `<box:N>` naming no element. Checked when a record is read: an
unreadable image gives `error` (a counted bad sample, as LlavaSource); a box with no area inside
the image gives `box_text=None` and `error` (counted as box_invalid); a box partly outside is
clipped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from cogvlm_jax import fileio
from cogvlm_jax.boxes import format_box
from cogvlm_jax.data.sources.llava import _load_entries, parse_conversation, read_packed

log = logging.getLogger(__name__)

TASKS = ("grounding", "ocr", "both")
# The questions of generated turns; the `gui` eval task asks GROUNDING_QUERY too.
GROUNDING_QUERY = 'Where is "{text}"? Answer in [[x0,y0,x1,y1]] format.'
OCR_QUERY = "What is the text in {box}?"
_BOX_REF = re.compile(r"<box:(\d+)>")


def parse_elements(elements) -> tuple[list[tuple[str, list[float]]], Optional[str]]:
  """An entry's "elements" -> ([(text, [x0, y0, x1, y1] pixels), ...], None) or ([], why)."""
  if elements is None:
    return [], None
  if not isinstance(elements, list):
    return [], "elements is not a list"
  out = []
  for i, e in enumerate(elements):
    if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not e["text"].strip():
      return [], f"element {i} has no text"
    box = e.get("box")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
      return [], f"element {i} box {box!r} is not [x0, y0, x1, y1]"
    out.append((e["text"].strip(), [float(v) for v in box]))
  return out, None


def element_turns(elements: Sequence[tuple[str, Sequence[float]]], task: str
                  ) -> list[tuple[str, str]]:
  """The generated (question, answer) turns of an entry without conversations; answers and
  questions name boxes as `<box:N>`."""
  turns = []
  for i, (text, _) in enumerate(elements):
    if task in ("grounding", "both"):
      turns.append((GROUNDING_QUERY.format(text=text), f"<box:{i}>"))
    if task in ("ocr", "both"):
      turns.append((OCR_QUERY.format(box=f"<box:{i}>"), text))
  return turns


def relative_box(box: Sequence[float], width: int, height: int) -> tuple[float, ...]:
  """Pixel corners -> relative (x0, y0, x1, y1) clipped to the image; ValueError when no area
  is left inside it."""
  x0, x1 = sorted((float(box[0]), float(box[2])))
  y0, y1 = sorted((float(box[1]), float(box[3])))
  x0, y0 = max(x0, 0.0), max(y0, 0.0)
  x1, y1 = min(x1, float(width)), min(y1, float(height))
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f"box {list(box)} has no area inside the {width}x{height} screenshot")
  return (x0 / width, y0 / height, x1 / width, y1 / height)


def fill_boxes(turns, elements, width: int, height: int) -> list[tuple[str, str]]:
  """`<box:N>` -> element N's CogVLM box text in every question and answer."""
  texts = {}

  def one(m):
    n = int(m.group(1))
    if n not in texts:
      texts[n] = format_box(relative_box(elements[n][1], width, height))
    return texts[n]

  return [(_BOX_REF.sub(one, q), _BOX_REF.sub(one, a)) for q, a in turns]


def _check_refs(turns, n_elements: int) -> Optional[str]:
  for q, a in turns:
    for m in _BOX_REF.finditer(q + a):
      if int(m.group(1)) >= n_elements:
        return f"<box:{m.group(1)}> but {n_elements} elements"
  return None


class GuiSource:
  """Grain random-access source over GUI screenshot JSON; one record per screenshot.

  Args:
    json_path: the .json list (or .jsonl) of entries (module docstring).
    image_folder: the folder the entries' "image" paths are relative to (may be gs://).
    task: how entries without conversations become turns: one of TASKS.

  A record: source, key, image (relative path), image_bytes, turns [(question, answer)] with
  box text filled in, error (None | str); box_text None only when a box is unusable.
  """

  def __init__(self, json_path: str, image_folder: str, task: str = "grounding"):
    if task not in TASKS:
      raise ValueError(f"GUI task must be one of {TASKS}, got {task!r}")
    self.json_path, self.image_folder = os.fspath(json_path), os.fspath(image_folder)
    self.task = task
    kept, malformed = [], 0
    for position, entry in enumerate(_load_entries(self.json_path)):
      item, why = self._parse(entry, position)
      if why:
        malformed += 1
        if malformed <= 5:
          log.warning("%s: entry %s dropped: %s", self.json_path, position, why)
        continue
      kept.append(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    sizes = np.fromiter((len(b) for b in kept), dtype=np.int64, count=len(kept))
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._buffer = b"".join(kept)  # compact for pickling to worker processes (as LlavaSource)
    self.stats = {"records": len(kept), "malformed": malformed}

  def _parse(self, entry, position: int) -> tuple[dict, Optional[str]]:
    """A JSON entry -> the stored item (key, image, turns with <box:N>, elements) or why not."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
      return {}, "no screenshot (an entry needs an \"image\" path)"
    elements, why = parse_elements(entry.get("elements"))
    if why:
      return {}, why
    if entry.get("conversations") is not None:
      turns, why = parse_conversation(entry["conversations"])
    else:
      turns, why = element_turns(elements, self.task), None
      why = None if turns else "no conversations and no elements"
    why = why or _check_refs(turns, len(elements))
    return {"key": str(entry.get("id", position)), "image": entry["image"], "turns": turns,
            "elements": elements}, why

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict:
    item = read_packed(self._buffer, self._offsets, index)
    record = {"source": self.json_path, "key": item["key"], "image": item["image"],
              "image_bytes": None, "turns": [tuple(t) for t in item["turns"]], "error": None}
    path = fileio.join(self.image_folder, item["image"])
    try:
      record["image_bytes"] = fileio.read_bytes(path)
    except FileNotFoundError:
      return dict(record, error=f"image file not found: {path}")
    except OSError as e:
      return dict(record, error=f"cannot read image file {path}: {e}")
    try:
      with Image.open(io.BytesIO(record["image_bytes"])) as im:  # the header only
        width, height = im.size
    except Exception:  # noqa: BLE001  decoding the image reports it (a counted corrupt one)
      return record
    try:
      record["turns"] = fill_boxes(record["turns"], item["elements"], width, height)
    except ValueError as e:  # ExampleBuilder counts box_text None as box_invalid
      return dict(record, box_text=None, error=str(e))
    return record

  def __repr__(self) -> str:
    return (f"GuiSource(json_path={self.json_path!r}, image_folder={self.image_folder!r}, "
            f"task={self.task!r}, records={len(self)})")
