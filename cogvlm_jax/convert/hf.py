"""Hugging Face state dicts <-> cogvlm_jax parameter states, through `mapping.tensor_rules`.

Both directions work one parameter group at a time (`stream.param_groups`), so a checkpoint
never has to be in host memory as a whole.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.mapping import tensor_rules
from cogvlm_jax.convert.sources import as_source
from cogvlm_jax.convert.stream import (CheckpointMismatch, assemble_group, check_hf_source,
                                       param_groups, split_group)

__all__ = ["CheckpointMismatch", "hf_to_state", "state_to_hf"]


def _flat(state: nnx.State) -> dict[tuple, nnx.Variable]:
  return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def hf_to_state(cfg: CogVLMConfig, tensors, abstract_state: nnx.State,
                shardings=None, dtype=None) -> nnx.State:
  """Builds our parameter state from Hugging Face `tensors`, one parameter group at a time.

  Args:
    cfg: the model config the tensors must match.
    tensors: a mapping name -> array, or a source (`SafetensorsCheckpoint`,
      `TorchBinCheckpoint`, anything with `names()` and `get(name)`).
    abstract_state: `nnx.state` of an abstract model (`nnx.eval_shape`), giving shapes.
    shardings: optional tree of NamedShardings like `abstract_state`; each parameter is put
      on its devices as soon as its group is assembled, then the host copy is dropped.
    dtype: cast floating tensors to this dtype (default: keep the checkpoint dtype).
  Raises:
    CheckpointMismatch naming the tensors that are missing, unexpected or mis-shaped (checked
    from headers before any tensor is read); ValueError for dtypes that cannot be converted.
  """
  source = as_source(tensors)
  dtypes = check_hf_source(cfg, source, dtype)
  flat = _flat(abstract_state)
  flat_shardings = _flat(shardings) if shardings is not None else {}
  shapes = {path: v.get_value().shape for path, v in flat.items()}
  groups = param_groups(cfg)
  covered = {p for g in groups for p in g.paths}
  for path in flat:
    if path not in covered:
      raise CheckpointMismatch(f"no Hugging Face tensor maps to parameter {'/'.join(path)}")
  values = {}
  for group in groups:
    for path, array in assemble_group(group, source, shapes, dtypes).items():
      sharding = flat_shardings.get(path)
      values[path] = (jax.device_put(array, sharding) if sharding is not None
                      else jax.numpy.asarray(array))
  state = abstract_state
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(values[tuple(str(k) for k in path)])
  return state


def state_to_hf(cfg: CogVLMConfig, state: nnx.State, dtype=None) -> dict[str, np.ndarray]:
  """Our parameter state -> Hugging Face tensors (name -> numpy, original order)."""
  flat = _flat(state)
  out = {}
  for group in param_groups(cfg):
    arrays = {p: np.asarray(jax.device_get(flat[p].get_value())) for p in group.paths}
    for rule, tensor in split_group(group, arrays, dtype):
      out[rule.hf_name] = tensor
  return {r.hf_name: out[r.hf_name] for r in tensor_rules(cfg)}
