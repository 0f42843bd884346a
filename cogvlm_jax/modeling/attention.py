"""The one attention function of the project, with selectable backends.

* ``xla``    — plain XLA (einsum + float32 softmax); runs everywhere, used for parity tests.
  With ``query_chunk``, long queries run in blocks of about that many rows (exact: every
  block sees all keys), so only one block's [heads, chunk, kv_len] scores are live at a time.
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

# The query block the model's layers ask of the xla backend. Whole, the float32 scores of
# CogVLM2's 1344 px ViT are [16, 9217, 9217] = 5 GiB per image and layer (those of a 4096
# token decoder row [32, 4096, 4096] = 2 GiB), and the backward pass holds several of them;
# in blocks of ~1024 queries, ~0.5 GiB each.
QUERY_CHUNK = 1024


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
              backend: str = "xla", is_causal: bool = False,
              query_chunk: int = 0) -> jax.Array:
  """Softmax attention; returns [batch, q_len, heads, head_dim] in q's dtype.

  Args:
    q, k, v: see module docstring.
    mask: bool, broadcastable to [batch, 1, q_len, kv_len]; True = may attend. It already
      contains causality and padding when given; `is_causal` then only tells the fused
      backends that the mask is lower-triangular (plus padding).
    backend: "xla", "cudnn" or "splash".
    is_causal: whether the mask is causal (lets flash kernels skip masked blocks).
    query_chunk: xla backend only (the fused ones never materialise the scores): when > 0
      and q_len exceeds it, compute the queries in blocks of at most about this many rows.
  """
  backend = _resolve_backend(backend)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if backend == "splash":
    return _splash_attention(q, k, v, mask, is_causal)
  if query_chunk and q.shape[1] > query_chunk:
    return _chunked_xla_attention(q, k, v, mask, query_chunk)
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


def _query_blocks(q_len: int, chunk: int) -> tuple[int, int]:
  """(number of blocks, rows per block) covering q_len rows with blocks of <= ~chunk rows.

  The rows are spread evenly over the blocks and rounded up to a multiple of 8 (a sublane
  tile), so the padding is small: 9217 ViT tokens with chunk 1024 -> 10 blocks of 928.
  """
  num = -(-q_len // chunk)
  rows = -(-q_len // num)
  return num, -(-rows // 8) * 8


def _chunked_xla_attention(q, k, v, mask, chunk):
  """`_xla_attention` over query blocks: the same numbers, O(chunk * kv_len) scores memory.

  Softmax is over keys, so a block of queries against ALL keys is exact (no online
  rescaling as in flash attention). The blocks run in a `lax.map`, each under
  `jax.checkpoint` so the backward pass recomputes one block's probabilities at a time
  instead of the forward saving every block's (which would be the full [h, q, s] again).
  Padding rows (queries past q_len) attend to every key and are dropped.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  num, rows = _query_blocks(q_len, chunk)
  pad = num * rows - q_len
  # [b, q, h, d] -> [num, b, rows, h, d]: the map runs over the leading block axis.
  q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_blocks = jnp.moveaxis(q_blocks.reshape(batch, num, rows, heads, head_dim), 1, 0)
  per_query_mask = mask is not None and mask.shape[2] != 1
  if per_query_mask:
    # [b|1, 1, q, s] -> [num, b|1, 1, rows, s]; padded query rows may attend to all keys.
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q_len, kv_len))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    mask = jnp.moveaxis(mask.reshape(mask.shape[0], 1, num, rows, kv_len), 2, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(xs):
    q_block, mask_block = xs
    return _xla_attention(q_block, k, v, mask_block if per_query_mask else mask)

  out = jax.lax.map(block, (q_blocks, mask if per_query_mask else None))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, num * rows, heads, head_dim)
  return out[:, :q_len]


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
