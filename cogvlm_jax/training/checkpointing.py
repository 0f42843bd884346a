"""Training checkpoints: the Orbax manager of a workdir, save, restore, resume checks.

A training step directory `WORKDIR/checkpoints/<step>` holds the items

    params/      every model weight (trainable and frozen), the layout `cogvlm_jax.checkpoint`
                 reads as a weights checkpoint (so eval.py / from_pretrained load a workdir)
    opt_state/   the optimizer state of the trainable weights
    progress/    step, rng, bad-sample counts
    data/        the Grain iterator position (a resumed run sees the batches it would have)
    config/      the run config (`stored_run_config`), which a resume compares

Orbax writes a step to a temporary name and renames it when complete (on GCS: writes
`commit_success.txt` last), so a step that shows up under its number is complete; the manager
keeps the newest `train.max_checkpoints` and saves on its `save_interval_steps`. A complete
step whose files were damaged later is moved aside on resume and the one before it restored
(`restore_latest`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cogvlm_jax.checkpoint import CHECKPOINTS_DIR
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.training.run_config import ConfigError
from cogvlm_jax.training.state import (TrainSetup, TrainState, all_weights, merge_dicts,
                                       split_dict)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The Orbax manager of `workdir/checkpoints`: keeps the newest train.max_checkpoints,
  saves every train.checkpoint_every steps (`should_save`), asynchronously if configured."""
  # Orbax's default policy also saves the first step of a fresh run; we save on the interval
  # and at a multi-host preemption sync point only (the loop forces the last step's save).
  policy = ocp.checkpoint_managers.AnySavePolicy([
      ocp.checkpoint_managers.FixedIntervalPolicy(config.train.checkpoint_every),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_checkpoints, create=True, save_decision_policy=policy,
      enable_async_checkpointing=config.train.async_checkpoint)
  # An epath.Path: Orbax writes gs:// (tensorstore's GCS driver) as well as local folders.
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS_DIR, options=options)


def check_remote_workdir(workdir: str) -> None:
  """ConfigError naming what to install when a gs:// workdir cannot be written: etils.epath
  needs gcsfs (or TensorFlow) for the files, Orbax google-cloud-storage (it asks the bucket
  whether it has a hierarchical namespace) besides its own TensorStore GCS driver."""
  if not workdir.startswith("gs://"):
    return
  missing = [package for module, package in (("google.cloud.storage", "google-cloud-storage"),
                                             ("gcsfs", "gcsfs"))
             if not _importable(module) and not (module == "gcsfs" and
                                                 _importable("tensorflow"))]
  if missing:
    raise ConfigError(f"workdir {workdir} is on GCS, which needs {' and '.join(missing)}: "
                      f"pip install {' '.join(missing)}")


def _importable(module: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # a parent package (google.cloud) is missing
    return False


def stored_run_config(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig) -> dict:
  """The run config as stored with a checkpoint, its "model" the model of the saved weights
  (after a resolution switch: the new image size; the run's own model is kept as
  "run_model", which resuming compares)."""
  stored = json.loads(config.to_json_best_effort())
  model = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
  if model != stored["model"]:
    stored["run_model"], stored["model"] = stored["model"], model
  return stored


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iter,
                    stored_config: dict, data_counts: np.ndarray) -> None:
  """Saves `state` at its step (the loop asks `manager.should_save` first: Orbax's interval
  and multi-host preemption policy; the end of the run and a SIGTERM save regardless).

  Items: params (all weights), opt_state, progress (step, rng, bad-sample counts), data (the
  Grain iterator position) and config (`stored_run_config`). Async: returns once the arrays
  are copied to the host; the files are written in the background.
  """
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(all_weights(state)),
      opt_state=ocp.args.StandardSave(state.opt_state),
      progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                      "data_counts": data_counts.copy()}),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(stored_config),
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
  # Another LoRA rank / targets / alpha / dropout is another run (adapters of other shapes or
  # another function of the same ones).
  if stored.get("train", {}).get("lora") != ours["train"].get("lora"):
    problems.append(f"train.lora {stored.get('train', {}).get('lora')!r} != "
                    f"{ours['train'].get('lora')!r}")
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


class CheckpointRestoreError(RuntimeError):
  """One step failed to restore; `cause` is the one-line reason from Orbax / tensorstore."""

  def __init__(self, step: int, cause: BaseException):
    self.step, self.cause = step, cause
    text = " ".join(str(cause).split())[:300]
    super().__init__(f"step {step}: {type(cause).__name__}: {text}")


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, setup: TrainSetup,
                       data_iter, data_counts: np.ndarray) -> tuple[TrainState, np.ndarray]:
  """(the state saved at `step`, every array placed with its sharding; the bad-sample counts
  saved with it, shaped like `data_counts`); sets `data_iter` to the saved position.
  CheckpointRestoreError (with Orbax's own cause) when the step cannot be restored."""
  a = setup.abstract
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(merge_dicts(a.params, a.frozen)),
        opt_state=ocp.args.StandardRestore(a.opt_state),
        progress=ocp.args.StandardRestore({"step": a.step, "rng": a.rng,
                                           "data_counts": data_counts}),
        data=grain.checkpoint.CheckpointRestore(data_iter),
    ))
  except Exception as e:  # noqa: BLE001 -- missing / truncated files, or a tree not ours
    raise CheckpointRestoreError(step, e) from e
  params, frozen = split_dict(restored.params, a.params)
  state = TrainState(step=restored.progress["step"], params=params, frozen=frozen,
                     opt_state=restored.opt_state, rng=restored.progress["rng"])
  return state, np.asarray(restored.progress["data_counts"], np.int64)


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
  """The steps Orbax considers complete, newest first.

  Orbax decides, on local disk and on GCS alike: the manager lists only finalized step
  directories (locally: renamed from their temporary name; on GCS: holding
  `commit_success.txt`), and `is_checkpoint_finalized` is asked again here because a step
  may have been moved or half-deleted since the manager read the folder.
  """
  steps = []
  for step in sorted(manager.all_steps(), reverse=True):
    path = epath.Path(manager.directory) / str(step)
    if path.exists() and ocp.utils.is_checkpoint_finalized(path):
      steps.append(step)
  return steps


def restore_latest(manager: ocp.CheckpointManager,
                   inputs_for: Callable[[int], tuple[TrainSetup, Any]],
                   data_counts: np.ndarray, config: ml_collections.ConfigDict, log
                   ) -> Optional[tuple[TrainState, np.ndarray, int]]:
  """(state, bad-sample counts, step) of the newest complete step that restores, or None
  when the workdir has no checkpoint.

  `inputs_for(step)` gives the (setup, data iterator) that step `step` restores into: those
  of the phase it was saved in, so that a fallback across stage 2's resolution switch
  restores the older step at its own, older image size (the caller rebuilds them).

  A newer step that fails (files deleted or truncated after the save) is reported with its
  real cause (`log`) and moved aside to `<step>.broken-<time>` (kept for a post-mortem, out
  of Orbax's sight), and the previous complete step is restored. If no step restores the run
  stops with every cause (ConfigError) and nothing is moved: then the steps are not broken
  but not ours (another cogvlm_jax version or other settings). A step saved by a different
  run (check_resumable) stops the run at once.
  """
  failures: list[CheckpointRestoreError] = []
  for step in complete_steps(manager):
    check_resumable(manager, step, config)
    setup, data_iter = inputs_for(step)
    try:
      state, counts = restore_checkpoint(manager, step, setup, data_iter, data_counts)
    except CheckpointRestoreError as e:
      failures.append(e)
      continue
    for failure in failures:
      moved = move_aside(manager, failure.step)
      log(f"checkpoint step {failure.step} could not be restored ({failure}); moved it to "
          f"{moved} and resumed from step {step}")
    manager.reload()  # Orbax forgets the moved steps (their numbers are saved again)
    return state, counts, step
  if failures:
    raise ConfigError(
        f"cannot resume from {manager.directory}: no checkpoint restores ("
        f"{'; '.join(str(f) for f in failures)}). If they are of an older cogvlm_jax or of "
        f"other settings, use a new --workdir (train.init_from=<that workdir> starts from its "
        f"weights)")
  return None


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames step dir `<step>` to `<step>.broken-<UTC time>` (process 0; the others wait
  for it) and returns the new path. Not deleted: what is left of it may still matter."""
  src = epath.Path(manager.directory) / str(step)
  dst = src.parent / f"{step}.broken-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
  if jax.process_index() == 0:
    src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"cogvlm_jax: moved aside step {step}")
  return str(dst)
