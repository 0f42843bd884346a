"""The training loop: data, state, compiled step, logging, checkpoints, final evaluation.

`train_and_evaluate(config, workdir)` is what `train.py` runs:

1. checks the settings (before anything is compiled), prepares the tokenizer and the data:
   the demo data (generated on first use) or the sources of `data.mixture`
   (`cogvlm_jax.data.mixture`), read through the Grain pipeline;
2. restores the latest checkpoint of `workdir/checkpoints` — params, optimizer state, step,
   rng, the data iterator position and the bad-sample counts — or initialises a fresh state
   (`train.init_from`: starting weights);
3. compiles the train step ahead of time and runs it, logging one line per `log_every` steps
   (also appended to `workdir/metrics.jsonl`) and saving every `checkpoint_every` steps and at
   the end; rerunning the same command resumes where the last checkpoint left off and gives
   the same losses as an uninterrupted run. With `train.resolution_switch` (CogVLM stage 2)
   the run changes image size at a given step: the frozen ViT position table is resized and
   the step recompiled;
4. on the demo data, evaluates on the held-out split: teacher-forced loss per task and
   greedy-decoded answers (VQA exact match, caption exact match, grounding box IoU), written
   to `workdir/metrics.jsonl` and `workdir/eval.json` (other data: eval.py).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping, Optional

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cogvlm_jax.batch_layout import HOST_ONLY_KEYS
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.mixture import MixtureError, build_mixture, check_spec
from cogvlm_jax.data.pipeline import ExampleBuilder, eval_batches, mixture_dataset
from cogvlm_jax.data.transforms import (REASONS, BadSampleCounter,
                                        SampleBuilder, bad_reason_counts)
from cogvlm_jax.image_processing import normalize_image
from cogvlm_jax.sharding import make_mesh
from cogvlm_jax.tokenization import Tokenizer, load_tokenizer
from cogvlm_jax.training.state import (RECIPES, TrainSetup, TrainState, all_weights,
                                       build_setup, init_train_state, merge_dicts,
                                       model_from_state, split_dict)
from cogvlm_jax.training.flops import device_peak_flops, train_step_flops
from cogvlm_jax.training.step import (abstract_batch, compile_eval_step, compile_train_step,
                                      put_batch)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TENSORBOARD_DIR = "tensorboard"

# Defaults of the train.* settings added after the first configs (older configs lack them).
TRAIN_DEFAULTS = dict(
    max_nan_steps=10,  # stop after this many steps with a non-finite loss / gradient norm
    grad_accum_steps=1,  # microbatches per step (gradient accumulation in a lax.scan)
    z_loss=0.0,  # weight of the z-loss (mean logsumexp^2 of the logits); 0 = off
    peak_flops_per_device=0.0,  # for MFU; 0 = data-sheet peak (TPU/GPU) or measured (CPU)
    tensorboard=True,  # also write TensorBoard event files to workdir/tensorboard
    frozen_dtype="",  # dtype of the frozen weights ("bfloat16"); "" = model.param_dtype
    init_from="",  # weights to start from (HF folder, converted checkpoint or a workdir)
    # How hosts split the data: "records" (each reads its own shard of the records: the
    # batches depend on the process count) or "rows" (each reads the global batch stream and
    # keeps its rows: the same batches, so the same losses, for any process count; each host
    # decodes the whole batch, fine for small data and for tests).
    host_data="records",
    # CogVLM stage 2's mid-run resolution switch: dict(step=N, image_size=490,
    # max_length=..., grad_accum_steps=...) trains steps N+1.. at the new image size (ViT
    # position table resized bicubically); None / step 0 = off.
    resolution_switch=None,
)

# Defaults of the data.* settings of the general pipeline (older configs lack them).
DATA_DEFAULTS = dict(
    source="demo",  # "demo": generate the demo data in data.dir; "mixture": data.mixture only
    mixture=None,  # {name: source spec}, see cogvlm_jax.data.mixture; demo default: its train split
    tokenizer="",  # folder / tokenizer.model / tokenizer.json ("" = data.dir or train.init_from)
    num_workers=0,  # > 0: decode in that many worker processes (Grain mp_prefetch)
    max_bad_ratio=0.1,  # stop when more than this share of the samples is bad ...
    bad_min_samples=500,  # ... once this many samples have been built
    jpeg_draft=False,  # faster JPEG decoding at reduced DCT scale (pixels differ slightly)
)



def train_setting(config: ml_collections.ConfigDict, name: str):
  return config.train.get(name, TRAIN_DEFAULTS[name])


def data_setting(config: ml_collections.ConfigDict, name: str):
  return config.data.get(name, DATA_DEFAULTS[name])


class NonFiniteLossError(FloatingPointError):
  """Too many steps had a non-finite loss or gradient norm (their updates were skipped)."""


class ConfigError(ValueError):
  """A setting that cannot work; raised before anything is compiled."""


def log(msg: str) -> None:
  print(msg, flush=True)


# ---- settings --------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig, mesh) -> None:
  """Raises ValueError naming the setting when the run cannot work; nothing is compiled yet."""
  t, d = config.train, config.data
  if config.recipe not in RECIPES:
    raise ConfigError(f"recipe must be one of {RECIPES}, got {config.recipe!r}")
  v = model_cfg.vision
  if v.image_size % v.patch_size:
    raise ConfigError(f"model.vision.image_size ({v.image_size}) must be a multiple of "
                     f"model.vision.patch_size ({v.patch_size})")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, size in (("train.batch_size", t.batch_size), ("eval.batch_size",
                                                         config.eval.batch_size)):
    if size <= 0 or size % dp:
      raise ConfigError(f"{name} ({size}) must be a positive multiple of the data-parallel "
                       f"mesh size data*fsdp = {dp} (mesh {dict(mesh.shape)})")
    if size % jax.process_count():
      raise ConfigError(f"{name} ({size}) must divide over {jax.process_count()} processes")
  for name in ("steps", "log_every", "checkpoint_every"):
    if t[name] <= 0:
      raise ConfigError(f"train.{name} must be positive, got {t[name]}")
  accum = train_setting(config, "grad_accum_steps")
  if accum <= 0 or (t.batch_size // max(dp, 1)) % accum:
    raise ConfigError(f"train.grad_accum_steps ({accum}) must be positive and divide the "
                     f"per-device batch train.batch_size / (data*fsdp) = {t.batch_size} / {dp}")
  if train_setting(config, "max_nan_steps") <= 0:
    raise ConfigError("train.max_nan_steps must be positive")
  training_phases(config, model_cfg, dp)  # checks the resolution switch
  if d.max_length < model_cfg.image_span_length + 3:
    raise ConfigError(f"data.max_length ({d.max_length}) cannot hold BOS, the image span "
                     f"({model_cfg.image_span_length} tokens) and any text")
  source = data_setting(config, "source")
  if source not in ("demo", "mixture"):
    raise ConfigError(f"data.source must be 'demo' or 'mixture', got {source!r}")
  if source == "mixture" and not data_setting(config, "mixture"):
    raise ConfigError("data.source='mixture' needs data.mixture ({name: source spec})")
  for name, spec in (data_setting(config, "mixture") or {}).items():
    try:
      check_spec(name, dict(spec))
    except MixtureError as e:
      raise ConfigError(str(e)) from e
  if data_setting(config, "num_workers") < 0:
    raise ConfigError("data.num_workers must be >= 0")
  if not 0.0 <= data_setting(config, "max_bad_ratio") <= 1.0:
    raise ConfigError("data.max_bad_ratio must be in [0, 1]")


def resolve_config(config: ml_collections.ConfigDict):
  """(model config, mesh) of a run config, validated; ConfigError names what is wrong."""
  try:
    model_cfg = CogVLMConfig.from_dict(config.model)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from e
  try:
    mesh = make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from e
  validate_config(config, model_cfg, mesh)
  return model_cfg, mesh


def prepare_data(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig
                 ) -> tuple[Optional[str], Tokenizer]:
  """(demo data folder — generated if missing — or None, the tokenizer), checked against
  the model. The tokenizer: data.tokenizer, else the demo folder's, else train.init_from's."""
  d = config.data
  folder = None
  if data_setting(config, "source") == "demo":
    spec = demo.DemoSpec(num_train_scenes=d.num_train_scenes,
                         num_eval_scenes=d.num_eval_scenes, image_size=d.render_size,
                         seed=d.generator_seed, vocab_size=model_cfg.vocab_size)
    try:
      folder = demo.ensure_demo_data(d.dir, spec)
    except (ValueError, FileExistsError) as e:
      raise ConfigError(f"data.dir: {e}") from e
  where = data_setting(config, "tokenizer") or folder or train_setting(config, "init_from")
  if not where:
    raise ConfigError("no tokenizer: set data.tokenizer (a folder with tokenizer.model or "
                      "tokenizer.json, or the file)")
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


def _data_processes(config: ml_collections.ConfigDict) -> tuple[bool, int, int]:
  """(by_rows, process index, process count) the data is split over.

  With train.host_data = "rows" (several processes) every process reads the GLOBAL batch
  stream and keeps its own rows; otherwise each process reads its own share of the samples.
  """
  host_data = train_setting(config, "host_data")
  if host_data not in ("records", "rows"):
    raise ConfigError(f"train.host_data must be 'records' or 'rows', got {host_data!r}")
  by_rows = host_data == "rows" and jax.process_count() > 1
  return (by_rows, 0, 1) if by_rows else (False, jax.process_index(), jax.process_count())


def training_sources(config: ml_collections.ConfigDict, folder: Optional[str]):
  """(sources, weights) of the run's mixture (the demo's train split by default), logged.

  Built once per run: indexing shards and loading JSON is start-up work that the
  resolution switch reuses rather than repeats.
  """
  mixture = data_setting(config, "mixture")
  if not mixture:
    mixture = {"demo": {"kind": "demo", "split": "train", "weight": 1.0}}
  mixture = {k: dict(v) for k, v in dict(mixture).items()}
  _, pi, pc = _data_processes(config)
  try:
    sources, weights = build_mixture(mixture, demo_folder=folder, process_index=pi,
                                     process_count=pc)
  except MixtureError as e:
    raise ConfigError(str(e)) from e
  for s, w in zip(sources, weights):
    log(f"data: {s.name} ({len(s):,} samples, weight {w / sum(weights):.2f}): {s.source!r}")
  return sources, weights


def training_data(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig,
                  folder: Optional[str], tokenizer: Tokenizer, max_length: int = 0,
                  sources: Optional[tuple[list, list]] = None):
  """(iterator of host batches, SampleBuilder, keep-my-rows function) of the run's mixture.

  sources: (sources, weights) of `training_sources`, to reuse; None = build them.
  """
  t, d = config.train, config.data
  by_rows, pi, pc = _data_processes(config)
  sources, weights = sources or training_sources(config, folder)
  counter = BadSampleCounter(max_bad_ratio=data_setting(config, "max_bad_ratio"),
                             min_samples=data_setting(config, "bad_min_samples"))
  builder = SampleBuilder(tokenizer, model_cfg, max_length or d.max_length, counter=counter,
                          jpeg_draft=data_setting(config, "jpeg_draft"))
  local_batch = t.batch_size // jax.process_count()
  ds = mixture_dataset(sources, builder, batch_size=t.batch_size if by_rows else local_batch,
                       seed=d.shuffle_seed, weights=weights, num_threads=d.num_threads,
                       prefetch=d.prefetch, process_index=pi, process_count=pc,
                       num_workers=data_setting(config, "num_workers"))
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


# ---- phases: CogVLM stage 2's 224 -> 490 switch -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps start+1.. trained with one image size (and its sequence length / microbatches)."""

  start: int  # the step count when the phase begins
  model_config: CogVLMConfig
  max_length: int
  grad_accum_steps: int


def training_phases(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig,
                    dp: int = 1) -> list[Phase]:
  """The run's phases: one, or two with `train.resolution_switch`; ConfigError if unusable.

  The switch changes only the ViT's input size: the position table is resized, every other
  weight and the optimizer state carry over. So the ViT must be frozen (stage 1 / 2 recipes):
  a trainable table would have Adam moments of the old shape.
  """
  accum = int(train_setting(config, "grad_accum_steps"))
  phases = [Phase(0, model_cfg, int(config.data.max_length), accum)]
  switch = train_setting(config, "resolution_switch")
  if not switch or not switch.get("step"):
    return phases
  switch = dict(switch)
  unknown = set(switch) - {"step", "image_size", "max_length", "grad_accum_steps"}
  if unknown:
    raise ConfigError(f"train.resolution_switch: unknown field(s) {sorted(unknown)}")
  step = int(switch["step"])
  if not 0 < step < config.train.steps:
    raise ConfigError(f"train.resolution_switch.step ({step}) must be in 1..train.steps-1 "
                      f"({config.train.steps - 1})")
  if config.recipe in ("full", "sft"):
    raise ConfigError(f"train.resolution_switch needs a frozen ViT (recipe stage1 / stage2), "
                      f"not recipe {config.recipe!r}")
  size = int(switch.get("image_size", model_cfg.vision.image_size))
  if size % model_cfg.vision.patch_size:
    raise ConfigError(f"train.resolution_switch.image_size ({size}) must be a multiple of "
                      f"model.vision.patch_size ({model_cfg.vision.patch_size})")
  new_cfg = dataclasses.replace(model_cfg,
                                vision=dataclasses.replace(model_cfg.vision, image_size=size))
  max_length = int(switch.get("max_length", config.data.max_length))
  if max_length < new_cfg.image_span_length + 3:
    raise ConfigError(f"train.resolution_switch.max_length ({max_length}) cannot hold BOS, "
                      f"the {size} px image span ({new_cfg.image_span_length} tokens) and text")
  new_accum = int(switch.get("grad_accum_steps", accum))
  if new_accum <= 0 or (config.train.batch_size // max(dp, 1)) % new_accum:
    raise ConfigError(f"train.resolution_switch.grad_accum_steps ({new_accum}) must divide "
                      f"the per-device batch {config.train.batch_size} / {dp}")
  return phases + [Phase(step, new_cfg, max_length, new_accum)]


def phase_at(phases: list[Phase], step: int) -> Phase:
  """The phase that trains step `step` + 1 (0-based: the loop's `step`)."""
  return [p for p in phases if p.start <= step][-1]


def phase_of_state(phases: list[Phase], steps_done: int) -> Phase:
  """The phase whose shapes the state after `steps_done` steps has: the phase of the last
  step trained (a checkpoint saved right at the switch still has the old image size)."""
  return phase_at(phases, max(steps_done - 1, 0))


def switch_resolution(state: TrainState, old: TrainSetup, new: TrainSetup) -> TrainState:
  """`state` of `old` moved to `new` (another image size): the frozen ViT position table
  resized, everything else carried over as it is (same shapes and shardings)."""
  from cogvlm_jax import checkpoint

  if jax.tree.map(lambda a: (a.shape, a.dtype), old.abstract.params) != jax.tree.map(
      lambda a: (a.shape, a.dtype), new.abstract.params):
    raise ConfigError("train.resolution_switch changes a trainable weight's shape; only the "
                      "frozen ViT position table may change")
  used: set = set()
  frozen = fit_weights(new.abstract.frozen, checkpoint.flatten(state.frozen), used,
                       "train.resolution_switch")
  return state.replace(frozen=frozen)


# ---- checkpoints -----------------------------------------------------------------------


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_checkpoints, create=True,
      enable_async_checkpointing=config.train.async_checkpoint)
  return ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), options=options)


def checkpoint_config(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig) -> dict:
  """The run config as stored with a checkpoint, its "model" the model of the saved weights
  (after a resolution switch: the new image size; the run's own model is kept as
  "run_model", which resuming compares)."""
  stored = json.loads(config.to_json_best_effort())
  model = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
  if model != stored["model"]:
    stored["run_model"], stored["model"] = stored["model"], model
  return stored


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iter,
                    config: ml_collections.ConfigDict, data_counts: DataCounts,
                    model_cfg: CogVLMConfig) -> None:
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(all_weights(state)),
      opt_state=ocp.args.StandardSave(state.opt_state),
      progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                      "data_counts": data_counts.counts.copy()}),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(checkpoint_config(config, model_cfg)),
  ), force=True)


# Model fields that change how the model runs, not its parameters: may differ on resume.
_RUNTIME_MODEL_FIELDS = ("dtype", "attention_backend", "remat_policy", "scan_layers")


def check_resumable(manager: ocp.CheckpointManager, step: int,
                    config: ml_collections.ConfigDict) -> None:
  """ConfigError unless the checkpoint at `step` was made with the same recipe and model."""
  item = epath.Path(manager.directory) / str(step) / "config"
  try:
    stored = ocp.JsonCheckpointHandler().restore(item)
  except (FileNotFoundError, ValueError):
    return  # no config item: nothing to compare (the restore itself checks structure)
  ours = json.loads(config.to_json_best_effort())
  problems = []
  if stored.get("recipe") != ours["recipe"]:
    problems.append(f"recipe {stored.get('recipe')!r} != {ours['recipe']!r}")
  stored_model, model = stored.get("run_model", stored.get("model", {})), ours["model"]
  for key in sorted(set(stored_model) | set(model)):
    if key not in _RUNTIME_MODEL_FIELDS and stored_model.get(key) != model.get(key):
      problems.append(f"model.{key} {stored_model.get(key)!r} != {model.get(key)!r}")
  for section, key in _STREAM_SETTINGS:
    theirs = _stream_view(stored.get(section, {}).get(key))
    mine = _stream_view(ours.get(section, {}).get(key))
    if theirs != mine:
      problems.append(f"{section}.{key} {theirs!r} != {mine!r}")
  if problems:
    raise ConfigError(f"{manager.directory} holds step {step} of a different run ("
                      f"{'; '.join(problems)}); use a new --workdir (train.init_from=<that "
                      f"workdir> starts from its weights)")


# Settings that decide which samples each step sees: a resume with other values would not
# continue the same data stream (dataset LOCATIONS may change: data moves between buckets).
_STREAM_SETTINGS = (("data", "source"), ("data", "mixture"), ("data", "shuffle_seed"),
                    ("data", "num_workers"), ("train", "batch_size"),
                    ("train", "resolution_switch"))
_LOCATION_FIELDS = ("paths", "json", "images", "index_dir", "data_dir")


def _stream_view(value):
  """A setting as compared on resume: mixture specs without their locations."""
  if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
    return {name: {k: v for k, v in spec.items() if k not in _LOCATION_FIELDS}
            for name, spec in value.items()}
  return value


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, setup: TrainSetup,
                       data_iter, data_counts: DataCounts) -> TrainState:
  """The state saved at `step`, every array placed with its sharding; sets `data_iter`
  and `data_counts`."""
  a = setup.abstract
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(merge_dicts(a.params, a.frozen)),
        opt_state=ocp.args.StandardRestore(a.opt_state),
        progress=ocp.args.StandardRestore({"step": a.step, "rng": a.rng,
                                           "data_counts": data_counts.counts}),
        data=grain.checkpoint.CheckpointRestore(data_iter),
    ))
  except (ValueError, KeyError, TypeError) as e:  # Orbax: a tree that does not match ours
    raise ConfigError(
        f"cannot resume from {manager.directory}/{step}: its contents do not match this "
        f"run's state (a checkpoint of an older cogvlm_jax, or of other settings): "
        f"{type(e).__name__}: {str(e)[:300]}. Use a new --workdir; train.init_from=<that "
        f"workdir> starts from its weights") from e
  params, frozen = split_dict(restored.params, a.params)
  data_counts.counts = np.asarray(restored.progress["data_counts"], np.int64)
  return TrainState(step=restored.progress["step"], params=params, frozen=frozen,
                    opt_state=restored.opt_state, rng=restored.progress["rng"])


# ---- starting weights ------------------------------------------------------------------


def resize_position_embedding(table: np.ndarray, num_positions: int) -> np.ndarray:
  """ViT position table [1 + g^2, C] -> [num_positions, C]: CLS row kept, the g x g grid
  resized bicubically (CogVLM's 224 -> 490 switch: 257 -> 1226 rows)."""
  g_old, g_new = math.isqrt(table.shape[0] - 1), math.isqrt(num_positions - 1)
  if g_old**2 + 1 != table.shape[0] or g_new**2 + 1 != num_positions:
    raise ConfigError(f"cannot resize a position table of {table.shape[0]} rows to "
                      f"{num_positions}: not 1 + a square grid")
  grid = jnp.asarray(table[1:], jnp.float32).reshape(g_old, g_old, -1)
  grid = jax.image.resize(grid, (g_new, g_new, grid.shape[-1]), "bicubic")
  return np.concatenate([np.asarray(table[:1], np.float32),
                         np.asarray(grid).reshape(g_new * g_new, -1)]).astype(table.dtype)


def fit_weights(tree, flat: Mapping[tuple, Any], used: set, what: str):
  """`tree` (arrays or ShapeDtypeStructs) with each leaf found in `flat` (by path) put in
  its place: cast to the leaf's dtype, placed with its sharding; a ViT position table of
  another size is resized (`resize_position_embedding`); other leaves are kept. Adds the
  paths used to `used`; ConfigError (prefixed by `what`) for any other shape mismatch."""
  def one(keys, x):
    key = tuple(str(getattr(k, "key", k)) for k in keys)
    if key not in flat:
      return x
    value = flat[key]
    if value.shape != x.shape:
      if key[-1] == "position_embedding" and key[0] == "vision":
        value = resize_position_embedding(np.asarray(jax.device_get(value)), x.shape[0])
      else:
        raise ConfigError(f"{what}: {'/'.join(key)} has shape {value.shape}, the model "
                          f"needs {x.shape}")
    used.add(key)
    return jax.device_put(jnp.asarray(value, x.dtype), x.sharding)
  return jax.tree_util.tree_map_with_path(one, tree)


def load_initial_weights(state: TrainState, setup: TrainSetup, path: str) -> TrainState:
  """`state` (fresh, step 0) with every weight found at `path` replacing the random init.

  `path`: a Hugging Face CogVLM folder, a converted checkpoint or a training run (workdir or
  step dir), read with `cogvlm_jax.checkpoint.load_params` / `pretrained.from_pretrained`.
  A checkpoint of another image size (stage 2's 224 -> 490 switch) has its ViT position
  table resized. Weights are cast to the state's dtypes and placed with its shardings; the
  optimizer state stays fresh.
  """
  from flax import nnx

  from cogvlm_jax import checkpoint, pretrained
  from cogvlm_jax.convert.stream import CheckpointMismatch

  cfg = setup.model_config
  t0 = time.perf_counter()
  if pretrained.is_hf_folder(path):
    model = pretrained.from_pretrained(path, mesh=setup.mesh, scan_layers=cfg.scan_layers)
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  else:
    try:
      loaded = checkpoint.load_params(path, cfg, mesh=setup.mesh)
    except CheckpointMismatch:  # e.g. another image size: read as stored, fix up below
      loaded = checkpoint.load_params(path)
  flat = checkpoint.flatten(loaded)
  used: set = set()
  params = fit_weights(state.params, flat, used, f"train.init_from: {path}")
  frozen = fit_weights(state.frozen, flat, used, f"train.init_from: {path}")
  missing = [k for k, _ in checkpoint.flatten(all_weights(state)).items()
             if k not in used and k[-1] != "inv_freq"]
  if missing:
    raise ConfigError(f"train.init_from: {path} lacks {len(missing)} weights the model has, "
                      f"e.g. {'/'.join(missing[0])}")
  log(f"initialised {len(used)} weights from {path} in {time.perf_counter() - t0:.1f}s")
  return state.replace(params=params, frozen=frozen)


# ---- metrics ---------------------------------------------------------------------------


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl and writes the numbers as
  TensorBoard scalars to workdir/tensorboard (process 0 only; TensorBoard needs
  `tensorboardX`, skipped with a note when it is not installed)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    self.tb = None
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        log("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl only)")
      else:
        self.tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      step = int(record["step"])
      for prefix, values in (("train", record), ("eval", record.get("eval") or {})):
        for k, v in values.items():
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None


class PreemptionFlag:
  """Set by SIGTERM (while installed, on the main thread): the loop then saves and exits.

  With several processes the flags are combined (any process preempted -> all stop at the
  same step) every `sync_every` steps, so that all processes save the same step.
  """

  def __init__(self):
    self.set = False
    self._previous = None

  def _handler(self, signum, frame):
    self.set = True
    log(f"received signal {signum}: saving a checkpoint after this step, then exiting")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.set
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.set))))


def _summarise(host: list[dict], elapsed: float, batch_size: int, flops_per_step: float,
               peak_flops: float) -> dict:
  """Means over the interval's steps; loss and grad norm over the finite (applied) ones."""
  n = len(host)
  good = [m for m in host if not float(m["nonfinite"])] or host
  tokens = sum(float(m["tokens"]) for m in host)
  loss_tokens = sum(float(m["loss_tokens"]) for m in host)
  step_time = elapsed / n
  out = {
      "loss": sum(float(m["loss"]) for m in good) / len(good),
      "last_loss": float(host[-1]["loss"]),
      "lr": float(host[-1]["lr"]),
      "grad_norm": sum(float(m["grad_norm"]) for m in good) / len(good),
      "tokens_per_s": tokens / elapsed,
      "loss_tokens_per_step": loss_tokens / n,
      "images_per_s": n * batch_size / elapsed,
      "step_time_ms": 1000 * step_time,
      "skipped_steps": int(sum(float(m["nonfinite"]) for m in host)),
      "tflops_per_s": flops_per_step / step_time / 1e12,
      "mfu": flops_per_step / step_time / peak_flops if peak_flops else float("nan"),
  }
  if any(float(m["z_loss"]) for m in host):
    out["z_loss"] = sum(float(m["z_loss"]) for m in good) / len(good)
  return out


# ---- the loop --------------------------------------------------------------------------


def _close(writer: MetricsWriter, manager: ocp.CheckpointManager) -> None:
  """Flushes the metrics and waits for the checkpoint being written."""
  writer.close()
  manager.wait_until_finished()
  manager.close()


def _close_iterator(data_iter) -> None:
  """Stops the iterator's threads / worker processes now rather than at interpreter exit."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None, evaluate_at_end: bool = True
                       ) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates.

  Args:
    config: the run config (see configs/demo.py).
    workdir: checkpoints, metrics.jsonl and eval.json go here.
    stop_after_steps: stop (after saving a checkpoint) once this global step is reached, as
      if the job had been preempted; rerunning resumes. For tests and experiments.
    evaluate_at_end: run the held-out evaluation when training is done.
  Returns:
    {"steps": last step, "losses": {step: loss} of the steps run here, "eval": results}.
  """
  run_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  model_cfg, mesh = resolve_config(config)
  t = config.train
  total_steps = int(t.steps)

  os.makedirs(workdir, exist_ok=True)
  folder, tokenizer = prepare_data(config, model_cfg)
  phases = training_phases(config, model_cfg, mesh.shape["data"] * mesh.shape["fsdp"])
  manager = checkpoint_manager(workdir, config)
  latest = manager.latest_step()
  phase = phase_of_state(phases, latest or 0)

  def make_setup(phase: Phase) -> TrainSetup:
    return build_setup(phase.model_config, config.recipe, config.optim, total_steps, mesh,
                       seed=config.seed,
                       frozen_dtype=train_setting(config, "frozen_dtype") or None)

  setup = make_setup(phase)
  trainable, total = setup.num_params()
  log(f"model: {total:,} params, {trainable:,} trainable (recipe {config.recipe!r}); "
      f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.default_backend()} device(s)")

  sources = training_sources(config, folder)
  data_iter, builder, local_rows = training_data(config, phase.model_config, folder,
                                                 tokenizer, phase.max_length, sources)
  data_counts = DataCounts()
  if latest is not None:
    check_resumable(manager, latest, config)
    state = restore_checkpoint(manager, latest, setup, data_iter, data_counts)
    log(f"resumed from {manager.directory} at step {latest}")
  else:
    state = init_train_state(setup, config.seed)
    if train_setting(config, "init_from"):
      state = load_initial_weights(state, setup, train_setting(config, "init_from"))
  start = int(jax.device_get(state.step))

  losses: dict[int, float] = {}
  writer = MetricsWriter(workdir, train_setting(config, "tensorboard"))
  end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
  max_nan = int(train_setting(config, "max_nan_steps"))
  z_loss = float(train_setting(config, "z_loss"))
  peak, peak_source = device_peak_flops(float(train_setting(config, "peak_flops_per_device")))
  skipped = 0
  preempted = False

  def compile_phase(setup: TrainSetup, builder: SampleBuilder, phase: Phase):
    """(compiled train step, batch spec, FLOPs per step) of a phase; logs what it compiled."""
    t0 = time.perf_counter()
    example = {k: v for k, v in builder.placeholder().items() if k not in HOST_ONLY_KEYS}
    batch_spec = abstract_batch(setup, {k: np.stack([v] * t.batch_size)
                                        for k, v in example.items()})
    accum = phase.grad_accum_steps
    step_fn = compile_train_step(setup, batch_spec, microbatches=accum, z_loss=z_loss)
    flops = train_step_flops(setup, batch_spec)
    last = min(end, *[p.start for p in phases if p.start > phase.start] or [end])
    log(f"compiled the train step in {time.perf_counter() - t0:.1f}s; training steps "
        f"{max(start, phase.start) + 1}..{last} of {total_steps} (batch {t.batch_size}"
        f"{f' in {accum} microbatches' if accum > 1 else ''}, seq {phase.max_length}, "
        f"images {phase.model_config.vision.image_size} px); {flops / 1e9:.3g} GFLOPs per "
        f"step; MFU relative to {peak / 1e9:.4g} GFLOP/s ({peak_source})")
    return step_fn, batch_spec, flops

  try:
    if start < end:
      train_step, batch_spec, flops = compile_phase(setup, builder, phase)
      pending: list[dict] = []
      interval_start = time.perf_counter()
      with PreemptionFlag() as preemption:
        for step in range(start, end):
          if phase_at(phases, step) is not phase:  # the resolution switch
            phase = phase_at(phases, step)
            new_setup = make_setup(phase)
            state = switch_resolution(state, setup, new_setup)
            setup = new_setup
            position = data_iter.get_state()  # continue the same sample stream, new size
            _close_iterator(data_iter)
            data_iter, builder, local_rows = training_data(config, phase.model_config, folder,
                                                           tokenizer, phase.max_length, sources)
            data_iter.set_state(position)
            log(f"step {step}: switching to {phase.model_config.vision.image_size} px images")
            train_step, batch_spec, flops = compile_phase(setup, builder, phase)
            interval_start = time.perf_counter()
          host_batch = local_rows(next(data_iter))  # BadDataError: too many bad samples
          data_counts.add(host_batch)
          state, metrics = train_step(state, put_batch(host_batch, batch_spec))
          pending.append(metrics)
          done = step + 1
          sync = jax.process_count() == 1 or done % t.log_every == 0
          preempted = sync and preemption.any_process()
          if done % t.log_every == 0 or done == end or preempted:
            host = jax.device_get(pending)
            for i, m in enumerate(host):
              losses[done - len(host) + i + 1] = float(m["loss"])
            summary = _summarise(host, time.perf_counter() - interval_start, t.batch_size,
                                 flops, peak)
            skipped += summary["skipped_steps"]
            summary["skipped_steps_total"] = skipped
            data_counts.sync()
            summary.update(data_counts.summary())
            log(f"step {done:5d} | loss {summary['loss']:.4f} | lr {summary['lr']:.2e} | "
                f"grad_norm {summary['grad_norm']:.3f} | {summary['tokens_per_s']:,.0f} tok/s | "
                f"{summary['images_per_s']:.1f} img/s | {summary['step_time_ms']:.1f} ms/step | "
                f"MFU {summary['mfu']:.1%}"
                + (f" | skipped {summary['skipped_steps']} non-finite" if summary['skipped_steps']
                   else "")
                + (f" | bad samples {summary['data/bad_samples']} of {summary['data/samples']}"
                   if summary["data/bad_samples"] else ""))
            writer.write({"step": done, **summary})
            pending = []
            interval_start = time.perf_counter()
            if skipped >= max_nan:
              raise NonFiniteLossError(
                  f"stopping at step {done}: {skipped} steps had a non-finite loss or gradient "
                  f"norm (train.max_nan_steps = {max_nan}); their updates were skipped. The "
                  f"last checkpoint in {manager.directory} predates them. Lower optim.lr, "
                  f"raise optim.warmup_steps or check the data, then rerun to resume.")
          if done % t.checkpoint_every == 0 or done == end or preempted:
            t_save = time.perf_counter()
            data_counts.sync()  # the counts saved are those of the steps saved (a collective)
            save_checkpoint(manager, state, data_iter, config, data_counts, setup.model_config)
            interval_start += time.perf_counter() - t_save  # keep saving out of the step time
          if preempted:
            log(f"preempted: saved step {done}; rerun the same command to resume")
            break
  except BaseException:
    # Any failure (bad data, non-finite losses, Ctrl-C, a bug): stop the data threads /
    # worker processes, flush the metrics and finish the checkpoint being written.
    _close(writer, manager)
    _close_iterator(data_iter)
    raise
  _close(writer, manager)
  _close_iterator(data_iter)
  if losses:
    first, last = min(losses), max(losses)
    log(f"trained steps {first}..{last}: loss {losses[first]:.4f} -> {losses[last]:.4f}")
  step_reached = int(jax.device_get(state.step))
  result = {"steps": step_reached, "losses": losses, "eval": None, "preempted": preempted,
            "skipped_steps": skipped, "data": data_counts.summary()}
  finished = step_reached >= total_steps and not preempted
  if evaluate_at_end and finished and folder is None:
    log("no held-out evaluation in train.py for data.source='mixture': run eval.py with "
        f"a configs/eval/ config and --config.checkpoint={workdir}")
  elif evaluate_at_end and finished:
    t0 = time.perf_counter()
    result["eval"] = evaluate(setup, state, folder, tokenizer, config,
                              demo.load_records(folder, "train"), max_length=phase.max_length)
    result["eval"]["eval_time_s"] = time.perf_counter() - t0
    writer = MetricsWriter(workdir, train_setting(config, "tensorboard"))
    writer.write({"step": step_reached, "eval": result["eval"]})
    writer.close()
    if jax.process_index() == 0:
      with open(os.path.join(workdir, EVAL_FILE), "w") as f:
        json.dump(result["eval"], f, indent=2)
    log_eval(result["eval"])
  log(f"done in {time.perf_counter() - run_start:.0f}s (workdir {workdir})")
  return result


# ---- evaluation ------------------------------------------------------------------------


def _normalise_answer(text: str) -> str:
  return " ".join(text.strip().lower().rstrip(".").split())


def _majority_baseline(train_records, eval_records) -> dict:
  """Accuracy of always giving the most common training answer of each VQA question type."""
  by_type = collections.defaultdict(collections.Counter)
  for r in train_records:
    if r["task"] == "vqa":
      by_type[r.get("question_type", "")][_normalise_answer(r["answer"])] += 1
  hits = [by_type[r.get("question_type", "")].most_common(1)[0][0]
          == _normalise_answer(r["answer"]) for r in eval_records if r["task"] == "vqa"]
  return {"vqa_majority_baseline": float(np.mean(hits)) if hits else float("nan")}


def evaluate(setup: TrainSetup, state: TrainState, folder: str, tokenizer: Tokenizer,
             config: ml_collections.ConfigDict, train_records=None,
             max_length: Optional[int] = None) -> dict:
  """Held-out loss per task and greedy-decoded accuracy.

  vqa: exact match (case/space-insensitive), overall and per question type; caption: exact
  match; grounding: IoU of the decoded [[x0,y0,x1,y1]] box with the true one (mean, and the
  fraction >= 0.5).
  """
  from cogvlm_jax.generate import generate

  e = config.eval
  model_cfg = setup.model_config
  records = demo.load_records(folder, "eval")
  by_task = collections.defaultdict(list)
  for r in records:
    by_task[r["task"]].append(r)
  if e.max_examples_per_task:
    by_task = {k: v[:e.max_examples_per_task] for k, v in by_task.items()}

  max_length = max_length or config.data.max_length
  loss_builder = ExampleBuilder(folder, tokenizer, model_cfg, max_length)
  prompt_builder = ExampleBuilder(folder, tokenizer, model_cfg, max_length,
                                  with_answer=False, left_pad=True)
  example = loss_builder(records[0])
  spec = abstract_batch(setup, {**{k: np.stack([v] * e.batch_size) for k, v in example.items()},
                                "example_valid": np.ones((e.batch_size,), bool)})
  eval_step = compile_eval_step(setup, spec)
  model = model_from_state(setup, state)

  results: dict[str, Any] = {}
  all_total = all_count = 0.0
  samples = []
  for task in sorted(by_task):
    recs = by_task[task]
    total = count = 0.0
    for batch, _ in eval_batches(recs, loss_builder, batch_size=e.batch_size,
                                 num_threads=config.data.num_threads):
      s, c = eval_step(state, put_batch(batch, spec))
      total += float(s)
      count += float(c)
    results[f"{task}/loss"] = total / max(count, 1.0)
    all_total += total
    all_count += count

    predictions = []
    for batch, chunk in eval_batches(recs, prompt_builder, batch_size=e.batch_size,
                                     num_threads=config.data.num_threads):
      out = generate(model, batch["input_ids"], batch["token_type_ids"],
                     batch["attention_mask"], normalize_image(jnp.asarray(batch["images"])),
                     max_new_tokens=e.max_new_tokens,
                     stop_token_ids=[model_cfg.eos_token_id],
                     pad_token_id=model_cfg.eos_token_id)
      new = out[:, batch["input_ids"].shape[1]:]
      for row, r in zip(new, chunk):
        ids = list(row)
        if model_cfg.eos_token_id in ids:
          ids = ids[:ids.index(model_cfg.eos_token_id)]
        predictions.append((r, tokenizer.decode(ids).strip()))
    results.update(_task_metrics(task, predictions))
    samples.extend({"id": r["id"], "query": r["query"], "answer": r["answer"],
                    "prediction": p} for r, p in predictions[:3])
  results["loss"] = all_total / max(all_count, 1.0)
  results["num_examples"] = sum(len(v) for v in by_task.values())
  if train_records is not None:
    results.update(_majority_baseline(train_records, [r for v in by_task.values() for r in v]))
  results["samples"] = samples
  return results


def _task_metrics(task: str, predictions: list[tuple[dict, str]]) -> dict:
  out: dict[str, float] = {f"{task}/examples": len(predictions)}
  if task == "grounding":
    ious = []
    for r, p in predictions:
      truth, guess = demo.text_to_box(r["answer"]), demo.text_to_box(p)
      ious.append(demo.box_iou(truth, guess) if truth and guess else 0.0)
    out["grounding/mean_iou"] = float(np.mean(ious))
    out["grounding/acc@0.5"] = float(np.mean([i >= 0.5 for i in ious]))
    return out
  hits = [_normalise_answer(p) == _normalise_answer(r["answer"]) for r, p in predictions]
  out[f"{task}/exact_match"] = float(np.mean(hits))
  if task == "vqa":
    by_type = collections.defaultdict(list)
    for (r, _), h in zip(predictions, hits):
      by_type[r.get("question_type", "other")].append(h)
    for qtype, h in sorted(by_type.items()):
      out[f"vqa/{qtype}/exact_match"] = float(np.mean(h))
  return out


def log_eval(results: Mapping[str, Any]) -> None:
  log("held-out evaluation:")
  for k in sorted(results):
    if k == "samples":
      continue
    v = results[k]
    log(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
  for s in results.get("samples", []):
    log(f"  {s['id']}: {s['query']!r} -> {s['prediction']!r} (truth {s['answer']!r})")
