"""Batched, bucketed greedy generation for evaluation: samples in, decoded answers out.

A sample is {"id", "image" (path or None), "query", "template", ...}; CogAgent samples may
also name a "cross_image" for the high-resolution tower (default: the image at Sx). `Generator.prepare`
builds one batch on the host (thread-safe, so the next batch is built while the device
decodes the current one): prompts from the data package's `ExampleBuilder`, left-padded to
the smallest of the length buckets that fits, the last batch filled with dummy rows. So
`generate` (prefill + KV-cache decoding under jit) compiles once per bucket, not per batch.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.eval.settings import EvalConfigError

log = logging.getLogger(__name__)


DEFAULT_TEXT_BUCKETS = (16, 32, 64, 128, 256)


def default_buckets(model_config) -> list[int]:
  """BOS + the image span + a few text lengths (used when config.length_buckets is empty)."""
  return [1 + model_config.image_span_length + t for t in DEFAULT_TEXT_BUCKETS]


def data_parallel_size(mesh) -> int:
  """How many ways the batch dim is split: mesh data x fsdp."""
  return int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))


def _generate(model, batch, **kw):
  """`generate` on a collated batch: [B, bucket + max_new_tokens] int token ids (CogAgent
  batches carry cross_images too).

  Called through the module name `generate_batch`, so tests can count calls and shapes
  (monkeypatch `cogvlm_jax.eval.generator.generate_batch`)."""
  from cogvlm_jax.generate import generate
  return generate(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                  batch["images"], cross_images=batch.get("cross_images"), **kw)


generate_batch = _generate


class Generator:
  """Batched, bucketed greedy generation: prompts in, decoded answers out.

  `prepare` is the one place a sample becomes model input (tokens, image, padding)."""

  def __init__(self, model, tokenizer, *, batch_size: int, length_buckets: Sequence[int],
               max_new_tokens: int, mesh=None, stop_tokens: Sequence[str] = ()):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
    cfg = model.config
    self.buckets = sorted(int(b) for b in length_buckets) or default_buckets(cfg)
    # eos of the tokenizer and the model, plus named stop tokens the vocabulary has (CogVLM2
    # chat models end a turn with <|eot_id|>; its HF config lists it as a second eos).
    extra = [tokenizer.token_to_id(t) for t in stop_tokens]
    self.stop = list(dict.fromkeys(t for t in (tokenizer.eos_token_id, cfg.eos_token_id, *extra)
                                   if t is not None))
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.examples = ExampleBuilder(tokenizer, cfg, max(self.buckets))

  def prepare(self, samples: Sequence[Mapping]) -> tuple[dict, int, int]:
    """Host work for one batch (images, tokens, padding): (batch, bucket, real rows).

    The data package's one example builder makes the prompts (an unreadable image becomes
    a black one, with a warning), left-padded to the smallest bucket that fits and filled
    to batch_size with copies of the first row (a static batch shape). Thread-safe, so the
    next batch can be prepared while the current one generates."""
    if not 0 < len(samples) <= self.batch_size:
      raise ValueError(f"got {len(samples)} samples for batch_size {self.batch_size}")
    try:
      batch = self.examples.prompt_batch(samples, pad_to=self.buckets, pad_id=self.pad_id,
                                         rows=self.batch_size)
    except ValueError as e:
      if "longer than every length bucket" not in str(e):
        raise
      raise EvalConfigError(f"{e}; add a larger one to config.length_buckets") from e
    bucket = batch["input_ids"].shape[1]
    batch.setdefault("images", None)
    batch.pop("has_image", None)
    return batch, bucket, len(samples)

  def run(self, prepared: tuple[dict, int, int]) -> list[str]:
    """Generates for a prepared batch; the decoded answers of its real rows."""
    batch, bucket, n = prepared
    if self.mesh is not None and batch["images"] is not None:
      import jax
      from jax.sharding import NamedSharding, PartitionSpec
      spec = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))  # the batch dim
      batch = {**batch, **{k: jax.device_put(batch[k], spec)
                           for k in ("images", "cross_images") if batch.get(k) is not None}}
    kw = dict(max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop,
              pad_token_id=self.stop[0] if self.stop else None)
    if self.mesh is not None:
      from cogvlm_jax.sharding import activation_sharding
      with activation_sharding(self.mesh):
        out = generate_batch(self.model, batch, **kw)
    else:
      out = generate_batch(self.model, batch, **kw)
    answers = []
    for row in np.asarray(out)[:n, bucket:]:
      ids = [int(t) for t in row]
      cut = min([ids.index(t) for t in self.stop if t in ids], default=len(ids))
      answers.append(self.tokenizer.decode(ids[:cut]).strip())
    return answers

  def __call__(self, samples: Sequence[Mapping]) -> list[str]:
    """prepare + run: the answers of up to batch_size samples."""
    return self.run(self.prepare(samples))
