"""cogvlm_jax weight checkpoints: one Orbax step directory holding all model weights + config.

Layout (exactly one step of the training `CheckpointManager`, minus the optimizer/data items):

    DIR/
      _CHECKPOINT_METADATA      Orbax step metadata
      params/                   Orbax PyTree item (OCDBT): every model weight as the nested dict
                                `nnx.state(model).to_pure_dict()` (per-layer weights stacked on
                                a leading layers axis), restorable with
                                `ocp.args.StandardRestore(abstract)` exactly like the `params`
                                item of a training checkpoint (`training/loop.py`)
      config/metadata           JSON item: {"format": "cogvlm_jax.weights", "version": 1,
                                "model": CogVLMConfig.to_dict(), "hf_config": the original
                                config.json (when converted from Hugging Face)}
      config/hf_files/          (optional) the non-weight files of the source Hugging Face
                                folder (modeling code, tokenizer, generation config), put back
                                by `convert to-hf`. They sit inside the config item because
                                Orbax treats every subdirectory of a step as an item.

`load_params`, `read_model_config` and `from_pretrained` accept such a directory, a training
step directory `WORKDIR/checkpoints/<step>`, or a training workdir (latest step).

Streaming writes: the `params` item is written group by group with Orbax's partial saving
(`ocp.v1.partial.save` per group, then one `finalize`), so only one group of parameters (one
stacked weight, or q/k/v of one fused projection) is in host memory at a time. Partial saving
produces a standard PyTree directory (the same `_METADATA` + OCDBT layout, zarr3 arrays), which
the v0 `StandardCheckpointHandler` used by the training loop reads unchanged; we move it into
place as the `params` item. Arrays are written uncompressed: weights barely compress, and
zstd would dominate the conversion time of a 17B model on a few host cores.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.fileio import atomic_output_dir

FORMAT = "cogvlm_jax.weights"
VERSION = 1
PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
HF_FILES_DIR = os.path.join(CONFIG_ITEM, "hf_files")
# A training run keeps its steps in WORKDIR/checkpoints/<step> (training/checkpointing.py).
CHECKPOINTS_DIR = "checkpoints"

Path = tuple[str, ...]


# ---- locating checkpoints --------------------------------------------------------------


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, PARAMS_ITEM))


def resolve_step_dir(path: str) -> str:
  """The step directory of `path`: itself, or the latest `<step>` of a training workdir."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if _is_step_dir(path):
    return path
  root = os.path.join(path, CHECKPOINTS_DIR)
  root = root if os.path.isdir(root) else path
  # Orbax writes a step to "<step>.orbax-checkpoint-tmp-*" and renames it when complete, so
  # integer names are finished steps.
  steps = [int(n) for n in os.listdir(root)
           if n.isdigit() and _is_step_dir(os.path.join(root, n))]
  if not steps:
    raise FileNotFoundError(
        f"{path} is not a cogvlm_jax checkpoint: expected a '{PARAMS_ITEM}' item (an output "
        f"of `convert to-jax`, or a training step dir) or a training workdir with "
        f"{CHECKPOINTS_DIR}/<step>/{PARAMS_ITEM}")
  return os.path.join(root, str(max(steps)))


def tokenizer_folders(path: str) -> list[str]:
  """Folders that may hold the tokenizer of checkpoint `path`: itself, and for a training
  step dir `WORKDIR/checkpoints/<step>` its workdir (train.py copies the run's tokenizer
  there)."""
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  folders = [path]
  if name.isdigit() and os.path.basename(parent) == CHECKPOINTS_DIR:
    folders.append(os.path.dirname(parent))
  return folders


def is_jax_checkpoint(path: str) -> bool:
  try:
    resolve_step_dir(path)
    return True
  except FileNotFoundError:
    return False


def read_checkpoint_config(path: str) -> dict:
  """The JSON `config` item of a checkpoint (ours or a training run's)."""
  step = resolve_step_dir(path)
  item = os.path.join(step, CONFIG_ITEM)
  if not os.path.isdir(item):
    raise FileNotFoundError(f"{step} has no '{CONFIG_ITEM}' item, so its model config is "
                            f"unknown")
  config = ocp.JsonCheckpointHandler().restore(epath.Path(item))
  if not isinstance(config, dict) or "model" not in config:
    raise ValueError(f"{item}: config has no 'model' field")
  return config


def lora_of(path: str) -> dict | None:
  """The `train.lora` a training run's checkpoint was saved with; None when not a LoRA run."""
  try:
    config = read_checkpoint_config(path)
  except (FileNotFoundError, ValueError):
    return None
  return (config.get("train") or {}).get("lora") or None


def refuse_lora_run(path: str) -> None:
  """ValueError (one line) when `path` is a LoRA run: its weights are a base plus adapters,
  which a consumer of plain weights must not take as they are."""
  spec = lora_of(path)
  if spec:
    raise ValueError(
        f"{resolve_step_dir(path)} is a LoRA training run (train.lora rank "
        f"{spec.get('rank')}): merge its adapters first with `python -m cogvlm_jax.convert "
        f"merge-lora --src {path} --dst MERGED` and use MERGED")


def read_model_config(path: str, **runtime) -> CogVLMConfig:
  """The `CogVLMConfig` a checkpoint was saved with; `runtime` replaces fields (dtype, ...)."""
  config = read_checkpoint_config(path)
  try:
    cfg = CogVLMConfig.from_dict(config["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{resolve_step_dir(path)}: invalid model config ({e})") from e
  return cfg.replace(**runtime) if runtime else cfg


def params_metadata(path: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{parameter path: (shape, dtype)} of the stored `params` item, read from metadata only."""
  item = os.path.join(resolve_step_dir(path), PARAMS_ITEM)
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
  tree = getattr(tree, "tree", tree)
  out = {}
  for keys, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(str(getattr(k, "key", k)) for k in keys)] = (tuple(meta.shape),
                                                          np.dtype(meta.dtype))
  return out


# ---- nested <-> flat -------------------------------------------------------------------


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def flatten(tree: Mapping) -> dict[Path, Any]:
  return {tuple(str(getattr(k, "key", k)) for k in keys): v
          for keys, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- writing ---------------------------------------------------------------------------


def _partial_save_context():
  o = ocp.v1.options
  return ocp.v1.Context(
      # The caller hands over each group and drops it; a defensive copy would double memory.
      memory_options=o.MemoryOptions(deepcopy_host_arrays=False),
      array_options=o.ArrayOptions(saving=o.ArrayOptions.Saving(use_compression=False)))


class ParamsWriter:
  """Writes the `params` item in pieces: `add()` disjoint groups, then `finalize()`.

  Each `add` writes its arrays to disk before returning (Orbax partial save), so the caller
  can free them; `finalize` merges the pieces into one PyTree directory.
  """

  def __init__(self, staging_dir: str):
    os.makedirs(staging_dir, exist_ok=True)
    self._path = os.path.join(staging_dir, "params")
    self._added = 0

  def add(self, flat: Mapping[Path, np.ndarray]) -> None:
    if not flat:
      return
    with _partial_save_context():
      ocp.v1.partial.save(self._path, unflatten(flat))
    self._added += len(flat)

  def finalize(self) -> str:
    """Merges the pieces; returns the PyTree directory (to be moved into place)."""
    if not self._added:
      raise ValueError("no parameters were written")
    ocp.v1.partial.finalize(self._path)
    # Partial saving stores the tree as one checkpointable ("state") of a v1 checkpoint: the
    # one subdirectory holding a PyTree `_METADATA`.
    trees = [d for d in os.listdir(self._path)
             if os.path.exists(os.path.join(self._path, d, "_METADATA"))]
    if len(trees) != 1:
      raise RuntimeError(f"unexpected Orbax partial-save layout in {self._path}: "
                         f"{sorted(os.listdir(self._path))}")
    tree_dir = os.path.join(self._path, trees[0])
    return tree_dir


def write_step_dir(out_dir: str, params_tree_dir: str, config: dict) -> None:
  """Creates `out_dir` (must not exist): config item + step metadata, then moves params in."""
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(epath.Path(out_dir), args=ocp.args.Composite(
      **{CONFIG_ITEM: ocp.args.JsonSave(config)}))
  checkpointer.close()
  os.rename(params_tree_dir, os.path.join(out_dir, PARAMS_ITEM))
  # Record the params item's handler in the step metadata, as a training step does, so a
  # CheckpointManager can restore it without being told the handler.
  meta_path = os.path.join(out_dir, "_CHECKPOINT_METADATA")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    handlers = meta.get("item_handlers") or {}
    handlers[PARAMS_ITEM] = (f"{ocp.StandardCheckpointHandler.__module__}."
                             f"{ocp.StandardCheckpointHandler.__qualname__}")
    meta["item_handlers"] = handlers
    with open(meta_path, "w") as f:
      json.dump(meta, f)


def weights_config(cfg: CogVLMConfig, hf_config: dict | None = None) -> dict:
  """The `config` item of a weights checkpoint: format, version, model (and the HF config)."""
  config = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict().to_dict()}
  if hf_config is not None:
    config["hf_config"] = hf_config
  return config


def save_params(path: str, params, cfg: CogVLMConfig, *, hf_config: dict | None = None,
                overwrite: bool = False) -> str:
  """Writes a weights checkpoint from in-memory params (nested dict or `nnx.State`).

  Parameters are copied to the host and written one at a time. For converting a Hugging
  Face folder use `python -m cogvlm_jax.convert to-jax`, which never holds the whole model.
  """
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  flat = flatten(params)
  with atomic_output_dir(path, overwrite) as (stage, out):
    writer = ParamsWriter(stage)
    for p, value in flat.items():
      writer.add({p: np.asarray(jax.device_get(value))})
    write_step_dir(out, writer.finalize(), weights_config(cfg, hf_config))
  return path


# ---- reading ---------------------------------------------------------------------------


def restore_numpy(path: str, paths: list[Path]) -> dict[Path, np.ndarray]:
  """Restores only `paths` of the params item, as host numpy arrays (stored dtype)."""
  item = os.path.join(resolve_step_dir(path), PARAMS_ITEM)
  wanted = unflatten({p: 0 for p in paths})
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  checkpointer = ocp.PyTreeCheckpointer()
  restored = checkpointer.restore(epath.Path(item), args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  checkpointer.close()
  flat = flatten(restored)
  return {p: flat[p] for p in paths}


def load_params(path: str, cfg: CogVLMConfig | None = None, *, mesh=None, rules=None,
                dtype=None) -> dict:
  """All model weights of a checkpoint as a nested dict of `jax.Array`s.

  Args:
    path: a `convert to-jax` output, a training step dir, or a training workdir (latest step).
    cfg: the model config; default: the one stored in the checkpoint. Stored shapes are
      checked against it (CheckpointMismatch names the parameters that differ).
    mesh: with a mesh, each array is restored directly into its sharding (each host reads
      only its own shards); without, onto the first device.
    rules: logical-axis rules for the shardings (default `sharding.DEFAULT_RULES`).
    dtype: cast floating weights to this dtype while restoring (default: as stored).
  """
  from cogvlm_jax.convert.stream import check_params, is_float
  from cogvlm_jax.modeling.models import abstract_model
  from cogvlm_jax.sharding import DEFAULT_RULES, state_shardings

  step = resolve_step_dir(path)
  refuse_lora_run(step)  # base + adapters: not plain weights (merge-lora makes them)
  cfg = cfg if cfg is not None else read_model_config(step)
  _, abstract = abstract_model(cfg)
  expected = {p: v.shape for p, v in flatten(nnx.to_pure_dict(abstract)).items()}
  stored = params_metadata(step)
  check_params(cfg, stored, expected, step)
  if mesh is not None:
    shardings = flatten(nnx.to_pure_dict(state_shardings(abstract, mesh,
                                                         rules or DEFAULT_RULES)))
  else:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {p: single for p in expected}
  target = {}
  for p, (shape, stored_dtype) in stored.items():
    want = np.dtype(dtype) if dtype is not None and is_float(stored_dtype) else stored_dtype
    target[p] = jax.ShapeDtypeStruct(shape, want, sharding=shardings[p])
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  restored = checkpointer.restore(epath.Path(os.path.join(step, PARAMS_ITEM)),
                                  args=ocp.args.StandardRestore(unflatten(target)))
  checkpointer.close()
  return restored


def copy_hf_files(src_dir: str, dst_dir: str, is_weight_file) -> list[str]:
  """Copies the top-level non-weight files of `src_dir` into `dst_dir`; returns their names."""
  names = sorted(n for n in os.listdir(src_dir)
                 if os.path.isfile(os.path.join(src_dir, n)) and not is_weight_file(n)
                 and not n.startswith("."))
  if names:
    os.makedirs(dst_dir, exist_ok=True)
  for n in names:
    shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return names
