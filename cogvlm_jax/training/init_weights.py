"""Starting weights of a run: `train.init_from`, and the position-table resize of stage 2.

A run starts from random weights, or from a Hugging Face CogVLM folder, a converted
checkpoint or another run (`train.init_from`). A ViT position table of another image size is
resized bicubically on the way in (CogVLM's 224 -> 490 px): the same rule serves the mid-run
switch (`switch_resolution`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvlm_jax import checkpoint, pretrained
from cogvlm_jax.convert.stream import CheckpointMismatch
from cogvlm_jax.modeling import quantize
from cogvlm_jax.modeling.lora import LoraSpec, is_lora_path, stored_layout
from cogvlm_jax.training.run_config import ConfigError
from cogvlm_jax.training.state import TrainSetup, TrainState, all_weights


# RoPE tables the model computes itself (the LM's inv_freq, CogAgent's 2D-RoPE freqs_cos /
# freqs_sin): a starting checkpoint need not carry them.
COMPUTED_BUFFERS = ("inv_freq", "freqs_cos", "freqs_sin")


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
  table resized. Weights are cast to the state's dtypes and placed with its shardings (a
  QLoRA run's base kernels quantized); the optimizer state stays fresh.
  """
  cfg = setup.model_config
  t0 = time.perf_counter()
  if pretrained.is_hf_folder(path):
    model = pretrained.from_pretrained(path, mesh=setup.mesh, scan_layers=cfg.scan_layers)
    flat = checkpoint.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  elif checkpoint.lora_of(path):  # a LoRA run: its adapters too
    flat = lora_run_weights(path, setup)
  else:
    try:
      loaded = checkpoint.load_params(path, cfg, mesh=setup.mesh)
    except CheckpointMismatch:  # e.g. another image size: read as stored, fix up below
      loaded = checkpoint.load_params(path)
    flat = checkpoint.flatten(loaded)
  if setup.lora is not None and setup.lora.base_dtype:  # QLoRA: quantize the float base
    layout = quantize.layout_of(nnx.merge(setup.graphdef, state.params, state.frozen))
    flat = quantize.quantize_flat(flat, layout)
  used: set = set()
  params = fit_weights(state.params, flat, used, f"train.init_from: {path}")
  frozen = fit_weights(state.frozen, flat, used, f"train.init_from: {path}")
  # A LoRA run's adapters start fresh from a base checkpoint (which has none), or continue
  # from a LoRA run's of the same base and adapter shape (lora_run_weights).
  missing = [k for k, _ in checkpoint.flatten(all_weights(state)).items()
             if k not in used and k[-1] not in COMPUTED_BUFFERS and not is_lora_path(k)]
  if missing:
    raise ConfigError(f"train.init_from: {path} lacks {len(missing)} weights the model has, "
                      f"e.g. {'/'.join(missing[0])}")
  print(f"initialised {len(used)} weights from {path} in {time.perf_counter() - t0:.1f}s",
        flush=True)
  return state.replace(params=params, frozen=frozen)


def lora_run_weights(path: str, setup: TrainSetup) -> dict:
  """Base + adapters of a LoRA run at `path` (flat numpy, a QLoRA base dequantized) for a
  LoRA run of the same base model and adapter shape (`setup`); ConfigError naming what
  differs otherwise (a run without train.lora: merge-lora first)."""
  where = f"train.init_from: {path}"
  if setup.lora is None:
    try:
      checkpoint.refuse_lora_run(path)
    except ValueError as e:
      raise ConfigError(f"{where}: {e}") from None
  theirs = LoraSpec.from_dict(checkpoint.lora_of(path))
  diff = [f"{k} {getattr(theirs, k)!r} != {getattr(setup.lora, k)!r}"
          for k in ("rank", "alpha", "targets") if getattr(theirs, k) != getattr(setup.lora, k)]
  if diff:
    raise ConfigError(f"{where} is a LoRA run of other adapters: train.lora {', '.join(diff)}")
  stored_hf = checkpoint.read_model_config(path).to_hf_dict()
  ours = setup.model_config.to_hf_dict()
  diff = [f"{k} {stored_hf.get(k)!r} != {ours.get(k)!r}"
          for k in sorted(set(stored_hf) | set(ours)) if stored_hf.get(k) != ours.get(k)]
  if diff:
    raise ConfigError(f"{where} is a LoRA run of another base model: {', '.join(diff[:4])}")
  step = checkpoint.resolve_step_dir(path)
  stored = checkpoint.params_metadata(step)
  flat = checkpoint.restore_numpy(step, list(stored))
  return quantize.dequantize_flat(flat, stored_layout(setup.model_config, stored))


def switch_resolution(state: TrainState, old: TrainSetup, new: TrainSetup) -> TrainState:
  """`state` of `old` moved to `new` (another image size): the frozen ViT position table
  resized, everything else carried over as it is (same shapes and shardings)."""
  if jax.tree.map(lambda a: (a.shape, a.dtype), old.abstract.params) != jax.tree.map(
      lambda a: (a.shape, a.dtype), new.abstract.params):
    raise ConfigError("train.resolution_switch changes a trainable weight's shape; only the "
                      "frozen ViT position table may change")
  used: set = set()
  frozen = fit_weights(new.abstract.frozen, checkpoint.flatten(state.frozen), used,
                       "train.resolution_switch")
  return state.replace(frozen=frozen)
