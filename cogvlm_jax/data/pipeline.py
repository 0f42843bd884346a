"""The Grain input pipelines: records -> model-ready batches with static shapes.

Training (`mixture_dataset`): the run's sources (LAION-style shards, LLaVA, RefCOCO, TFDS, the
demo; see `cogvlm_jax.data.mixture` for how a config names them) — each globally shuffled
with its own seed, sliced per process (`jax.process_index()` / `process_count()`), repeated,
mixed by weight (`MapDataset.mix`), then decoded / resized / tokenized by a
`transforms.SampleBuilder` in a thread pool (or worker processes), batched and prefetched.
Bad samples become counted placeholders (see `cogvlm_jax.data.transforms`). The iterator
state is saved in the training checkpoint (`grain.checkpoint`) and restored exactly.

Evaluation on the demo data (`ExampleBuilder` + `eval_batches`): a record is a dict with
"image" (a path, relative to the data folder), "template", "query", "answer" (see
`cogvlm_jax.data.demo`); records read from the demo's webdataset shards also carry
"shard" / "image_offset" / "image_size", and their image bytes are read from the tar (one
pread). Each example becomes (padded to `max_length`; left padding for generation):

    input_ids, token_type_ids, attention_mask, loss_mask   int32 [T]
    images                                                 uint8 [S, S, 3]
    image_valid                                            bool []

`loss_mask` is 1 exactly on the answer tokens and the EOS. Images leave the pipeline as uint8
and are normalised on device (`cogvlm_jax.image_processing.normalize_image`); an image that
cannot be read gives `image_valid = False` and a black image, whose span the step masks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.image_processing import resize_image
from cogvlm_jax.tokenization import Tokenizer, build_conversation_input_ids

from cogvlm_jax.batch_layout import SEQUENCE_KEYS
from cogvlm_jax.fileio import RangeReader
from cogvlm_jax.data.sources.bad_input import decode_image
from cogvlm_jax.data.transforms import (DEFAULT_MAX_PIXELS, BadDataError,  # noqa: F401
                                        BadSampleCounter, SampleBuilder,
                                        classify_image_error)

_READER = RangeReader()  # per-thread open files, pread: safe from Grain's threads

@dataclasses.dataclass(frozen=True)
class ExampleBuilder:
  """A demo record -> one example's arrays, for evaluation (thread-safe)."""

  folder: str
  tokenizer: Tokenizer
  model_config: CogVLMConfig
  max_length: int
  with_answer: bool = True  # False: prompt only (for generation), no loss_mask
  left_pad: bool = False  # generation needs left padding; training uses right padding
  # Optional: counts every example and its unreadable images (reason image_missing /
  # image_corrupt / ...), for the training logs; raises BadDataError over its max ratio.
  counter: Optional[BadSampleCounter] = None

  def load_image(self, record: dict) -> tuple[np.ndarray, bool]:
    size = self.model_config.vision.image_size
    if "shard" in record:  # demo shard records: the bytes are in a webdataset tar
      path = os.path.join(self.folder, record["shard"])
      try:
        data = _READER.read(path, record["image_offset"], record["image_size"])
      except OSError as e:
        data, error = None, str(e)
      else:
        pil, error = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
      if not error:
        return resize_image(pil, size), True
    else:
      path = os.path.join(self.folder, record["image"])
      try:
        return resize_image(path, size), True
      except (OSError, ValueError) as e:  # missing / truncated / undecodable file
        error = str(e)
    logging.warning("record %s: cannot read image %s (%s); masking it", record.get("id"),
                    path, error)
    if self.counter is not None:
      self.counter.add(classify_image_error(error), path, f"{path}: {error}")
    return np.zeros((size, size, 3), np.uint8), False

  def __call__(self, record: dict) -> dict:
    pixels, valid = self.load_image(record)
    if valid and self.counter is not None:
      self.counter.add(None)
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


def _source_seed(seed: int, i: int) -> int:
  return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def mixture_dataset(sources: Sequence, builder, *, batch_size: int, seed: int,
                    weights: Sequence[float] | None = None, num_threads: int = 4,
                    prefetch: int = 2, process_index: int | None = None,
                    process_count: int | None = None, num_workers: int = 0
                    ) -> grain.IterDataset:
  """Infinite, shuffled, mixed and batched examples of this process's share of `sources`.

  sources: random-access sources (len + [i]), e.g. WebDatasetSource, LlavaSource,
    RefCocoSource, tfds_source(...), or `mixture.TaskSource`s of them. Each is shuffled
    globally with a seed derived from (`seed`, its position) — a new permutation each epoch
    — then sliced [process_index::process_count] (defaults: jax.process_index() /
    process_count()), so the processes read disjoint samples, then repeated forever. A
    source with `presharded = True` already holds only this process's share (file-level
    sharding) and is not sliced again.
  weights: mixing proportions (default: uniform); `grain.MapDataset.mix` interleaves the
    sources deterministically in these proportions.
  builder: the map transform, normally a `transforms.SampleBuilder` (counts bad samples).
  num_threads: threads decoding + resizing + tokenizing (Pillow and sentencepiece release
    the GIL: on few cores threads beat processes).
  num_workers: > 0 moves the whole pipeline into that many worker PROCESSES (Grain
    `mp_prefetch`; each worker builds whole batches with its own `num_threads` threads) —
    for many cores, when Python work between the decodes limits the threads. Entry points
    must then be guarded by `if __name__ == "__main__"` (workers are spawned).
  The iterator's get_state()/set_state() resume exactly, with or without workers.
  """
  if not sources:
    raise ValueError("mixture_dataset needs at least one source")
  if weights is not None and len(weights) != len(sources):
    raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
  if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
    raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  parts = []
  for i, source in enumerate(sources):
    ds = grain.MapDataset.source(source).shuffle(seed=_source_seed(seed, i))
    if process_count > 1 and not getattr(source, "presharded", False):
      ds = ds[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"source {i} ({source!r}) has no samples for process {process_index} "
                       f"of {process_count}")
    parts.append(ds.repeat(None))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  # Per-EXAMPLE parallelism: the thread pool builds single examples (prefetch * batch_size of
  # them ahead), then they are batched; batching the MapDataset first would hand each thread
  # a whole batch, so few batches in flight and a slow ramp-up.
  ds = ds.map(builder).to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(1, prefetch) * batch_size))
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_workers:
    _allow_grain_workers()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return ds


def _allow_grain_workers() -> None:
  """Grain's worker processes read absl flags; outside `absl.app` (tests, notebooks) the
  flags are unparsed and Grain raises UnparsedFlagAccessError: mark them parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
