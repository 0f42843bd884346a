"""Small building blocks shared by the model files: parameters with logical axes, norms.

Every parameter is an `nnx.Param` carrying `logical_axes` (one name per dimension, e.g.
`("embed", "mlp")`); `cogvlm_jax.sharding` maps those names to mesh axes. Weights are stored in
JAX's [in, out] layout; the Hugging Face [out, in] layout is handled only by the converter.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.modeling.quantize import QuantizedKernel


class RopeFrequencies(nnx.Variable):
  """Non-trainable buffer: RoPE inverse frequencies, kept as loaded from the checkpoint.

  The original stores `inv_freq` in the checkpoint dtype and uses the stored values, so a
  bf16 checkpoint gives bf16-rounded frequencies; we keep the stored values to match it.
  """


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: str | Callable = "normal", std: float = 0.02) -> nnx.Param:
  """Creates an `nnx.Param` of `shape` with logical `axes` ("normal", "zeros" or "ones")."""
  if len(shape) != len(axes):
    raise ValueError(f"param shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = init(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: x * rsqrt(mean(x^2) + eps) * w, computed in float32, cast back."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, (dim,), ("norm",), param_dtype, "ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # The original multiplies weight (param dtype) by the fp32 normed value, then casts.
    return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with affine weight and bias, statistics in float32."""

  def __init__(self, dim: int, eps: float, *, axis_name: str = "norm", param_dtype,
               rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, (dim,), (axis_name,), param_dtype, "ones")
    self.bias = param(rngs, (dim,), (axis_name,), param_dtype, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(x.dtype)


def dense(x: jax.Array, kernel: nnx.Param | QuantizedKernel, dtype,
          bias: nnx.Param | None = None, in_dims: int = 1,
          lora: Callable | None = None) -> jax.Array:
  """x[..., *in] @ kernel[*in, *out] (+ bias[*out]) (+ lora(x, dtype)) in compute `dtype`.

  `in_dims` is how many leading kernel dims contract with x's trailing dims (2 for an
  output projection whose kernel is [heads, head_dim, embed]). `lora`: the kernel's LoRA
  term (`modeling.lora.lora_for`), added after the bias as PEFT does, or None. A
  `QuantizedKernel` (QLoRA's frozen base, modeling/quantize.py) is used as
  (x @ qvalue) * qscale, converted per use.
  """
  quantized = isinstance(kernel, QuantizedKernel)
  k = (kernel.qvalue if quantized else kernel)[...].astype(dtype)
  x = x.astype(dtype)
  y = jax.lax.dot_general(
      x, k, ((tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims))), ((), ())))
  if quantized:  # per-output-channel scale: it factors out of the contraction
    y = y * kernel.qscale[...].astype(dtype)
  if bias is not None:
    y = y + bias[...].astype(dtype)
  if lora is not None:
    y = y + lora(x, dtype)
  return y


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num_layers` identical layers whose params are stacked on a leading axis.

  The result is one module whose every variable has shape [layers, ...] and logical axes
  ("layers", ...); `scan_layers` runs it with `jax.lax.scan`, so compile time does not grow
  with depth.
  """
  keys = jax.random.split(rngs.params(), num_layers)

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return make_layer(nnx.Rngs(params=key))

  stacked = make(keys)
  for _, variable in nnx.iter_graph(stacked):
    if isinstance(variable, nnx.Variable) and hasattr(variable, "logical_axes"):
      variable.set_metadata("logical_axes", ("layers",) + tuple(variable.logical_axes))
  return stacked


def scan_layers(stacked: nnx.Module, carry, xs, body: Callable, *, use_scan: bool,
                remat_policy: str):
  """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers.

  `xs` is a pytree with a leading layers axis (e.g. a KV cache) or None. The layer params go
  in as scanned inputs and are never returned (returning the stacked read-only params from
  a scan body makes XLA keep a second copy of them).
  """
  graphdef, state = nnx.split(stacked)

  def step(c, per_layer):
    layer_state, x = per_layer
    return body(nnx.merge(graphdef, layer_state), c, x)

  step = remat(step, remat_policy)
  if use_scan:
    return jax.lax.scan(step, carry, (state, xs))
  num_layers = jax.tree.leaves(state)[0].shape[0]
  ys = []
  for i in range(num_layers):
    carry, y = step(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
    ys.append(y)
  ys = None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
  return carry, ys


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat(fn: Callable, policy: str) -> Callable:
  """Wraps a layer step in `jax.checkpoint` with the named policy ("none" = no remat)."""
  if policy == "none":
    return fn
  if policy not in _REMAT:
    raise ValueError(f"unknown remat policy {policy!r}; known: none, {', '.join(_REMAT)}")
  return jax.checkpoint(fn, policy=_REMAT[policy], prevent_cse=False)
