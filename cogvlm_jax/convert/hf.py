"""Hugging Face state dicts <-> cogvlm_jax parameter states, through `mapping.tensor_rules`."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.mapping import tensor_rules


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the config: missing, unexpected or mis-shaped tensors."""


def _flat(state: nnx.State) -> dict[tuple, nnx.Variable]:
  return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def _is_float(dtype) -> bool:
  # ml_dtypes' bfloat16 is not a numpy floating subtype, so check it by name too.
  return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def hf_to_state(cfg: CogVLMConfig, tensors, abstract_state: nnx.State,
                shardings=None, dtype=None) -> nnx.State:
  """Builds our parameter state from Hugging Face `tensors` (name -> array, `.get/.names`).

  Args:
    cfg: the model config the tensors must match.
    tensors: a mapping name -> array, or an object with `names()` and `get(name)`.
    abstract_state: `nnx.state` of an abstract model (`nnx.eval_shape`), giving shapes.
    shardings: optional tree of NamedShardings like `abstract_state`; each parameter is put
      on its devices as soon as it is assembled.
    dtype: cast floating tensors to this dtype (default: keep the checkpoint dtype).
  Raises:
    CheckpointMismatch naming the tensors that are missing, unexpected or mis-shaped.
  """
  get = tensors.get if hasattr(tensors, "get") else tensors.__getitem__
  names = set(tensors.names() if hasattr(tensors, "names") else tensors.keys())
  rules = tensor_rules(cfg)
  expected = {r.hf_name for r in rules}
  missing = sorted(expected - names)
  unexpected = sorted(names - expected)
  if missing or unexpected:
    raise CheckpointMismatch(
        f"checkpoint does not match the {cfg.variant} config: missing {len(missing)} tensors "
        f"{missing[:8]}, unexpected {len(unexpected)} tensors {unexpected[:8]}")
  flat = _flat(abstract_state)
  flat_shardings = _flat(shardings) if shardings is not None else {}
  by_path: dict[tuple, list] = {}
  for rule in rules:
    for piece, path in enumerate(rule.paths):
      by_path.setdefault(path, []).append((rule, piece))

  values = {}
  for path, variable in flat.items():
    if path not in by_path:
      raise CheckpointMismatch(f"no Hugging Face tensor maps to parameter {'/'.join(path)}")
    shape = variable.get_value().shape
    out = None
    for rule, piece in by_path[path]:
      tensor = np.asarray(get(rule.hf_name))
      if tuple(tensor.shape) != rule.hf_shape:
        raise CheckpointMismatch(f"tensor {rule.hf_name} has shape {tuple(tensor.shape)}, "
                                 f"expected {rule.hf_shape} for this config")
      if dtype is not None and _is_float(tensor.dtype) and tensor.dtype != np.dtype(dtype):
        tensor = tensor.astype(dtype)
      part = rule.to_ours(tensor)[piece]
      if out is None:
        out = np.empty(shape, part.dtype)
      if rule.layer is None:
        out[...] = part
      else:
        out[rule.layer] = part
    sharding = flat_shardings.get(path)
    values[path] = jax.device_put(out, sharding) if sharding is not None else jax.numpy.asarray(
        out)
  state = abstract_state
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(values[tuple(str(k) for k in path)])
  return state


def state_to_hf(cfg: CogVLMConfig, state: nnx.State) -> dict[str, np.ndarray]:
  """Our parameter state -> Hugging Face tensors (name -> numpy, original order)."""
  flat = _flat(state)
  out = {}
  for rule in tensor_rules(cfg):
    pieces = []
    for path in rule.paths:
      value = np.asarray(jax.device_get(flat[path].get_value()))
      pieces.append(value if rule.layer is None else value[rule.layer])
    out[rule.hf_name] = np.ascontiguousarray(rule.to_hf(pieces))
  return out
