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
    cross_images (CogAgent only)                           uint8 [Sx, Sx, 3]: the same
                                                           picture at the cross tower's size
    image_valid                                            bool []
    bad_sample                                             bool []  (True: a placeholder)
    bad_reason                                             int32 [] (0, or 1 + REASONS index)

A record that cannot become a training example — unreadable / corrupt / truncated image,
decompression bomb, missing caption, box outside the image, too many tokens — becomes a
PLACEHOLDER (BOS only, attention on it alone, loss_mask all zero, black image, image_valid
False) and is counted under its reason in a `BadSampleCounter` (see `bad_samples`). Colour
modes (CMYK, L, P, RGBA, 16 bit) are handled by `decode_image` (alpha composited on white);
they are NOT bad samples. CogAgent has no text-only rows (its cross-attention always reads
an image): a text-only conversation gets the image span and a black picture with image_valid
False, so the step masks the span out of attention (the cross-attention sees a constant).

Generation (`builder.prompt(sample)`, `builder.prompt_batch(samples, pad_to)`) takes eval's
samples — "query", "template", optionally "image" (a path, PIL image or uint8 array),
"history" and, for CogAgent, "cross_image" (another picture for the high-resolution tower;
default: the same image at cross_image_size) — and gives the reference builder's prompt:
float32 CLIP-normalised images, as the
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
from cogvlm_jax.image_processing import load_image, preprocess_image
from cogvlm_jax.tokenization import (Tokenizer, build_conversation_input_ids, collate,
                                     history_to_prompt)

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; more is treated as a decompression bomb
_ANSWER_MARK = "\x00answer\x00"  # render_turns: where an answer sits in the next prompt


def render_turns(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], template: str,
                 variant: str = "cogvlm") -> tuple[list[int], list[int]]:
  """Multi-turn SFT text -> (ids, loss mask), loss on every answer (and a final EOS).

  The text is exactly `history_to_prompt(template, turns[:-1], last question, variant)`
  followed by the last answer, cut into pieces at the answers: each piece of prompt text and
  each answer is encoded separately (as build_conversation_input_ids encodes prompt and answer
  separately), the "\n" that joins turns is dropped, and loss_mask is 1 on every answer's
  tokens and on the final EOS. The last turn is therefore tokenized exactly like the
  single-turn builder with history would; earlier turns approximate it (token boundaries at
  the answers may differ from encoding the whole history string at once).
  """
  ids, mask = [], []
  emitted = ""
  for i, (q, a) in enumerate(turns):
    full = history_to_prompt(template, list(turns[:i]), q, variant)
    piece = full[len(emitted):] if full.startswith(emitted) else full
    p = tokenizer.encode(piece.lstrip("\n") if i else piece)
    ans = tokenizer.encode(a)
    if i == len(turns) - 1:
      ans = ans + [tokenizer.eos_token_id]
    ids += p + ans
    mask += [0] * len(p) + [1] * len(ans)
    # The prompt text up to the end of this answer, as the next turn's prompt writes it
    # ("Question: {q} {tag} {a}" in CogVLM's templates, "... [/INST] {a}" in CogAgent's chat).
    # The answer's place is found with a marker in its stead: searching for the answer's own
    # text misplaces an empty answer (or one that also occurs in the template's text).
    if i + 1 < len(turns):
      marked = history_to_prompt(template, list(turns[:i]) + [(q, _ANSWER_MARK)],
                                 turns[i + 1][0], variant)
      at = marked.find(_ANSWER_MARK)
      emitted = marked[:at] + a if at >= 0 else full + f" {a}"  # base: no history in it
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


def _draft_decode(data: bytes, size: int, max_pixels: int) -> Optional[Image.Image]:
  """A JPEG decoded at a reduced DCT scale still >= size (an RGB PIL image), or None (use
  the full path)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if im.format != "JPEG" or w * h > max_pixels or min(w, h) < 2 * size:
        return None
      im.draft("RGB", (size, size))
      return im.convert("RGB")
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

  @property
  def image_sizes(self) -> dict[str, int]:
    """Each image key and its side: {"images": S}, plus {"cross_images": Sx} for CogAgent."""
    sizes = {"images": self.image_size}
    if self.model_config.cross_vision is not None:
      sizes["cross_images"] = self.model_config.cross_vision.image_size
    return sizes

  def resized(self, pil: Image.Image) -> dict[str, np.ndarray]:
    """One RGB picture at every size of `image_sizes` (uint8 [s, s, 3] each), resized like
    the reference's torchvision Resize((s, s), BICUBIC) on a PIL image."""
    return {key: np.asarray(pil.resize((s, s), resample=Image.BICUBIC), dtype=np.uint8)
            for key, s in self.image_sizes.items()}

  def black(self) -> dict[str, np.ndarray]:
    """Black pictures at every size of `image_sizes` (rows without a usable image)."""
    return {key: np.zeros((s, s, 3), np.uint8) for key, s in self.image_sizes.items()}

  # ---- the token layout ----------------------------------------------------------------
  def tokens(self, query: str, template: Optional[str], answer: Optional[str] = None, *,
             with_image: bool = False, history=None) -> dict:
    """`build_conversation_input_ids`'s arrays (int32 [n], no padding, no images):
    [BOS] + image span (with_image) + prompt (+ answer + EOS, then also loss_mask)."""
    cfg = self.model_config
    return build_conversation_input_ids(self.tokenizer, cfg, query=query, history=history,
                                        template_version=template, answer=answer,
                                        image_span=with_image)

  # ---- training examples ---------------------------------------------------------------
  def __call__(self, record: dict) -> dict:
    """A raw source record -> one training example (see the module docstring); counted."""
    source = f"{record.get('source', '?')}"
    try:
      pixels = self.image(record)
      # CogAgent rows always hold the span (text-only ones get a masked black picture).
      built = self.text(record, with_image=pixels is not None or self.needs_image)
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
    out.update(pixels if pixels is not None else self.black())
    out["image_valid"] = np.bool_(pixels is not None)
    out["bad_sample"] = np.bool_(False)
    out["bad_reason"] = np.int32(0)
    return out

  @property
  def needs_image(self) -> bool:
    """CogAgent: no row without an image span (module docstring)."""
    return self.model_config.cross_vision is not None

  def image(self, record: dict) -> Optional[dict]:
    """The record's picture at every size of `image_sizes` ({"images": uint8 [S, S, 3], ...})
    or None for a text-only record; raises BadSample for a bad image."""
    if "box_text" in record and not record["box_text"]:  # RefCOCO: box outside the image
      raise BadSample("box_invalid", record.get("error") or "no box")
    if record.get("error"):
      raise BadSample(classify_image_error(record["error"]), record["error"])
    data = record.get("image_bytes")
    if data is None and "turns" in record and record.get("image") is None:
      return None  # LLaVA text-only conversation
    if data is None and record.get("image_array") is not None:  # decoded (TFDS) pixels
      return self.pixels_of_array(record["image_array"])
    if self.jpeg_draft and data and data[:2] == b"\xff\xd8":
      fast = _draft_decode(data, max(self.image_sizes.values()), self.max_pixels)
      if fast is not None:
        return self.resized(fast)
    pil, error = decode_image(data, max_pixels=self.max_pixels, alpha=self.alpha)
    if error:
      raise BadSample(classify_image_error(error), error)
    return self.resized(pil)

  def pixels_of_array(self, array) -> dict:
    """Decoded pixels (uint8 [H, W] or [H, W, 1|3|4]) -> `resized` ({"images": uint8
    [S, S, 3], ...}); raises BadSample."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in
                                                        (1, 3, 4)) or 0 in a.shape:
      raise BadSample("image_corrupt", f"decoded image of shape {a.shape} and dtype {a.dtype}")
    if a.shape[0] * a.shape[1] > self.max_pixels:
      raise BadSample("image_too_large", f"image too large: {a.shape[1]}x{a.shape[0]}")
    if a.ndim == 3 and a.shape[2] == 1:
      a = a[..., 0]
    pil = to_rgb(Image.fromarray(a), self.alpha)  # the same colour handling as decode_image
    return self.resized(pil)

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
      ids, mask = render_turns(tok, turns[:n], self.chat_template, cfg.variant)
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
    out = {k: np.zeros((self.max_length,), np.int32) for k in SEQUENCE_KEYS}
    out["input_ids"][:] = self.model_config.pad_token_id
    out["input_ids"][0] = self.tokenizer.bos_token_id
    out["attention_mask"][0] = 1  # one attended token: no all-masked softmax row
    out.update(self.black())
    out["image_valid"] = np.bool_(False)
    out["bad_sample"] = np.bool_(True)
    out["bad_reason"] = np.int32(REASONS.index(reason) + 1)
    return out

  # ---- prompts for generation ----------------------------------------------------------
  def prompt(self, sample: Mapping) -> dict:
    """One prompt, unpadded: input_ids / token_type_ids / attention_mask int32 [n], and
    images float32 [S, S, 3] (CLIP-normalised) when the sample has an "image"; CogAgent
    also cross_images float32 [Sx, Sx, 3]: the sample's "cross_image", else its image."""
    image = sample.get("image")
    if image is None:  # CogAgent refuses this (build_conversation_input_ids says why)
      return self.tokens(sample["query"], sample.get("template"), history=sample.get("history"))
    built = self.tokens(sample["query"], sample.get("template"), with_image=True,
                        history=sample.get("history"))
    picture = self._load_picture(image, sample)  # decoded once for both sizes
    built["images"] = preprocess_image(picture, self.image_size)
    if self.needs_image:
      cross = sample.get("cross_image")
      cross = picture if cross is None else self._load_picture(cross, sample)
      built["cross_images"] = preprocess_image(cross, self.image_sizes["cross_images"])
    return built

  def _load_picture(self, image, sample: Mapping) -> Image.Image:
    """An RGB PIL image of a path / PIL image / uint8 array; a file that cannot be read
    gives a black picture (and a logged warning)."""
    try:
      return load_image(image)
    except (OSError, ValueError) as e:  # missing / undecodable file: answer from a black one
      log.warning("sample %s: cannot read image %s (%s); using a black image",
                  sample.get("id"), image, e)
      return Image.new("RGB", (self.image_size, self.image_size))

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
    images float32 [B, S, S, 3] (zeros for rows without one) and has_image bool [B];
    CogAgent also cross_images float32 [B, Sx, Sx, 3].
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
