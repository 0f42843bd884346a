"""One example builder for training and for generation: `ExampleBuilder`.

Training (`builder(record)`, a Grain map transform) takes the raw records of
`cogvlm_jax.data.sources` (WebDatasetSource, LlavaSource, RefCocoSource, DemoSource, or any
record of the same shapes). Per task:

    caption     (a record with "caption": LAION shards)  template "base", query "",
                answer = the caption
    grounding   (a record with "box_text": RefCOCO)       template `grounding_template`
                ("base"), query "Where is {sentence}?", answer = "[[x0,y0,x1,y1]]"
    rendered    (a record with "query" and "answer": the demo) its own template
    chat        (a record with "turns": LLaVA SFT)        template "chat"; ALL turns rendered,
                loss on every answer (see `render_turns`)

Every training example has the same static shapes (right padding to `max_length`):

    input_ids, token_type_ids, attention_mask, loss_mask   int32 [T]
    images                                                 uint8 [S, S, 3]
    image_valid                                            bool []
    bad_sample                                             bool []  (True: a placeholder)
    bad_reason                                             int32 [] (0, or 1 + REASONS index)

A record that cannot become a training example — unreadable / corrupt / truncated image,
decompression bomb, missing caption, box outside the image, too many tokens — becomes a
PLACEHOLDER (BOS only, attention on it alone, loss_mask all zero, black image, image_valid
False) and is counted under its reason in a `BadSampleCounter` (see `bad_samples`). Colour
modes (CMYK, L, P, RGBA, 16 bit) are handled by `decode_image` (alpha composited on white);
they are NOT bad samples.

Generation (`builder.prompt(sample)`, `builder.prompt_batch(samples, pad_to)`) takes eval's
samples — "query", "template", optionally "image" (a path, PIL image or uint8 array) and
"history" — and gives the reference builder's prompt: float32 CLIP-normalised images, as the
reference demos load them (`image_processing.load_image`), left padding so that every row's
last token is real. An image file that cannot be read is answered from a black image, with a
logged warning.

The token layout of both is `build_conversation_input_ids`'s (one `tokens` method builds
it); sequence keys and token types come from `cogvlm_jax.batch_layout`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from cogvlm_jax.batch_layout import LANGUAGE_TOKEN_TYPE, SEQUENCE_KEYS, VISION_TOKEN_TYPE
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data.bad_samples import (REASONS, BadSample, BadSampleCounter,
                                         classify_image_error)
from cogvlm_jax.data.image_decoding import decode_image, to_rgb
from cogvlm_jax.image_processing import preprocess_image
from cogvlm_jax.tokenization import (Tokenizer, build_conversation_input_ids, collate,
                                     history_to_prompt)

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; more is treated as a decompression bomb


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


def pad_sequences(built: Mapping[str, np.ndarray], length: int, pad_id: int,
                  left: bool = False) -> dict:
  """The SEQUENCE_KEYS arrays of `built` (each [n], n <= length) padded to int32 [length].

  Padding: input_ids `pad_id`, every other key 0; right padding, or left with `left`.
  """
  n = len(built["input_ids"])
  cols = slice(length - n, None) if left else slice(0, n)
  out = {}
  for key in SEQUENCE_KEYS:
    if key in built:
      row = np.full((length,), pad_id if key == "input_ids" else 0, np.int32)
      row[cols] = built[key]
      out[key] = row
  return out


def _draft_decode(data: bytes, size: int, max_pixels: int) -> Optional[np.ndarray]:
  """A JPEG decoded at a reduced DCT scale and resized (uint8 [size, size, 3]), or None
  (use the full path)."""
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


@dataclasses.dataclass
class ExampleBuilder:
  """Records -> training examples, and samples -> generation prompts (thread-safe)."""

  tokenizer: Tokenizer
  model_config: CogVLMConfig
  max_length: int  # training examples' length T (prompts are padded by prompt_batch)
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

  @property
  def image_size(self) -> int:
    return self.model_config.vision.image_size

  # ---- the token layout ----------------------------------------------------------------
  def tokens(self, query: str, template: Optional[str], answer: Optional[str] = None, *,
             with_image: bool = False, history=None) -> dict:
    """`build_conversation_input_ids`'s arrays (int32 [n], no padding, no images):
    [BOS] + image span (with_image) + prompt (+ answer + EOS, then also loss_mask)."""
    cfg = self.model_config
    built = build_conversation_input_ids(self.tokenizer, cfg, query=query, history=history,
                                         template_version=template, answer=answer)
    if with_image:  # the span goes right after BOS, as the reference builder puts it
      n = cfg.image_span_length
      for key, fill in (("input_ids", cfg.image_placeholder_id),
                        ("token_type_ids", VISION_TOKEN_TYPE), ("attention_mask", 1),
                        ("loss_mask", 0)):
        if key in built:
          v = built[key]
          built[key] = np.concatenate([v[:1], np.full(n, fill, np.int32), v[1:]])
    return built

  # ---- training examples ---------------------------------------------------------------
  def __call__(self, record: dict) -> dict:
    """A raw source record -> one training example (see the module docstring); counted."""
    source = f"{record.get('source', '?')}"
    try:
      pixels = self.image(record)
      built = self.text(record, with_image=pixels is not None)
      n = len(built["input_ids"])
      if n > self.max_length:
        raise BadSample("too_long", f"{n} tokens > max_length={self.max_length}")
    except BadSample as bad:
      self.counter.add(bad.reason, source, f"{source}:{record.get('key')}: {bad}")
      return self.placeholder(bad.reason)
    except Exception as e:  # noqa: BLE001  bad data must not crash the run; counted
      self.counter.add("record_error", source,
                       f"{source}:{record.get('key')}: {type(e).__name__}: {e}")
      return self.placeholder()
    self.counter.add(None)
    out = pad_sequences(built, self.max_length, self.model_config.pad_token_id)
    size = self.image_size
    out["images"] = pixels if pixels is not None else np.zeros((size, size, 3), np.uint8)
    out["image_valid"] = np.bool_(pixels is not None)
    out["bad_sample"] = np.bool_(False)
    out["bad_reason"] = np.int32(0)
    return out

  def image(self, record: dict) -> Optional[np.ndarray]:
    """uint8 [S, S, 3] or None for a text-only record; raises BadSample for a bad image."""
    if "box_text" in record and not record["box_text"]:  # RefCOCO: box outside the image
      raise BadSample("box_invalid", record.get("error") or "no box")
    if record.get("error"):
      raise BadSample(classify_image_error(record["error"]), record["error"])
    data = record.get("image_bytes")
    if data is None and "turns" in record and record.get("image") is None:
      return None  # LLaVA text-only conversation
    size = self.image_size
    if data is None and record.get("image_array") is not None:  # decoded (TFDS) pixels
      return self.pixels_of_array(record["image_array"])
    if self.jpeg_draft and data and data[:2] == b"\xff\xd8":
      fast = _draft_decode(data, size, self.max_pixels)
      if fast is not None:
        return fast
    pil, error = decode_image(data, max_pixels=self.max_pixels, alpha=self.alpha)
    if error:
      raise BadSample(classify_image_error(error), error)
    # The reference's torchvision Resize((S, S), BICUBIC) on a PIL image.
    return np.asarray(pil.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)

  def pixels_of_array(self, array) -> np.ndarray:
    """Decoded pixels (uint8 [H, W] or [H, W, 1|3|4]) -> uint8 [S, S, 3]; raises BadSample."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in
                                                        (1, 3, 4)) or 0 in a.shape:
      raise BadSample("image_corrupt", f"decoded image of shape {a.shape} and dtype {a.dtype}")
    if a.shape[0] * a.shape[1] > self.max_pixels:
      raise BadSample("image_too_large", f"image too large: {a.shape[1]}x{a.shape[0]}")
    if a.ndim == 3 and a.shape[2] == 1:
      a = a[..., 0]
    pil = to_rgb(Image.fromarray(a), self.alpha)  # the same colour handling as decode_image
    size = self.image_size
    return np.asarray(pil.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)

  def text(self, record: dict, with_image: bool) -> dict:
    """Token arrays (int32 [n], no padding) of the record's task; raises BadSample."""
    if "turns" in record:
      return self._chat_text(record, with_image)
    if "box_text" in record or "bbox" in record:
      if not record.get("box_text"):
        raise BadSample("box_invalid", record.get("error") or "no box")
      sentence = record.get("sentence") or (record.get("sentences") or [None])[0]
      if not sentence:
        raise BadSample("caption_missing", "referring expression without a sentence")
      template, query, answer = (self.grounding_template,
                                 self.grounding_query.format(sentence), record["box_text"])
    elif "query" in record and "answer" in record:  # already rendered (demo records)
      template, query, answer = record.get("template", "base"), record["query"], record["answer"]
    else:
      caption = record.get("caption")
      if caption is None or not caption.strip():
        raise BadSample("caption_missing", "sample has no caption")
      template, query, answer = self.caption_template, "", caption.strip()
    return self.tokens(query, template, answer, with_image=with_image)

  def _chat_text(self, record: dict, with_image: bool) -> dict:
    """A LLaVA conversation's arrays: every turn that fits in max_length, loss on answers."""
    cfg, tok = self.model_config, self.tokenizer
    turns = list(record["turns"])
    if not turns:
      raise BadSample("caption_missing", "conversation without turns")
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

  def placeholder(self, reason: str = "record_error") -> dict:
    """A bad sample's stand-in: BOS alone attended, no loss, black image, flagged bad."""
    size = self.image_size
    out = {k: np.zeros((self.max_length,), np.int32) for k in SEQUENCE_KEYS}
    out["input_ids"][:] = self.model_config.pad_token_id
    out["input_ids"][0] = self.tokenizer.bos_token_id
    out["attention_mask"][0] = 1  # one attended token: no all-masked softmax row
    out["images"] = np.zeros((size, size, 3), np.uint8)
    out["image_valid"] = np.bool_(False)
    out["bad_sample"] = np.bool_(True)
    out["bad_reason"] = np.int32(REASONS.index(reason) + 1)
    return out

  # ---- prompts for generation ----------------------------------------------------------
  def prompt(self, sample: Mapping) -> dict:
    """One prompt, unpadded: input_ids / token_type_ids / attention_mask int32 [n], and
    images float32 [S, S, 3] (CLIP-normalised) when the sample has an "image"."""
    image = sample.get("image")
    if image is None:
      return self.tokens(sample["query"], sample.get("template"), history=sample.get("history"))
    try:
      pixels = preprocess_image(image, self.image_size)
    except (OSError, ValueError) as e:  # missing / undecodable file: answer from a black one
      log.warning("sample %s: cannot read image %s (%s); using a black image",
                  sample.get("id"), image, e)
      pixels = preprocess_image(np.zeros((self.image_size, self.image_size, 3), np.uint8),
                                self.image_size)
    built = self.tokens(sample["query"], sample.get("template"), with_image=True,
                        history=sample.get("history"))
    built["images"] = pixels
    return built

  def prompt_batch(self, samples: Sequence[Mapping],
                   pad_to: Union[int, Sequence[int], None] = None,
                   pad_id: Optional[int] = None, rows: Optional[int] = None) -> dict:
    """Prompts of `samples`, left-padded: exactly `tokenization.collate` of the prompts.

    pad_to: a length T; or length buckets, T = the smallest that holds the longest prompt
      (static shapes, few compiled programs); or None, T = the longest prompt.
    pad_id: the input id of padding; default the tokenizer's pad id, else 0.
    rows: B, the batch size: rows after the samples' are copies of the first prompt (a static
      batch shape; the caller drops their answers). Default len(samples).
    Returns int32 [B, T] input_ids / token_type_ids / attention_mask; with any image also
    images float32 [B, S, S, 3] (zeros for rows without one) and has_image bool [B].
    ValueError when a prompt is longer than `pad_to` (or every bucket), or for more samples
    than `rows`.
    """
    rows = len(samples) if rows is None else rows
    if not 0 < len(samples) <= rows:
      raise ValueError(f"got {len(samples)} samples for {rows} rows")
    if pad_id is None:
      pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    prompts = [self.prompt(s) for s in samples]
    prompts += [prompts[0]] * (rows - len(prompts))
    if pad_to is not None and not isinstance(pad_to, (int, np.integer)):
      pad_to = smallest_bucket(max(len(p["input_ids"]) for p in prompts), pad_to)
    return collate(prompts, pad_to=pad_to, pad_id=pad_id, left_pad=True)


def smallest_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest of `buckets` >= length; ValueError naming the length when none is."""
  fits = [int(b) for b in sorted(buckets) if b >= length]
  if not fits:
    raise ValueError(f"a prompt has {length} tokens, longer than every length bucket "
                     f"{sorted(int(b) for b in buckets)}")
  return fits[0]
