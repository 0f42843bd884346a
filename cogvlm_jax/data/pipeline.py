"""The Grain input pipeline: records -> model-ready batches with static shapes.

A record is a dict with "image" (a path, relative to the data folder), "template", "query",
"answer" (see `cogvlm_jax.data.demo`). Each example becomes (right-padded to `max_length`):

    input_ids, token_type_ids, attention_mask, loss_mask   int32 [T]
    images                                                 uint8 [S, S, 3]
    image_valid                                            bool []

`loss_mask` is 1 exactly on the answer tokens and the EOS (the model sees BOS, the image span
and the prompt, but is trained only to produce the answer). Images leave the pipeline as
uint8 and are normalised on device (`cogvlm_jax.image_processing.normalize_image`). An image
that cannot be read gives `image_valid = False` and a black image; the step masks its span.

Training: `MapDataset.source(records).shuffle(seed).repeat().map(build).batch(B)`, then an
iterator with a thread pool (Pillow and sentencepiece release the GIL; no processes). The
shuffle is a seeded index permutation, different each epoch; the iterator state is a single
position, so `get_state()` / `set_state()` (and Orbax, via `grain.checkpoint`) resume it
exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import grain
import numpy as np

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.image_processing import resize_image
from cogvlm_jax.tokenization import Tokenizer, build_conversation_input_ids

SEQUENCE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class ExampleBuilder:
  """record -> one example's arrays (a Grain map transform; thread-safe)."""

  folder: str
  tokenizer: Tokenizer
  model_config: CogVLMConfig
  max_length: int
  with_answer: bool = True  # False: prompt only (for generation), no loss_mask
  left_pad: bool = False  # generation needs left padding; training uses right padding

  def load_image(self, record: dict) -> tuple[np.ndarray, bool]:
    size = self.model_config.vision.image_size
    path = os.path.join(self.folder, record["image"])
    try:
      return resize_image(path, size), True
    except (OSError, ValueError) as e:  # missing / truncated / undecodable file
      logging.warning("record %s: cannot read image %s (%s); masking it", record.get("id"),
                      path, e)
      return np.zeros((size, size, 3), np.uint8), False

  def __call__(self, record: dict) -> dict:
    pixels, valid = self.load_image(record)
    built = build_conversation_input_ids(
        self.tokenizer, self.model_config, query=record["query"], image=pixels,
        template_version=record["template"],
        answer=record["answer"] if self.with_answer else None)
    n = len(built["input_ids"])
    if n > self.max_length:
      raise ValueError(f"record {record.get('id')!r} has {n} tokens, more than "
                       f"max_length={self.max_length}; raise data.max_length")
    out = {}
    cols = slice(self.max_length - n, None) if self.left_pad else slice(0, n)
    for key in SEQUENCE_KEYS:
      if key not in built:
        continue
      fill = self.model_config.pad_token_id if key == "input_ids" else 0
      row = np.full((self.max_length,), fill, np.int32)
      row[cols] = built[key]
      out[key] = row
    out["images"] = pixels
    out["image_valid"] = np.bool_(valid)
    return out


def train_dataset(records: Sequence[dict], builder: ExampleBuilder, *, batch_size: int,
                  seed: int, num_threads: int = 2, prefetch: int = 8,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Infinite, shuffled (per epoch), batched training examples of this host's shard."""
  if not records:
    raise ValueError("the training split has no records")
  if not 0 <= seed < 2**32:
    raise ValueError(f"data seed must be in [0, 2**32), got {seed}")
  ds = grain.MapDataset.source(list(records))
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None).map(builder).batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))


def eval_batches(records: Sequence[dict], builder: ExampleBuilder, *, batch_size: int,
                 num_threads: int = 2) -> Iterator[tuple[dict, list[dict]]]:
  """One pass over `records` in order: (batch, the batch's records).

  Every batch has `batch_size` rows (static shapes, one compiled program); the last one is
  filled up with copies of its first record, marked by `example_valid = False`.
  """
  ds = grain.MapDataset.source(list(records)).map(builder)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=2 * batch_size)))
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    examples = [next(it) for _ in chunk]
    valid = [True] * len(chunk) + [False] * (batch_size - len(chunk))
    examples += [examples[0]] * (batch_size - len(chunk))
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["example_valid"] = np.asarray(valid, bool)
    yield batch, chunk
