"""The Grain input pipelines: records -> model-ready batches with static shapes.

Training (`mixture_dataset`): the run's sources (LAION-style shards, LLaVA, RefCOCO, TFDS, the
demo; see `cogvlm_jax.data.mixture` for how a config names them) — each globally shuffled
with its own seed, sliced per process (`jax.process_index()` / `process_count()`), repeated,
mixed by weight (`MapDataset.mix`), then decoded / resized / tokenized by an
`examples.ExampleBuilder` in a thread pool (or worker processes), batched and prefetched.
Bad samples become counted placeholders (see `cogvlm_jax.data.bad_samples`). The iterator
state is saved in the training checkpoint (`grain.checkpoint`) and restored exactly.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import grain
import numpy as np

from cogvlm_jax.data import worker_shm


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
  builder: the map transform, normally an `examples.ExampleBuilder` (counts bad samples).
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
    # Shared memory named by this run, and what killed earlier runs left removed.
    worker_shm.remove_dead_runs_memory()
    worker_shm.name_semaphores()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch)),
                        worker_init_fn=functools.partial(worker_shm.name_worker_memory,
                                                         os.getpid()))
  return ds


def _allow_grain_workers() -> None:
  """Grain's worker processes read absl flags; outside `absl.app` (tests, notebooks) the
  flags are unparsed and Grain raises UnparsedFlagAccessError: mark them parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
