"""The one attention function of the project, with selectable backends.

* ``xla``    — plain XLA (einsum + float32 softmax); runs everywhere, used for parity tests.
* ``cudnn``  — cuDNN flash attention through `jax.nn.dot_product_attention` (GPU only).
* ``splash`` — Pallas splash attention (TPU only).

A backend whose hardware is missing falls back to ``xla`` with a one-time warning, so a
config written for a TPU pod still runs (slowly) on a laptop.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with
heads a multiple of kv_heads (query head i uses kv head i // (heads // kv_heads)).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


@functools.cache
def _warn_fallback(backend: str, reason: str) -> None:
  log.warning("attention backend %r unavailable (%s); falling back to 'xla'", backend, reason)


def _resolve_backend(backend: str) -> str:
  platform = jax.default_backend()
  if backend == "cudnn" and platform != "gpu":
    _warn_fallback(backend, f"needs a GPU, running on {platform}")
    return "xla"
  if backend == "splash":
    if platform != "tpu":
      _warn_fallback(backend, f"needs a TPU, running on {platform}")
      return "xla"
    try:
      from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the jax build
      _warn_fallback(backend, f"cannot import splash attention: {e}")
      return "xla"
  return backend


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              backend: str = "xla", is_causal: bool = False) -> jax.Array:
  """Softmax attention; returns [batch, q_len, heads, head_dim] in q's dtype.

  Args:
    q, k, v: see module docstring.
    mask: bool, broadcastable to [batch, 1, q_len, kv_len]; True = may attend. It already
      contains causality and padding when given; `is_causal` then only tells the fused
      backends that the mask is lower-triangular (plus padding).
    backend: "xla", "cudnn" or "splash".
    is_causal: whether the mask is causal (lets flash kernels skip masked blocks).
  """
  backend = _resolve_backend(backend)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if backend == "splash":
    return _splash_attention(q, k, v, mask, is_causal)
  return _xla_attention(q, k, v, mask)


def _xla_attention(q, k, v, mask):
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  # Group query heads by the kv head they share instead of repeating k/v in memory.
  q = q.reshape(batch, q_len, kv_heads, group, head_dim)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  if mask is not None:
    # mask [b, 1, q, s] -> [b, 1, 1, q, s]; masked scores get the float32 minimum, as the
    # original adds finfo.min (their softmax weight is exactly 0 in both).
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)


def _splash_attention(q, k, v, mask, is_causal):  # pragma: no cover - TPU only
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  if mask is not None and not is_causal:
    raise NotImplementedError("splash backend supports causal (+padding) or no mask only")
  base = sm.CausalMask((q_len, kv_len)) if is_causal else sm.FullMask((q_len, kv_len))
  kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * heads), head_shards=1, q_seq_shards=1)
  group = heads // k.shape[2]
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  # Padding enters as segment ids: padded keys get segment 0, real tokens 1.
  segment_ids = None
  if mask is not None:
    key_valid = jnp.any(mask[:, 0], axis=1).astype(jnp.int32)  # [b, kv_len]
    query_valid = jnp.any(mask[:, 0], axis=2).astype(jnp.int32)  # [b, q_len]
    segment_ids = sk.SegmentIds(q=query_valid, kv=key_valid)
  scale = head_dim ** -0.5
  to_bhsd = lambda x: jnp.swapaxes(x, 1, 2)
  run = lambda q_, k_, v_, s_: kernel(q_ * scale, k_, v_, segment_ids=s_)
  if segment_ids is None:
    out = jax.vmap(lambda a, b, c: kernel(a * scale, b, c))(to_bhsd(q), to_bhsd(k), to_bhsd(v))
  else:
    out = jax.vmap(run)(to_bhsd(q), to_bhsd(k), to_bhsd(v), segment_ids)
  return jnp.swapaxes(out, 1, 2)
