"""LoRA over the model's linear projections: adapters, dropout, merge, PEFT's layout.

A LoRA *unit* is one linear module of the original model (`vision_expert_query_key_value`,
`mlp.vision_mlp.gate_proj`, `vision.transformer.layers.N.attention.dense`, ...): one shared
input matrix `a` [*in, r] and one output matrix `b_<K>` [r, *out] per kernel K of ours that
the module feeds (three for a fused QKV: query / key / value), so a unit is exactly one PEFT
`lora_A` / `lora_B` pair and exports as one. A projection then computes

    y = x @ W (+ bias) + (alpha / r) * (dropout(x) @ a) @ b_K        (PEFT's order)

Units are attached after the model is built (`apply_lora`) as `LoraUnit` submodules of the
module owning the kernels (attribute `lora` when the unit is that module, e.g.
`.../vision_expert_query_key_value/lora/a`, else `lora_<name>`, e.g.
`.../vision_mlp/lora_gate_proj/b_gate_proj`); `common.dense` adds a unit's term when the
caller passes `lora=lora_for(self, "<kernel>")`. The base weights keep their paths, so
checkpoints, conversion and `train.init_from` see the same names as without LoRA.

Why our own and not a library: Qwix's LoraProvider intercepts `dot_general` calls and finds
the weight by identity (our `dense` casts the kernel first), creates 2-D adapters with its own
sharding metadata (not our `logical_axes`), and does not know that one fused HF module is three
kernels of ours; `nnx.LoRA` is a 2-D `Linear` wrapper without alpha, dropout or multi-dim
kernels. Both would lose either the PEFT layout or the shardings. We use Flax's `nnx.LoRAParam`
as the adapters' variable type, so `nnx.LoRAParam` is the trainable filter.

Sharding: `a` carries the base kernel's input axes, `b_K` its output axes (rank replicated),
with the leading "layers" axis of stacked layers, so adapters shard like their base weight.
Dropout (training only) draws from the key set by `dropout_rng(key)` (the train step's
per-step key) folded with a per-unit id and the layer index: deterministic under the run's
seed, and the same on resume.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling import quantize

Path = tuple[str, ...]

# Target name -> the original (Hugging Face) modules it adapts, as a full-match regex.
_LAYER = r"model\.layers\.\d+\."
_VIT = r"model\.vision\.transformer\.layers\.\d+\."
TARGETS: dict[str, str] = {
    "vision_expert_query_key_value": _LAYER + r"self_attn\.vision_expert_query_key_value",
    "language_expert_query_key_value": _LAYER + r"self_attn\.language_expert_query_key_value",
    "vision_expert_dense": _LAYER + r"self_attn\.vision_expert_dense",
    "language_expert_dense": _LAYER + r"self_attn\.language_expert_dense",
    "vision_mlp": _LAYER + r"mlp\.vision_mlp\.(gate_proj|up_proj|down_proj)",
    "language_mlp": _LAYER + r"mlp\.language_mlp\.(gate_proj|up_proj|down_proj)",
    "adapter": r"model\.vision\.linear_proj\.(linear_proj|gate_proj|dense_h_to_4h|dense_4h_to_h)",
    "vit_query_key_value": _VIT + r"attention\.query_key_value",
    "vit_dense": _VIT + r"attention\.dense",
    "vit_mlp": _VIT + r"mlp\.(fc1|fc2)",
}
_SPEC_KEYS = ("rank", "alpha", "dropout", "targets", "base_dtype")
# QLoRA: the frozen projection kernels' storage (modeling/quantize.py). Not "int4": the
# ahead-of-time compiled train step wants packed int4 layouts that JAX 0.10.2's CPU arrays
# lack (it refuses the state at the first step); quantize.py's int4 is forward-only for now.
BASE_DTYPES = ("", "int8")


class LoraLayerIndex(nnx.Variable):
  """Non-trainable: the layer number of a stacked unit (int32 [layers]; scalar 0 when not
  stacked), so every layer draws its own dropout mask inside the layer scan."""


# ---- the spec --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """`train.lora`: rank r >= 1, alpha (scale = alpha / r), dropout in [0, 1), targets;
  base_dtype "int8" stores the frozen projection kernels quantized (QLoRA), "" keeps them
  in train.frozen_dtype."""

  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]
  base_dtype: str = ""

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraSpec":
    """Checked spec; ValueError naming the bad key (unknown targets list the valid ones)."""
    d = dict(d)
    unknown = sorted(set(d) - set(_SPEC_KEYS))
    if unknown:
      raise ValueError(f"unknown keys {unknown}; known: {list(_SPEC_KEYS)}")
    rank = d.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
      raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    alpha = d.get("alpha", float(rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
      raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    dropout = d.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
        0.0 <= dropout < 1.0):
      raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    targets = d.get("targets")
    if isinstance(targets, str) or not targets:
      raise ValueError(f"targets must be a non-empty list of module names; valid: "
                       f"{list(TARGETS)}")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
      raise ValueError(f"unknown targets {bad}; valid: {list(TARGETS)}")
    if len(set(targets)) != len(targets):
      raise ValueError(f"targets {list(targets)} name a module twice")
    base_dtype = d.get("base_dtype") or ""
    if base_dtype not in BASE_DTYPES:
      raise ValueError(f"base_dtype must be one of {list(BASE_DTYPES)}, got {base_dtype!r}")
    return cls(int(rank), float(alpha), float(dropout), tuple(targets), base_dtype)

  def to_dict(self) -> dict:
    return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
            "targets": list(self.targets), "base_dtype": self.base_dtype}


# ---- which modules: the units ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
  """One adapted original module (all layers of a stack): where it lives in our model."""

  target: str
  owner: Path  # our module holding the kernels, e.g. ("layers", "mlp", "vision_mlp")
  attr: str  # the LoraUnit attribute on `owner`: "lora" or "lora_<name>"
  kernels: tuple[str, ...]  # our kernels it feeds, in the fused module's row order
  hf_modules: tuple[str, ...]  # the original module per layer (one when not stacked)
  hf_in: int  # the original module's input width
  hf_out: tuple[int, ...]  # its output rows per kernel (sum = the fused module's rows)

  @property
  def stacked(self) -> bool:
    return self.owner[0] in ("layers",) or self.owner[:2] == ("vision", "layers")

  def path(self, leaf: str) -> Path:
    return self.owner + (self.attr, leaf)


def lora_units(cfg: CogVLMConfig, targets: Iterable[str]) -> list[Unit]:
  """The units of `targets`, from the conversion table (one source for the module names)."""
  from cogvlm_jax.convert.mapping import tensor_rules

  patterns = {t: re.compile(TARGETS[t]) for t in targets}
  found: dict[tuple, list] = {}
  for rule in tensor_rules(cfg):
    if not rule.hf_name.endswith(".weight") or len(rule.hf_shape) != 2:
      continue
    module = rule.hf_name[:-len(".weight")]
    target = next((t for t, p in patterns.items() if p.fullmatch(module)), None)
    if target is None:
      continue
    found.setdefault((target, rule.paths), []).append((rule.layer or 0, module, rule))
  units = []
  for (target, paths), entries in found.items():
    entries.sort(key=lambda e: e[0])
    rule = entries[0][2]
    owner = paths[0][:-1]
    leaf = entries[0][1].rsplit(".", 1)[-1]
    attr = "lora" if leaf == owner[-1] else f"lora_{leaf}"
    rows = _split_rows(cfg, target, rule.hf_shape[0], len(paths))
    units.append(Unit(target, owner, attr, tuple(p[-1] for p in paths),
                      tuple(m for _, m, _ in entries), rule.hf_shape[1], rows))
  return units


def _split_rows(cfg: CogVLMConfig, target: str, rows: int, n: int) -> tuple[int, ...]:
  """Rows per kernel of a fused module: q | k | v (decoder GQA: k and v narrower; the ViT:
  three equal blocks), else one block."""
  if n == 1:
    return (rows,)
  if target == "vit_query_key_value":
    return (rows // 3,) * 3
  q, kv = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim)
  if q + 2 * kv != rows:
    raise ValueError(f"{target}: {rows} rows are not q {q} + k, v {kv}")
  return (q, kv, kv)


# ---- the adapters in the model -----------------------------------------------------------


_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager


def dropout_rng(key: jax.Array | None):
  """LoRA dropout is active inside this block, drawn from `key` (None: no dropout)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


class LoraUnit(nnx.Module):
  """a [L?, *in, r] (shared input side) and b_<K> [L?, r, *out_K] per kernel K."""

  def __init__(self, a: nnx.LoRAParam, bs: Mapping[str, nnx.LoRAParam], index: LoraLayerIndex,
               *, in_dims: int, scale: float, rate: float, uid: int):
    self.a = a
    for name, b in bs.items():
      setattr(self, f"b_{name}", b)
    self.layer_index = index
    self.kernels = tuple(bs)
    self.in_dims, self.scale, self.rate, self.uid = in_dims, scale, rate, uid

  def delta(self, x: jax.Array, kernel: str, dtype) -> jax.Array:
    """scale * (dropout(x) @ a) @ b_kernel: x [..., *in] -> [..., *out] in `dtype`."""
    x = self._dropout(x.astype(dtype))
    a = self.a[...].astype(dtype)
    b = getattr(self, f"b_{kernel}")[...].astype(dtype)
    n = self.in_dims
    t = jax.lax.dot_general(x, a, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                   ((), ())))
    y = jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())))
    return y * jnp.asarray(self.scale, dtype)

  def _dropout(self, x: jax.Array) -> jax.Array:
    key = _DROPOUT_KEY.get()
    if key is None or self.rate == 0.0:
      return x
    key = jax.random.fold_in(jax.random.fold_in(key, self.uid), self.layer_index[...])
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


def lora_for(module: nnx.Module, kernel: str):
  """The LoRA term of `module`'s `kernel` for `common.dense` (a callable (x, dtype) -> y),
  or None when no unit feeds it."""
  for value in vars(module).values():
    if isinstance(value, LoraUnit) and kernel in value.kernels:
      return lambda x, dtype, unit=value: unit.delta(x, kernel, dtype)
  return None


def _module_at(model: nnx.Module, path: Path) -> nnx.Module:
  node = model
  for name in path:
    node = getattr(node, name)
  return node


def _uid(path: Path) -> int:
  return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def _unit_shapes(unit: Unit, kernel: nnx.Variable):
  """(lead, in_dims) of a unit's kernels: lead = 1 for stacked layers, in_dims = how many
  kernel dims the original's input width spans (2 for [heads, head_dim, out])."""
  shape = kernel.get_value().shape
  lead = 1 if unit.stacked else 0
  for n in range(1, len(shape) - lead):
    if math.prod(shape[lead:lead + n]) == unit.hf_in:
      return lead, n
  raise ValueError(f"cannot find the input dims of {'/'.join(unit.owner)} {shape}")


def make_unit(unit: Unit, owner: nnx.Module, spec: LoraSpec, key: jax.Array) -> LoraUnit:
  """A fresh unit for `owner`: a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform(a=√5)
  default), b = 0, so the adapted model starts equal to the base one."""
  kernels = [getattr(owner, k) for k in unit.kernels]
  lead, in_dims = _unit_shapes(unit, kernels[0])
  base_shape, base_axes = kernels[0].get_value().shape, tuple(kernels[0].logical_axes)
  dtype = kernels[0].get_value().dtype
  in_shape = base_shape[:lead + in_dims]
  bound = 1.0 / math.sqrt(unit.hf_in)
  a = jax.random.uniform(key, in_shape + (spec.rank,), jnp.float32, -bound, bound)
  a_param = nnx.LoRAParam(a.astype(dtype), logical_axes=base_axes[:lead + in_dims] + (None,))
  bs = {}
  for name, k in zip(unit.kernels, kernels):
    shape, axes = k.get_value().shape, tuple(k.logical_axes)
    out_shape, out_axes = shape[lead + in_dims:], axes[lead + in_dims:]
    bs[name] = nnx.LoRAParam(jnp.zeros(shape[:lead] + (spec.rank,) + out_shape, dtype),
                             logical_axes=axes[:lead] + (None,) + out_axes)
  if lead:
    index = LoraLayerIndex(jnp.arange(base_shape[0], dtype=jnp.int32), logical_axes=("layers",))
  else:
    index = LoraLayerIndex(jnp.zeros((), jnp.int32), logical_axes=())
  return LoraUnit(a_param, bs, index, in_dims=in_dims, scale=spec.scale, rate=spec.dropout,
                  uid=_uid(unit.path("")))


def apply_lora(model: nnx.Module, spec: LoraSpec, seed: int = 0) -> nnx.Module:
  """Attaches a fresh `LoraUnit` for every unit of `spec` to `model` (in place; returned).

  Each unit's init key is the seed folded with a hash of its path: independent of order.
  """
  base = jax.random.key(seed)
  for unit in lora_units(model.config, spec.targets):
    owner = _module_at(model, unit.owner)
    if hasattr(owner, unit.attr):
      raise ValueError(f"{'/'.join(unit.owner)} already has LoRA adapters")
    key = jax.random.fold_in(base, _uid(unit.path("")))
    setattr(owner, unit.attr, make_unit(unit, owner, spec, key))
  return model


def is_lora_path(path: Sequence) -> bool:
  """True for the variables `apply_lora` adds (adapters and their layer index)."""
  return any(str(getattr(p, "key", p)).startswith("lora") for p in path)


# ---- merging -----------------------------------------------------------------------------


def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                  stacked: bool) -> np.ndarray:
  """kernel + scale * a @ b (float32 math, the kernel's dtype back).

  kernel [L?, *in, *out], a [L?, *in, r], b [L?, r, *out].
  """
  lead = 1 if stacked else 0
  r = a.shape[-1]
  layers = kernel.shape[0] if stacked else 1
  a2 = np.asarray(a, np.float32).reshape(layers, -1, r)
  b2 = np.asarray(b, np.float32).reshape(layers, r, -1)
  delta = np.matmul(a2, b2).reshape(kernel.shape if stacked else (1,) + kernel.shape)
  out = np.asarray(kernel, np.float32) + np.float32(scale) * (delta if lead else delta[0])
  return out.astype(kernel.dtype)


def merge_flat(cfg: CogVLMConfig, spec: LoraSpec, flat: Mapping[Path, np.ndarray]
               ) -> dict[Path, np.ndarray]:
  """All weights (flat, LoRA included) -> the base weights with every adapter merged in."""
  out = {p: v for p, v in flat.items() if not is_lora_path(p)}
  for unit in lora_units(cfg, spec.targets):
    a = flat[unit.path("a")]
    for k in unit.kernels:
      path = unit.owner + (k,)
      out[path] = merged_kernel(flat[path], a, flat[unit.path(f"b_{k}")], spec.scale,
                                unit.stacked)
  return out


# ---- PEFT's layout -----------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(spec: LoraSpec, units: Sequence[Unit], base_model: str | None = None) -> dict:
  """adapter_config.json of a PEFT LoRA adapter on the original model's module names."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": sorted(m for u in units for m in u.hf_modules),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {},
  }


def to_peft_tensors(units: Sequence[Unit], flat: Mapping[Path, np.ndarray]
                    ) -> dict[str, np.ndarray]:
  """Our adapters -> PEFT tensors: lora_A.weight [r, in], lora_B.weight [out, r] per module."""
  out = {}
  for unit in units:
    a = np.asarray(flat[unit.path("a")])
    bs = [np.asarray(flat[unit.path(f"b_{k}")]) for k in unit.kernels]
    r = a.shape[-1]
    for i, module in enumerate(unit.hf_modules):
      a_i = a[i] if unit.stacked else a
      b_i = [b[i] if unit.stacked else b for b in bs]
      out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, r).T)
      out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
          np.concatenate([b.reshape(r, -1).T for b in b_i], axis=0))
  return out


def spec_from_peft(config: Mapping[str, Any], module_names: Iterable[str]) -> LoraSpec:
  """Our spec of a PEFT LoRA adapter (config + the modules its weights adapt).

  ValueError for what the adapter does and ours cannot (names the setting)."""
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}")
  for key, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False),
                  ("bias", "none")):
    if config.get(key, ok) != ok:
      raise ValueError(f"adapter setting {key}={config.get(key)!r} is not supported")
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise ValueError(f"adapter setting {key} (per-module ranks) is not supported")
  if config.get("modules_to_save"):
    raise ValueError("adapter setting modules_to_save (fully trained modules) is not supported")
  targets = []
  for name in module_names:
    target = next((t for t, p in TARGETS.items() if re.fullmatch(p, name)), None)
    if target is None:
      raise ValueError(f"adapter module {name} is not one cogvlm_jax can adapt; adaptable: "
                       f"{list(TARGETS)}")
    if target not in targets:
      targets.append(target)
  order = list(TARGETS)
  return LoraSpec.from_dict({"rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
                             "dropout": float(config.get("lora_dropout", 0.0)),
                             "targets": sorted(targets, key=order.index)})


def peft_module_names(tensors: Iterable[str]) -> list[str]:
  """Original module names of PEFT tensor names (`base_model.model.X.lora_A.weight` -> X)."""
  names = []
  for t in tensors:
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_[AB](?:\.default)?\.weight", t)
    if m is None:
      raise ValueError(f"adapter tensor {t} is not a LoRA weight")
    if m.group(1) not in names:
      names.append(m.group(1))
  return names


def from_peft_tensors(cfg: CogVLMConfig, spec: LoraSpec, tensors: Mapping[str, np.ndarray],
                      dtype=np.float32) -> dict[Path, np.ndarray]:
  """PEFT tensors -> our adapters (flat paths). Modules of a target the adapter leaves out
  (e.g. PEFT's layers_to_transform) get b = 0: no change, exactly as PEFT."""
  by_module = {}
  for name, value in tensors.items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", name)
    by_module.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value)
  out = {}
  r = spec.rank
  for unit in lora_units(cfg, spec.targets):
    a_layers, b_layers = [], {k: [] for k in unit.kernels}
    for module in unit.hf_modules:
      pair = by_module.get(module)
      if pair is not None and set(pair) != {"A", "B"}:
        raise ValueError(f"adapter module {module} lacks lora_{'A' if 'A' not in pair else 'B'}")
      a = pair["A"] if pair else np.zeros((r, unit.hf_in), dtype)
      b = pair["B"] if pair else np.zeros((sum(unit.hf_out), r), dtype)
      if a.shape != (r, unit.hf_in) or b.shape != (sum(unit.hf_out), r):
        raise ValueError(f"adapter module {module}: lora_A {a.shape} / lora_B {b.shape}, "
                         f"expected {(r, unit.hf_in)} / {(sum(unit.hf_out), r)} (rank {r})")
      a_layers.append(a.T)
      for k, block in zip(unit.kernels, np.split(b, np.cumsum(unit.hf_out)[:-1], axis=0)):
        b_layers[k].append(block.T)
    out[unit.path("a")] = _stack(a_layers, unit.stacked).astype(dtype)
    for k in unit.kernels:
      out[unit.path(f"b_{k}")] = _stack(b_layers[k], unit.stacked).astype(dtype)
  return out


def _stack(xs: list[np.ndarray], stacked: bool) -> np.ndarray:
  return np.stack(xs) if stacked else xs[0]


def set_adapters(model: nnx.Module, flat: Mapping[Path, np.ndarray]) -> None:
  """Writes adapter values (flat paths, e.g. `from_peft_tensors`) into a LoRA model, reshaped
  to each variable's shape (a PEFT [in, r] input side of a [heads, head_dim, r] `a`)."""
  state = nnx.state(model, nnx.LoRAParam)
  for path, var in nnx.to_flat_state(state):
    key = tuple(str(p) for p in path)
    if key not in flat:
      raise ValueError(f"no adapter value for {'/'.join(key)}")
    shape, dtype = var.get_value().shape, var.get_value().dtype
    var.set_value(jnp.asarray(np.asarray(flat[key]).reshape(shape), dtype))
  nnx.update(model, state)


def adapters_flat(model: nnx.Module) -> dict[Path, np.ndarray]:
  """The adapters of a LoRA model as flat numpy (`to_peft_tensors` reshapes them)."""
  return {tuple(str(p) for p in path): np.asarray(jax.device_get(v.get_value()))
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


# ---- QLoRA: the base kernels of the LoRA units, quantized (modeling/quantize.py) -----


def quantize_base(model: nnx.Module, qtype: str) -> nnx.Module:
  """Swaps every LoRA-adaptable projection kernel of `model` for a
  `quantize.QuantizedKernel` (in place; returned). Run after `apply_lora` (the adapters
  take the float kernel's dtype and shapes)."""
  quantize.check_qtype(qtype)
  for unit in lora_units(model.config, TARGETS):
    owner = _module_at(model, unit.owner)
    lead, in_dims = _unit_shapes(unit, getattr(owner, unit.kernels[0]))
    for k in unit.kernels:
      kernel = getattr(owner, k)
      if isinstance(kernel, quantize.QuantizedKernel):
        raise ValueError(f"{'/'.join(unit.owner + (k,))} is already quantized")
      setattr(owner, k, quantize.QuantizedKernel.from_param(kernel, in_dims=in_dims,
                                                            lead=lead, qtype=qtype))
  return model


def stored_layout(cfg, stored: dict) -> quantize.Layout:
  """The layout of a checkpoint's quantized kernels, from its stored {path: (shape, dtype)}:
  in_dims = qvalue's rank - qscale's rank, lead from the LoRA unit (stacked or not)."""
  layout = {}
  for unit in lora_units(cfg, TARGETS):
    for k in unit.kernels:
      path = unit.owner + (k,)
      if path + ("qvalue",) in stored:
        (q_shape, q_dtype), (s_shape, _) = stored[path + ("qvalue",)], stored[path + ("qscale",)]
        layout[path] = (len(q_shape) - len(s_shape), 1 if unit.stacked else 0, str(q_dtype))
  return layout
