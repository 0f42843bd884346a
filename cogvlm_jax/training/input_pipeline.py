"""The training data of a run: tokenizer, sources, the Grain iterator, bad-sample totals.

`prepare_data` makes the demo data on first use and loads the tokenizer (`copy_tokenizer` puts
a copy into the workdir, so that the workdir alone is enough to chat); `training_sources`
builds the mixture's sources once per run; `training_data` wraps them in the Grain pipeline
(`cogvlm_jax.data.pipeline`) for one phase's image size and sequence length. `DataCounts`
keeps the run's bad-sample totals, which checkpoints carry across a resume.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np

from cogvlm_jax import fileio
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.mixture import MixtureError, build_mixture
from cogvlm_jax.data.pipeline import mixture_dataset
from cogvlm_jax.data.bad_samples import REASONS, BadSampleCounter, bad_reason_counts
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.tokenization import (SENTENCEPIECE_FILE, TOKENIZERS_FILE, Tokenizer,
                                     load_tokenizer)
from cogvlm_jax.training.run_config import ConfigError


def prepare_data(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig
                 ) -> tuple[Optional[str], Tokenizer]:
  """(demo data folder — generated if missing — or None, the tokenizer), checked against
  the model. The tokenizer: data.tokenizer, else the demo folder's, else train.init_from's."""
  d = config.data
  folder = None
  if d.source == "demo":
    spec = demo.DemoSpec(num_train_scenes=d.num_train_scenes,
                         num_eval_scenes=d.num_eval_scenes, image_size=d.render_size,
                         seed=d.generator_seed, vocab_size=model_cfg.vocab_size)
    try:
      folder = demo.ensure_demo_data(d.dir, spec)
    except (ValueError, FileExistsError) as e:
      raise ConfigError(f"data.dir: {e}") from e
  where = tokenizer_path(config, folder)
  try:
    tokenizer = load_tokenizer(where)
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.tokenizer: {e}") from e
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids, model.vocab_size is only "
                     f"{model_cfg.vocab_size}")
  for what in ("bos_token_id", "eos_token_id"):
    if getattr(tokenizer, what) != getattr(model_cfg, what):
      raise ConfigError(f"tokenizer {what} {getattr(tokenizer, what)} != model.{what} "
                       f"{getattr(model_cfg, what)}")
  return folder, tokenizer


def tokenizer_path(config: ml_collections.ConfigDict, folder: Optional[str]) -> str:
  """Where the run's tokenizer is: data.tokenizer, else the demo folder, else
  train.init_from (a workdir or checkpoint that carries one); ConfigError for none."""
  where = config.data.tokenizer or folder or config.train.init_from
  if not where:
    raise ConfigError("no tokenizer: set data.tokenizer (a folder with tokenizer.model or "
                      "tokenizer.json, or the file)")
  return where


# The files that make a tokenizer: the model file, and the special-token files that
# tokenization.load_tokenizer reads beside a tokenizer.json.
TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZERS_FILE, "tokenizer_config.json",
                   "special_tokens_map.json")


def copy_tokenizer(where: str, workdir: str) -> list[str]:
  """Copies the tokenizer at `where` (a folder or a tokenizer.model / tokenizer.json file)
  into `workdir`, each file atomically; returns the names written.

  A workdir is then self-contained: chat, eval.py and from_pretrained given the workdir find
  its tokenizer without being told where the training data was. A file of another name is
  stored under the standard name of its kind (by extension), as load_tokenizer looks for.
  """
  if os.path.isdir(where):
    files = {name: os.path.join(where, name) for name in TOKENIZER_FILES
             if os.path.isfile(os.path.join(where, name))}
  else:
    name = SENTENCEPIECE_FILE if where.endswith(".model") else TOKENIZERS_FILE
    files = {name: where}
  for name, src in files.items():
    dst = fileio.join(workdir, name)  # workdir may be gs://
    if fileio.resolve_path(src) != fileio.resolve_path(dst):
      fileio.write_atomic(dst, fileio.read_bytes(src), mode=0o644)
  return sorted(files)


def _data_processes(config: ml_collections.ConfigDict) -> tuple[bool, int, int]:
  """(by_rows, process index, process count) the data is split over.

  With train.host_data = "rows" (several processes) every process reads the GLOBAL batch
  stream and keeps its own rows; otherwise each process reads its own share of the samples.
  """
  by_rows = config.train.host_data == "rows" and jax.process_count() > 1
  return (by_rows, 0, 1) if by_rows else (False, jax.process_index(), jax.process_count())


def training_sources(config: ml_collections.ConfigDict, folder: Optional[str]):
  """(sources, weights) of the run's mixture (the demo's train split by default), logged.

  Built once per run: indexing shards and loading JSON is start-up work that the
  resolution switch reuses rather than repeats.
  """
  mixture = config.data.mixture
  if not mixture:
    mixture = {"demo": {"kind": "demo", "split": "train", "weight": 1.0}}
  mixture = {k: dict(v) for k, v in dict(mixture).items()}
  _, pi, pc = _data_processes(config)
  try:
    sources, weights = build_mixture(mixture, demo_folder=folder, process_index=pi,
                                     process_count=pc,
                                     max_bad_ratio=float(config.data.max_bad_ratio))
  except MixtureError as e:
    raise ConfigError(str(e)) from e
  for s, w in zip(sources, weights):
    print(f"data: {s.name} ({len(s):,} samples, weight {w / sum(weights):.2f}): "
          f"{s.source!r}", flush=True)
  return sources, weights


def training_data(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig,
                  folder: Optional[str], tokenizer: Tokenizer, max_length: int = 0,
                  sources: Optional[tuple[list, list]] = None):
  """(iterator of host batches, ExampleBuilder, keep-my-rows function) of the run's mixture.

  sources: (sources, weights) of `training_sources`, to reuse; None = build them.
  """
  t, d = config.train, config.data
  by_rows, pi, pc = _data_processes(config)
  sources, weights = sources or training_sources(config, folder)
  counter = BadSampleCounter(max_bad_ratio=d.max_bad_ratio, min_samples=d.bad_min_samples)
  builder = ExampleBuilder(tokenizer, model_cfg, max_length or d.max_length, counter=counter,
                           jpeg_draft=d.jpeg_draft)
  local_batch = t.batch_size // jax.process_count()
  ds = mixture_dataset(sources, builder, batch_size=t.batch_size if by_rows else local_batch,
                       seed=d.shuffle_seed, weights=weights, num_threads=d.num_threads,
                       prefetch=d.prefetch, process_index=pi, process_count=pc,
                       num_workers=d.num_workers)
  rows = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  local_rows = (lambda b: {k: v[rows] for k, v in b.items()}) if by_rows else (lambda b: b)
  return iter(ds), builder, local_rows


class DataCounts:
  """Samples trained on and placeholders among them, per reason, over the whole run (all
  processes; saved in the checkpoint so the totals continue after a resume)."""

  def __init__(self):
    self.counts = np.zeros(len(REASONS) + 1, np.int64)  # [samples, bad per reason...]
    self._pending = np.zeros_like(self.counts)

  def add(self, batch: Mapping[str, np.ndarray]) -> None:
    self._pending[0] += len(batch["bad_reason"])
    for reason, n in bad_reason_counts(batch).items():
      self._pending[1 + REASONS.index(reason)] += n

  def sync(self) -> None:
    """Adds every process's pending counts (a collective: all processes call it)."""
    pending = self._pending
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      pending = np.asarray(multihost_utils.process_allgather(pending)).sum(0)
    self.counts += pending
    self._pending = np.zeros_like(self.counts)

  def summary(self) -> dict:
    samples, bad = int(self.counts[0]), int(self.counts[1:].sum())
    out = {"data/samples": samples, "data/bad_samples": bad,
           "data/bad_ratio": bad / samples if samples else 0.0}
    out.update({f"data/bad/{r}": int(n) for r, n in zip(REASONS, self.counts[1:]) if n})
    return out
