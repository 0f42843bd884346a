"""QLoRA's frozen base: projection kernels stored in int8 / int4, dequantized per use.

A kernel W [L?, *in, *out] (L: the stacked layers axis) is stored as

    qvalue [L?, *in, *out]  int8 (or int4): round(W / qscale), clipped to +-(2^(bits-1) - 1)
    qscale [L?, *out]       float32: absmax of W over the input dims / (2^(bits-1) - 1)

(symmetric per-output-channel absmax, as LLM.int8()'s weight side and AQT's per-channel
mode). `qvalue` keeps the kernel's logical axes and `qscale` the kernel's output (and layer)
axes, so both shard like the float kernel did. Because the scale is per output channel it
factors out of the contraction: `common.dense` computes (x @ qvalue) * qscale, the int8
tile converted to the compute dtype inside the matmul's operand fusion, never a whole
dequantized copy of the model.

`lora.quantize_base(model, qtype)` swaps every projection kernel that LoRA can adapt (the kernels
of `lora.lora_units(cfg, TARGETS)`: experts' QKV / dense / MLPs, the adapter, the ViT) for a
`QuantizedKernel` holding both; embeddings, lm_head, norms and biases stay float (QLoRA's
practice, as bitsandbytes' default skip of lm_head). The kernel's path gains one level:
`.../query` -> `.../query/qvalue`, `.../query/qscale`.

Why our own and not a library: Qwix (whose quantization primitives would fit) is not on the
package index this project installs from, and Flax's `nnx` has no weight-only quantized
parameter type; int8/int4 absmax is a dozen lines of jnp. int4 uses JAX's native `jnp.int4`
(packed two per byte on TPU): forward only for now, not a `train.lora.base_dtype` (see
`lora.BASE_DTYPES`). NF4 (a 16-value lookup with block scales) is not done.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QTYPES = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}


class QuantValue(nnx.Variable):
  """Frozen, quantized kernel values (int8 / int4), the kernel's shape and logical axes."""


class QuantScale(nnx.Variable):
  """Frozen float32 per-output-channel scale of a quantized kernel [L?, *out]."""


def check_qtype(qtype: str) -> str:
  if qtype not in QTYPES:
    raise ValueError(f"unknown base dtype {qtype!r}; known: {list(QTYPES)}")
  return qtype


def quantize_array(w, in_dims: int, lead: int, qtype: str):
  """W [lead dims, *in (in_dims), *out] -> (qvalue like W in `qtype`, qscale [lead, *out]
  float32). Works on numpy or (sharded) jax arrays; float32 math."""
  dtype, qmax = QTYPES[check_qtype(qtype)]
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(lead, lead + in_dims))
  absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax, 1.0)  # an all-zero channel: any scale
  q = jnp.clip(jnp.round(w / scale), -qmax, qmax).astype(dtype)
  return q, jnp.squeeze(scale, axes)


def dequantize_array(q, scale, in_dims: int, lead: int, dtype=jnp.float32):
  """The inverse of `quantize_array` (up to its rounding): qvalue * qscale in `dtype`."""
  scale = jnp.expand_dims(jnp.asarray(scale, jnp.float32), tuple(range(lead, lead + in_dims)))
  return (jnp.asarray(q).astype(jnp.float32) * scale).astype(dtype)


class QuantizedKernel(nnx.Module):
  """A frozen kernel in `qtype`: qvalue [L?, *in, *out], qscale [L?, *out] (see module doc).

  `common.dense` multiplies x by `qvalue` and scales the output channels by `qscale`.
  Static: in_dims (input dims of the kernel), lead (1 for stacked layers, else 0), qtype."""

  def __init__(self, qvalue: QuantValue, qscale: QuantScale, *, in_dims: int, lead: int,
               qtype: str):
    self.qvalue, self.qscale = qvalue, qscale
    self.in_dims, self.lead, self.qtype = in_dims, lead, qtype

  @classmethod
  def from_param(cls, kernel: nnx.Variable, *, in_dims: int, lead: int, qtype: str):
    axes = tuple(kernel.logical_axes)
    q, scale = quantize_array(kernel.get_value(), in_dims, lead, qtype)
    return cls(QuantValue(q, logical_axes=axes),
               QuantScale(scale, logical_axes=axes[:lead] + axes[lead + in_dims:]),
               in_dims=in_dims, lead=lead, qtype=qtype)

  @property
  def layout(self) -> tuple[int, int, str]:
    return self.in_dims, self.lead, self.qtype

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float kernel [L?, *in, *out] in `dtype` (merging and tests; `dense` does not)."""
    return dequantize_array(self.qvalue[...], self.qscale[...], self.in_dims, self.lead, dtype)


Path = tuple[str, ...]
Layout = dict[Path, tuple[int, int, str]]  # kernel path -> (in_dims, lead, qtype)


def layout_of(model: nnx.Module) -> Layout:
  """Every `QuantizedKernel` of `model` (real or abstract): path -> (in_dims, lead, qtype)."""
  return {tuple(str(p) for p in path): node.layout for path, node in nnx.iter_graph(model)
          if isinstance(node, QuantizedKernel)}


def quantize_flat(flat: dict, layout: Layout) -> dict:
  """Flat float weights -> the same with each kernel of `layout` found replaced by its
  `qvalue` / `qscale` entries (a float checkpoint loaded into a QLoRA run)."""
  out = dict(flat)
  for path, (in_dims, lead, qtype) in layout.items():
    if path in out:
      q, scale = quantize_array(out.pop(path), in_dims, lead, qtype)
      out[path + ("qvalue",)], out[path + ("qscale",)] = q, scale
  return out


def dequantize_flat(flat: dict, layout: Layout) -> dict:
  """The inverse of `quantize_flat` (numpy float32 kernels; merge-lora of a QLoRA run)."""
  out = dict(flat)
  for path, (in_dims, lead, _) in layout.items():
    if path + ("qvalue",) in out:
      q, scale = out.pop(path + ("qvalue",)), out.pop(path + ("qscale",))
      out[path] = np.asarray(dequantize_array(q, scale, in_dims, lead))
  return out


def is_quant_path(path) -> bool:
  """True for a quantized kernel's `qvalue` / `qscale` leaf."""
  return str(getattr(path[-1], "key", path[-1])) in ("qvalue", "qscale") if path else False
