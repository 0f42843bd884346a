"""Tokenizers, prompt templates and model inputs, equivalent to the original CogVLM builders.

* `load_tokenizer` reads a local sentencepiece ``tokenizer.model`` (CogVLM: Vicuna's
  LlamaTokenizer) or a ``tokenizer.json`` (CogVLM2: Llama-3, via the `tokenizers` library).
  Nothing is downloaded.
* `history_to_prompt` is the reference ``_history_to_prompt``.
* `build_conversation_input_ids` is the reference ``build_conversation_input_ids``:
  ``[BOS] + image span (n_img + 2 placeholder ids, token type 1) + prompt tokens
  (+ answer tokens + EOS when training labels are requested)``.
* `collate` pads built samples into a batch (left padding for generation).

All id arrays are numpy int32; images are channels-last float32 [S, S, 3].
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from cogvlm_jax.batch_layout import LANGUAGE_TOKEN_TYPE, SEQUENCE_KEYS, VISION_TOKEN_TYPE
from cogvlm_jax.image_processing import preprocess_image

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZERS_FILE = "tokenizer.json"
# Files next to a tokenizer.json that may name its special tokens, most specific first.
_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Llama-3 (CogVLM2) special tokens, used when no config file names bos/eos.
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"


class Tokenizer:
  """One interface over a sentencepiece processor or a `tokenizers.Tokenizer`.

  `encode` never adds special tokens (the builder places BOS itself). For sentencepiece it is
  ``sp.encode(text)``, which adds the dummy-prefix '▁' exactly like Hugging Face's
  (slow, legacy) LlamaTokenizer with ``add_special_tokens=False``.
  """

  def __init__(self, backend, kind: str, *, bos_token_id: Optional[int],
               eos_token_id: Optional[int], pad_token_id: Optional[int], path: str = ""):
    if kind not in ("sentencepiece", "tokenizers"):
      raise ValueError(f"unknown tokenizer kind {kind!r}")
    self.backend = backend
    self.kind = kind
    self.path = path
    self._bos, self._eos, self._pad = bos_token_id, eos_token_id, pad_token_id

  # ---- special ids / sizes -------------------------------------------------------------
  @property
  def bos_token_id(self) -> Optional[int]:
    return self._bos

  @property
  def eos_token_id(self) -> Optional[int]:
    return self._eos

  @property
  def pad_token_id(self) -> Optional[int]:
    return self._pad

  @property
  def vocab_size(self) -> int:
    """Number of ids, added/special tokens included."""
    if self.kind == "sentencepiece":
      return self.backend.get_piece_size()
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> Optional[int]:
    """Id of a token string, or None when the vocabulary does not have it."""
    if self.kind == "sentencepiece":
      i = self.backend.piece_to_id(token)
      # sentencepiece maps unknown pieces to unk; only the unk piece itself may map there.
      return i if (i != self.backend.unk_id() or token == self.backend.id_to_piece(i)) else None
    return self.backend.token_to_id(token)

  # ---- text <-> ids --------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without any special tokens."""
    if self.kind == "sentencepiece":
      return list(self.backend.encode(text))
    return list(self.backend.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self.kind == "tokenizers":
      return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    sp = self.backend
    special = {i for i in ids if sp.is_control(i) or sp.is_unknown(i)} | {
        i for i in (self._bos, self._eos, self._pad) if i is not None}
    if skip_special_tokens:
      return sp.decode([i for i in ids if i not in special])
    # sp.decode silently drops control pieces (<s>, </s>); spell them out instead, as HF does.
    out, run = [], []
    for i in ids:
      if i in special:
        if run:
          out.append(sp.decode(run))
          run = []
        out.append(sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(sp.decode(run))
    return "".join(out)

  def __repr__(self) -> str:
    return (f"Tokenizer({self.kind}, path={self.path!r}, vocab_size={self.vocab_size}, "
            f"bos={self._bos}, eos={self._eos}, pad={self._pad})")


def load_tokenizer(path: str, *, bos_token: Optional[str] = None,
                   eos_token: Optional[str] = None,
                   pad_token: Optional[str] = None) -> Tokenizer:
  """Loads a tokenizer from a local folder, a ``tokenizer.model`` or a ``tokenizer.json``.

  A folder holding both files uses ``tokenizer.model`` (the reference CogVLM uses the slow,
  sentencepiece LlamaTokenizer). `bos_token` / `eos_token` / `pad_token` are token strings that
  override whatever the files say.

  Special ids, sentencepiece: bos/eos from the model, pad = the model's pad id or, when that is
  -1 (Llama/Vicuna), the unk id (0). tokenizer.json: ``bos_token`` / ``eos_token`` /
  ``pad_token`` from a ``tokenizer_config.json`` or ``special_tokens_map.json`` beside it,
  else the Llama-3 tokens "<|begin_of_text|>" / "<|end_of_text|>" when present; pad stays None
  unless named (CogVLM2 pads with its own hard-coded id, see `CogVLMConfig.pad_token_id`).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    folder = path
    candidates = [os.path.join(path, SENTENCEPIECE_FILE), os.path.join(path, TOKENIZERS_FILE)]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise FileNotFoundError(
          f"no tokenizer in folder {path!r}: looked for {SENTENCEPIECE_FILE!r} "
          f"(sentencepiece, CogVLM) and {TOKENIZERS_FILE!r} (tokenizers, CogVLM2)")
    file = found[0]
  elif os.path.isfile(path):
    folder, file = os.path.dirname(path) or ".", path
  else:
    raise FileNotFoundError(
        f"tokenizer path {path!r} does not exist; pass a folder holding {SENTENCEPIECE_FILE!r} "
        f"or {TOKENIZERS_FILE!r}, or one of those files")

  if file.endswith(".json"):
    return _load_tokenizers_json(file, folder, bos_token, eos_token, pad_token)
  return _load_sentencepiece(file, bos_token, eos_token, pad_token)


def _load_sentencepiece(file, bos_token, eos_token, pad_token) -> Tokenizer:
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=file)
  tok = Tokenizer(sp, "sentencepiece", bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, path=file)
  bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
  if pad < 0:  # Llama/Vicuna have no pad piece; HF pads (and CogVLM fills images) with unk 0
    pad = sp.unk_id()
  tok._bos = _lookup(tok, bos_token, "bos_token") if bos_token else (bos if bos >= 0 else None)
  tok._eos = _lookup(tok, eos_token, "eos_token") if eos_token else (eos if eos >= 0 else None)
  tok._pad = _lookup(tok, pad_token, "pad_token") if pad_token else (pad if pad >= 0 else None)
  return tok


def _load_tokenizers_json(file, folder, bos_token, eos_token, pad_token) -> Tokenizer:
  import tokenizers

  tok = Tokenizer(tokenizers.Tokenizer.from_file(file), "tokenizers", bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, path=file)
  named = _special_tokens_from_files(folder)
  defaults = {"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS}
  ids = {}
  for key, override in (("bos_token", bos_token), ("eos_token", eos_token),
                        ("pad_token", pad_token)):
    token = override or named.get(key)
    if token:
      ids[key] = _lookup(tok, token, key)
    elif key in defaults:
      ids[key] = tok.token_to_id(defaults[key])  # None when this is not a Llama-3 vocabulary
    else:
      ids[key] = None
  tok._bos, tok._eos, tok._pad = ids["bos_token"], ids["eos_token"], ids["pad_token"]
  return tok


def _special_tokens_from_files(folder: str) -> dict:
  """bos/eos/pad token strings named by tokenizer_config.json / special_tokens_map.json."""
  named = {}
  for name in reversed(_SPECIAL_TOKEN_FILES):  # later (more specific) files win
    p = os.path.join(folder, name)
    if not os.path.isfile(p):
      continue
    with open(p) as f:
      d = json.load(f)
    for key in ("bos_token", "eos_token", "pad_token"):
      v = d.get(key)
      if isinstance(v, dict):  # serialized AddedToken: {"content": "...", ...}
        v = v.get("content")
      if isinstance(v, str) and v:
        named[key] = v
  return named


def _lookup(tok: Tokenizer, token: str, what: str) -> int:
  i = tok.token_to_id(token)
  if i is None:
    raise ValueError(f"{what} {token!r} is not in the vocabulary of {tok.path}")
  return i


# ---- prompts ---------------------------------------------------------------------------

# Answer tag per template; None = "base" (query verbatim, no history).
_TEMPLATE_TAGS = {"base": None, "chat": "Answer:", "vqa": "Short answer:"}
TEMPLATES = tuple(_TEMPLATE_TAGS)


# CogAgent's own templates (its `_history_to_prompt` differs from CogVLM's).
COGAGENT_TEMPLATES = ("base", "chat", "chat_old", "vqa")


def cogagent_history_to_prompt(template_version: str,
                               history: Optional[Sequence[tuple[str, str]]], query: str) -> str:
  """CogAgent's ``_history_to_prompt``.

  chat: " [INST] " + "{q} [/INST] {r} [INST] " per turn + "{query} [/INST] " (leading and
  trailing space); chat_old: "<EOI>Question: " + "{q} Answer: {r}\\nQuestion: " per turn +
  "{query} Answer:"; vqa: "<EOI>Question: {query} Short answer:" (history ignored); base:
  `query` verbatim. "<EOI>" is literal text, tokenized like any other.
  """
  history = history or []
  if template_version == "chat":
    turns = "".join(f"{q} [/INST] {r} [INST] " for q, r in history)
    return f" [INST] {turns}{query} [/INST] "
  if template_version == "chat_old":
    turns = "".join(f"{q} Answer: {r}\nQuestion: " for q, r in history)
    return f"<EOI>Question: {turns}{query} Answer:"
  if template_version == "vqa":
    return f"<EOI>Question: {query} Short answer:"
  if template_version == "base":
    return query
  raise ValueError(f"unknown CogAgent template_version {template_version!r}; known: "
                   f"{list(COGAGENT_TEMPLATES)}")


def history_to_prompt(template_version: str, history: Optional[Sequence[tuple[str, str]]],
                      query: str, variant: str = "cogvlm") -> str:
  """The reference ``_history_to_prompt`` of `variant` (CogAgent: its own templates,
  `cogagent_history_to_prompt`).

  base: `query` verbatim (history ignored). chat / vqa: for each (q, a) in history
  "Question: {q} {tag} {a}\\n", then "Question: {query} {tag}" with no trailing space;
  tag = "Answer:" (chat) or "Short answer:" (vqa).
  """
  if variant == "cogagent":
    return cogagent_history_to_prompt(template_version, history, query)
  if template_version not in _TEMPLATE_TAGS:
    raise ValueError(f"unknown template_version {template_version!r}; known: {list(TEMPLATES)}")
  tag = _TEMPLATE_TAGS[template_version]
  if tag is None:
    return query
  prompt = "".join(f"Question: {q} {tag} {a}\n" for q, a in (history or []))
  return prompt + f"Question: {query} {tag}"


# ---- model inputs ----------------------------------------------------------------------


def build_conversation_input_ids(tokenizer: Tokenizer, config, *, query: str,
                                 history: Optional[Sequence[tuple[str, str]]] = None,
                                 image=None, template_version: Optional[str] = None,
                                 answer: Optional[str] = None,
                                 image_span: bool = False) -> dict:
  """One conversation as model inputs (no batch dim), like the reference builder.

  Layout: ``[BOS] + [placeholder] * config.image_span_length (only with an image)
  + encode(prompt) (+ encode(answer) + [EOS] when `answer` is given)``.

  `image`: None, a path, a PIL image, a uint8 [H, W, 3] array, or a list/tuple of at most one
  of those (the reference takes a list). `template_version` defaults to
  ``config.template_version``. BOS/EOS come from the tokenizer (as in the reference); the
  placeholder id from the config (v1: pad 0, v2: 128002). `image_span`: lay out the image
  span without an `image` (the caller brings the pixels, e.g. `data.examples.ExampleBuilder`).

  Returns numpy arrays, T = sequence length:
    input_ids, token_type_ids (0 language, 1 vision), attention_mask (ones): int32 [T];
    images: float32 [S, S, 3], S = config.vision.image_size (only with an image);
    cross_images: float32 [Sx, Sx, 3], Sx = config.cross_vision.image_size (CogAgent only);
    loss_mask: int32 [T], 1 exactly on the answer tokens and the EOS (only with `answer`).
  The reference's ``labels`` equal ``where(loss_mask, input_ids, -100)``.
  """
  if isinstance(image, (list, tuple)):
    if len(image) > 1:
      raise ValueError(f"got {len(image)} images: CogVLM supports one image per conversation")
    image = image[0] if image else None
  if tokenizer.bos_token_id is None:
    raise ValueError(f"tokenizer {tokenizer.path} has no bos token; pass bos_token= to "
                     f"load_tokenizer")
  template_version = template_version or config.template_version
  variant = getattr(config, "variant", "cogvlm")
  if variant == "cogagent" and image is None and not image_span:
    raise ValueError("CogAgent needs an image: it has no text-only prompts (the original's "
                     "builder and forward both fail without one)")
  text = history_to_prompt(template_version, history, query, variant)

  input_ids = [tokenizer.bos_token_id]
  token_type_ids = [LANGUAGE_TOKEN_TYPE]
  out = {}
  if image is not None:
    out["images"] = preprocess_image(image, config.vision.image_size)
    if variant == "cogagent":  # the same picture at the cross tower's resolution
      out["cross_images"] = preprocess_image(image, config.cross_vision.image_size)
  if image is not None or image_span:
    n = config.image_span_length  # boi + image tokens + eoi
    input_ids += [config.image_placeholder_id] * n
    token_type_ids += [VISION_TOKEN_TYPE] * n
  # The reference tokenizes the prompt and the answer separately and concatenates the ids.
  text_ids = tokenizer.encode(text)
  answer_ids = []
  if answer is not None:
    if tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer {tokenizer.path} has no eos token; pass eos_token= to "
                       f"load_tokenizer")
    answer_ids = tokenizer.encode(answer) + [tokenizer.eos_token_id]
  input_ids += text_ids + answer_ids
  token_type_ids += [LANGUAGE_TOKEN_TYPE] * (len(text_ids) + len(answer_ids))

  T = len(input_ids)
  out["input_ids"] = np.asarray(input_ids, dtype=np.int32)
  out["token_type_ids"] = np.asarray(token_type_ids, dtype=np.int32)
  out["attention_mask"] = np.ones(T, dtype=np.int32)
  if answer is not None:
    loss_mask = np.zeros(T, dtype=np.int32)
    loss_mask[T - len(answer_ids):] = 1
    out["loss_mask"] = loss_mask
  return out


def collate(samples: Sequence[dict], *, pad_to: Optional[int] = None, pad_id: int = 0,
            left_pad: bool = True) -> dict:
  """Pads built samples into a batch; B = len(samples), T = pad_to or the longest sample.

  Padding positions get input_ids = `pad_id` (any in-vocabulary id: they are masked), token
  type 0, attention_mask 0 and loss_mask 0. Left padding (default) is what generation needs,
  so that every row's last token is real. `pad_to` gives static shapes (ValueError if a
  sample is longer).

  Returns int32 [B, T] input_ids / token_type_ids / attention_mask (and loss_mask when any
  sample has one). When any sample has an image: images float32 [B, S, S, 3] (zeros for rows
  without one) and has_image bool [B]; likewise cross_images [B, Sx, Sx, 3] (CogAgent).
  """
  if not samples:
    raise ValueError("collate needs at least one sample")
  lengths = [len(s["input_ids"]) for s in samples]
  T = max(lengths) if pad_to is None else pad_to
  if pad_to is not None and max(lengths) > pad_to:
    raise ValueError(f"a sample has {max(lengths)} tokens, longer than pad_to={pad_to}")
  B = len(samples)
  keys = [k for k in SEQUENCE_KEYS if any(k in s for s in samples)]
  batch = {k: np.full((B, T), pad_id if k == "input_ids" else 0, dtype=np.int32) for k in keys}
  for b, (s, n) in enumerate(zip(samples, lengths)):
    cols = slice(T - n, T) if left_pad else slice(0, n)
    for k in keys:
      if k in s:  # a sample without loss_mask contributes no loss: leave its zeros
        batch[k][b, cols] = s[k]

  with_image = [s.get("images") is not None for s in samples]
  if any(with_image):
    batch["images"] = _stack_images(samples, "images")
    batch["has_image"] = np.asarray(with_image, dtype=bool)
  if any(s.get("cross_images") is not None for s in samples):  # CogAgent's high resolution
    batch["cross_images"] = _stack_images(samples, "cross_images")
  return batch


def _stack_images(samples: Sequence[dict], key: str) -> np.ndarray:
  """float32 [B, S, S, 3] of samples[b][key], zeros for samples without one."""
  shape = next(np.shape(s[key]) for s in samples if s.get(key) is not None)
  images = np.zeros((len(samples),) + tuple(shape), dtype=np.float32)
  for b, s in enumerate(samples):
    if s.get(key) is not None:
      if np.shape(s[key]) != shape:
        name = "image" if key == "images" else key
        raise ValueError(f"sample {b} {name} shape {np.shape(s[key])} != {shape}")
      images[b] = s[key]
  return images
