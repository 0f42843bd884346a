"""Raw source records -> model-ready examples, with bad samples masked AND counted.

`SampleBuilder` is the Grain map transform for the records of `cogvlm_jax.data.sources`
(WebDatasetSource, LlavaSource, RefCocoSource, or any record of the same shapes). Per task:

    caption     (a record with "caption": LAION shards)  template "base", query "",
                answer = the caption
    grounding   (a record with "box_text": RefCOCO)       template `grounding_template`
                ("base"), query "Where is {sentence}?", answer = "[[x0,y0,x1,y1]]"
    chat        (a record with "turns": LLaVA SFT)        template "chat"; ALL turns rendered,
                loss on every answer (see `render_turns`)

Every example has the same static shapes (right padding to `max_length`):

    input_ids, token_type_ids, attention_mask, loss_mask   int32 [T]
    images                                                 uint8 [S, S, 3]
    image_valid                                            bool []
    bad_sample                                             bool []  (True: a placeholder)
    bad_reason                                             int32 [] (0, or 1 + REASONS index)

A record that cannot become a training example — unreadable / corrupt / truncated image,
decompression bomb, missing caption, box outside the image, too many tokens — becomes a
PLACEHOLDER (BOS only, attention on it alone, loss_mask all zero, black image,
image_valid False) and is counted under its reason in a `BadSampleCounter`. Summing
`bad_sample` over a batch gives the batch's count and `bad_reason_counts(batch)` its counts
per reason — counted where the batch is consumed, so also right with worker processes (whose
counters live in the workers); the counter gives running totals per reason and per source
(the shards) in the process that builds the samples. When more than `max_bad_ratio` of the
samples seen so far (after `min_samples` of them) are bad, the next sample raises
`BadDataError` naming the sources (shards) with most bad samples: a broken dataset stops the
run instead of silently training on placeholders.

Colour modes (CMYK, L, P, RGBA, 16 bit) are handled by `decode_image` (alpha composited on
white); they are NOT bad samples.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data.sources.bad_input import to_rgb
from cogvlm_jax.data.sources.bad_input import decode_image
from cogvlm_jax.batch_layout import LANGUAGE_TOKEN_TYPE, SEQUENCE_KEYS, VISION_TOKEN_TYPE
from cogvlm_jax.tokenization import Tokenizer, build_conversation_input_ids, history_to_prompt

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; more is treated as a decompression bomb

# Reasons a sample is replaced by a placeholder (the counter's keys).
REASONS = ("image_missing", "image_corrupt", "image_too_large", "caption_missing",
           "box_invalid", "too_long", "record_error")


class BadDataError(RuntimeError):
  """Too large a share of the input is bad; the message names the worst sources."""


class BadSampleCounter:
  """Thread-safe running counts of samples seen and of bad ones, per reason and source.

  Counted when a sample is BUILT: with prefetching, slightly ahead of the training step.
  """

  def __init__(self, max_bad_ratio: float = 1.0, min_samples: int = 100):
    if not 0.0 <= max_bad_ratio <= 1.0:
      raise ValueError(f"max_bad_ratio must be in [0, 1], got {max_bad_ratio}")
    self.max_bad_ratio = max_bad_ratio
    self.min_samples = max(1, int(min_samples))
    self._lock = threading.Lock()
    self.total = 0
    self.by_reason: collections.Counter = collections.Counter()
    self.by_source: collections.Counter = collections.Counter()
    self.examples: dict[str, str] = {}  # reason -> the first message seen for it

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def bad(self) -> int:
    return sum(self.by_reason.values())

  def add(self, bad_reason: Optional[str] = None, source: str = "", message: str = "") -> None:
    """Counts one sample (bad when `bad_reason` is given); raises BadDataError over the limit."""
    with self._lock:
      self.total += 1
      if bad_reason is None:
        return
      self.by_reason[bad_reason] += 1
      self.by_source[source] += 1
      self.examples.setdefault(bad_reason, message)
      total, bad = self.total, sum(self.by_reason.values())
      if total >= self.min_samples and bad > self.max_bad_ratio * total:
        worst = ", ".join(f"{s} ({n})" for s, n in self.by_source.most_common(5))
        reasons = ", ".join(f"{r}: {n} (e.g. {self.examples[r]})"
                            for r, n in self.by_reason.most_common())
        raise BadDataError(
            f"{bad} of {total} samples are bad ({bad / total:.1%} > max_bad_ratio="
            f"{self.max_bad_ratio:.1%}). Sources with most bad samples: {worst}. "
            f"Reasons: {reasons}")

  def snapshot(self) -> dict:
    """{"samples", "bad", "bad_ratio", "bad/<reason>": n} for the training logs."""
    with self._lock:
      total, bad = self.total, sum(self.by_reason.values())
      out = {"samples": total, "bad": bad, "bad_ratio": bad / total if total else 0.0}
      out.update({f"bad/{r}": n for r, n in sorted(self.by_reason.items())})
      return out


def bad_reason_counts(batch) -> dict[str, int]:
  """{reason: number of placeholders} of a batch (its "bad_reason" column), zeros left out."""
  counts = np.bincount(np.asarray(batch["bad_reason"]).ravel(), minlength=len(REASONS) + 1)
  return {r: int(n) for r, n in zip(REASONS, counts[1:]) if n}


def classify_image_error(error: str) -> str:
  """An error string of a source / `decode_image` -> one of REASONS."""
  e = error.lower()
  if "too large" in e:
    return "image_too_large"
  if "cannot decode" in e or "cannot identify" in e or "empty size" in e:
    return "image_corrupt"
  if "no image bytes" in e or "not found" in e or "cannot read image" in e:
    return "image_missing"
  return "record_error"


def _draft_decode(data: bytes, size: int, max_pixels: int) -> Optional[np.ndarray]:
  """A JPEG decoded at a reduced DCT scale and resized, or None (use the full path)."""
  import io
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if im.format != "JPEG" or w * h > max_pixels or min(w, h) < 2 * size:
        return None
      im.draft("RGB", (size, size))
      rgb = im.convert("RGB")
    return np.asarray(rgb.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)
  except Exception:  # noqa: BLE001  decode_image will report what is wrong
    return None


class _Bad(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def render_turns(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], template: str,
                 ) -> tuple[list[int], list[int]]:
  """Multi-turn SFT text -> (ids, loss mask), loss on every answer (and a final EOS).

  The text is exactly `history_to_prompt(template, turns[:-1], last question)` followed by
  the last answer, cut into pieces at the answers: each piece of prompt text and each answer
  is encoded separately (as build_conversation_input_ids encodes prompt and answer
  separately), the "\n" that joins turns is dropped, and loss_mask is 1 on every answer's
  tokens and on the final EOS. The last turn is therefore tokenized exactly like the
  single-turn builder with history would; earlier turns approximate it (token boundaries at
  the answers may differ from encoding the whole history string at once).
  """
  ids, mask = [], []
  emitted = ""
  for i, (q, a) in enumerate(turns):
    full = history_to_prompt(template, list(turns[:i]), q)
    piece = full[len(emitted):] if full.startswith(emitted) else full
    p = tokenizer.encode(piece)
    ans = tokenizer.encode(a)
    if i == len(turns) - 1:
      ans = ans + [tokenizer.eos_token_id]
    ids += p + ans
    mask += [0] * len(p) + [1] * len(ans)
    # history_to_prompt writes an earlier turn as "Question: {q} {tag} {a}\n".
    emitted = full + f" {a}\n"
  return ids, mask


@dataclasses.dataclass
class SampleBuilder:
  """A raw source record -> one example (a Grain map transform; thread-safe)."""

  tokenizer: Tokenizer
  model_config: CogVLMConfig
  max_length: int
  counter: BadSampleCounter = dataclasses.field(default_factory=BadSampleCounter)
  max_pixels: int = DEFAULT_MAX_PIXELS
  alpha: str = "white"
  caption_template: str = "base"
  grounding_template: str = "base"
  grounding_query: str = "Where is {}?"
  chat_template: str = "chat"
  # JPEG DCT-domain downscaling while decoding (PIL `draft`) to the smallest 1/2, 1/4, 1/8
  # scale that is still >= the target size, then the BICUBIC resize. 2-4x faster decoding of
  # large JPEGs, but pixels differ slightly from the reference full decode + resize, so it
  # is off by default.
  jpeg_draft: bool = False

  # ---- pieces --------------------------------------------------------------------------
  def image(self, record: dict) -> Optional[np.ndarray]:
    """uint8 [S, S, 3] or None for a text-only record; raises _Bad for a bad image."""
    if "box_text" in record and not record["box_text"]:  # RefCOCO: box outside the image
      raise _Bad("box_invalid", record.get("error") or "no box")
    if record.get("error"):
      raise _Bad(classify_image_error(record["error"]), record["error"])
    data = record.get("image_bytes")
    if data is None and "turns" in record and record.get("image") is None:
      return None  # LLaVA text-only conversation
    size = self.model_config.vision.image_size
    if data is None and record.get("image_array") is not None:  # decoded (TFDS) pixels
      return self.pixels_of_array(record["image_array"])
    if self.jpeg_draft and data and data[:2] == b"\xff\xd8":
      fast = _draft_decode(data, size, self.max_pixels)
      if fast is not None:
        return fast
    pil, error = decode_image(data, max_pixels=self.max_pixels, alpha=self.alpha)
    if error:
      raise _Bad(classify_image_error(error), error)
    # The reference's torchvision Resize((S, S), BICUBIC) on a PIL image.
    return np.asarray(pil.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)

  def pixels_of_array(self, array) -> np.ndarray:
    """Decoded pixels (uint8 [H, W] or [H, W, 1|3|4]) -> uint8 [S, S, 3]; raises _Bad."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in
                                                        (1, 3, 4)) or 0 in a.shape:
      raise _Bad("image_corrupt", f"decoded image of shape {a.shape} and dtype {a.dtype}")
    if a.shape[0] * a.shape[1] > self.max_pixels:
      raise _Bad("image_too_large", f"image too large: {a.shape[1]}x{a.shape[0]}")
    if a.ndim == 3 and a.shape[2] == 1:
      a = a[..., 0]
    pil = to_rgb(Image.fromarray(a), self.alpha)  # the same colour handling as decode_image
    size = self.model_config.vision.image_size
    return np.asarray(pil.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)

  def text(self, record: dict, with_image: bool) -> dict:
    """Token arrays of the record's task (no padding); raises _Bad."""
    cfg, tok = self.model_config, self.tokenizer
    if "turns" in record:
      turns = list(record["turns"])
      if not turns:
        raise _Bad("caption_missing", "conversation without turns")
      head = [tok.bos_token_id]
      types = [LANGUAGE_TOKEN_TYPE]
      if with_image:
        head += [cfg.image_placeholder_id] * cfg.image_span_length
        types += [VISION_TOKEN_TYPE] * cfg.image_span_length
      # Drop trailing turns until the conversation fits (keep at least one).
      for n in range(len(turns), 0, -1):
        ids, mask = render_turns(tok, turns[:n], self.chat_template)
        if len(head) + len(ids) <= self.max_length:
          break
      ids = head + ids
      return {"input_ids": np.asarray(ids, np.int32),
              "token_type_ids": np.asarray(types + [LANGUAGE_TOKEN_TYPE] * (len(ids) - len(head)),
                                           np.int32),
              "attention_mask": np.ones(len(ids), np.int32),
              "loss_mask": np.asarray([0] * len(head) + mask, np.int32)}
    if "box_text" in record or "bbox" in record:
      if not record.get("box_text"):
        raise _Bad("box_invalid", record.get("error") or "no box")
      sentence = record.get("sentence") or (record.get("sentences") or [None])[0]
      if not sentence:
        raise _Bad("caption_missing", "referring expression without a sentence")
      template, query, answer = (self.grounding_template,
                                 self.grounding_query.format(sentence), record["box_text"])
    elif "query" in record and "answer" in record:  # already rendered (demo records)
      template, query, answer = record.get("template", "base"), record["query"], record["answer"]
    else:
      caption = record.get("caption")
      if caption is None or not caption.strip():
        raise _Bad("caption_missing", "sample has no caption")
      template, query, answer = self.caption_template, "", caption.strip()
    built = build_conversation_input_ids(tok, cfg, query=query, template_version=template,
                                         answer=answer)
    if with_image:  # the image span goes right after BOS (decoded image resized elsewhere)
      n = cfg.image_span_length
      for key, fill in (("input_ids", cfg.image_placeholder_id),
                        ("token_type_ids", VISION_TOKEN_TYPE), ("attention_mask", 1),
                        ("loss_mask", 0)):
        v = built[key]
        built[key] = np.concatenate([v[:1], np.full(n, fill, np.int32), v[1:]])
    return built

  def placeholder(self, reason: str = "record_error") -> dict:
    size = self.model_config.vision.image_size
    out = {k: np.zeros((self.max_length,), np.int32) for k in SEQUENCE_KEYS}
    out["input_ids"][:] = self.model_config.pad_token_id
    out["input_ids"][0] = self.tokenizer.bos_token_id
    out["attention_mask"][0] = 1  # one attended token: no all-masked softmax row
    out["images"] = np.zeros((size, size, 3), np.uint8)
    out["image_valid"] = np.bool_(False)
    out["bad_sample"] = np.bool_(True)
    out["bad_reason"] = np.int32(REASONS.index(reason) + 1)
    return out

  # ---- the transform -------------------------------------------------------------------
  def __call__(self, record: dict) -> dict:
    source = f"{record.get('source', '?')}"
    try:
      pixels = self.image(record)
      built = self.text(record, with_image=pixels is not None)
      n = len(built["input_ids"])
      if n > self.max_length:
        raise _Bad("too_long", f"{n} tokens > max_length={self.max_length}")
    except _Bad as bad:
      self.counter.add(bad.reason, source, f"{source}:{record.get('key')}: {bad}")
      return self.placeholder(bad.reason)
    except Exception as e:  # noqa: BLE001  bad data must not crash the run; counted
      self.counter.add("record_error", source,
                       f"{source}:{record.get('key')}: {type(e).__name__}: {e}")
      return self.placeholder()
    self.counter.add(None)
    out = {}
    for key in SEQUENCE_KEYS:
      fill = self.model_config.pad_token_id if key == "input_ids" else 0
      row = np.full((self.max_length,), fill, np.int32)
      row[:n] = built[key]
      out[key] = row
    size = self.model_config.vision.image_size
    out["images"] = pixels if pixels is not None else np.zeros((size, size, 3), np.uint8)
    out["image_valid"] = np.bool_(pixels is not None)
    out["bad_sample"] = np.bool_(False)
    out["bad_reason"] = np.int32(0)
    return out
