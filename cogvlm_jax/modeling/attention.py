"""The one attention function of the project, with selectable backends.

* ``xla``    — plain XLA (einsum + float32 softmax); runs everywhere, used for parity tests.
  With ``query_chunk``, long queries run in blocks of about that many rows (exact: every
  block sees all keys), so only one block's [heads, chunk, kv_len] scores are live at a time.
* ``cudnn``  — cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
* ``splash`` — Pallas splash attention (TPU): any sequence length (padded to the kernel
  block, the padding masked through segment ids), GQA without repeating K/V, run per shard
  under `shard_map` (batch over data+fsdp, heads over tensor) on a sharded mesh.
* ``auto``   — splash on TPU, cuDNN on GPU (bf16/fp16 inputs), xla otherwise.

The platform is that of the mesh the model is sharded over (`sharding.mesh_platform`: the
`activation_sharding` context's devices), not `jax.default_backend()`, so a train step
compiled from a CPU host for TPU topology devices gets splash. A backend whose hardware is
missing falls back to ``xla`` with a one-time warning, so a config written for a TPU pod
still runs (slowly) on a laptop. `splash_interpret()` runs the splash kernel in Pallas
interpret mode on any platform (the CPU tests of the kernel).

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with
heads a multiple of kv_heads (query head i uses kv head i // (heads // kv_heads)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cogvlm_jax import sharding as sharding_lib

log = logging.getLogger(__name__)

# The query block the model's layers ask of the xla backend. Whole, the float32 scores of
# CogVLM2's 1344 px ViT are [16, 9217, 9217] = 5 GiB per image and layer (those of a 4096
# token decoder row [32, 4096, 4096] = 2 GiB), and the backward pass holds several of them;
# in blocks of ~1024 queries, ~0.5 GiB each.
QUERY_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Splash kernel tile sizes (query rows, key columns), forward and backward alike.

  Sequences are padded up to a multiple of the block, so a block is clipped to the padded
  length of short sequences (17 ViT tokens run in one 128-row block, not 512). TPU tiles
  want multiples of 128; 512 keeps the padding of 9217 ViT tokens at 5.5%.
  """
  q: int = 512
  kv: int = 512

  def for_length(self, length: int) -> "SplashBlocks":
    """Blocks no larger than `length` rounded up to 128 (the lane width)."""
    cap = -(-length // 128) * 128
    return SplashBlocks(min(self.q, cap), min(self.kv, cap))

  @property
  def multiple(self) -> int:
    """Sequences are padded to a multiple of this: every block divides it."""
    return math.lcm(self.q, self.kv)


# The blocks the model's layers use; `attention(..., splash_blocks=...)` overrides them.
SPLASH_BLOCKS = SplashBlocks()
BACKENDS = ("auto", "xla", "cudnn", "splash")

_interpret = False


@contextlib.contextmanager
def splash_interpret(enabled: bool = True):
  """Within this context the splash backend runs in Pallas interpret mode on any platform
  (CPU included): slow, exact, for testing the kernel path without a TPU."""
  global _interpret
  previous, _interpret = _interpret, enabled
  try:
    yield
  finally:
    _interpret = previous


@functools.cache
def _warn_fallback(backend: str, reason: str) -> None:
  log.warning("attention backend %r unavailable (%s); falling back to 'xla'", backend, reason)


def _resolve_backend(backend: str, dtype=None) -> str:
  """The backend that will run: `backend`, or "xla" where its hardware / build is missing.

  The platform is the mesh's (see module docstring). `auto` never warns.
  """
  if backend not in BACKENDS:
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
  platform = sharding_lib.mesh_platform()
  if _interpret and backend in ("auto", "splash"):
    return "splash"
  if backend == "auto":
    if platform == "tpu":
      return "splash"
    half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if platform == "gpu" and half else "xla"
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
              backend: str = "xla", is_causal: bool = False, query_chunk: int = 0,
              splash_blocks: SplashBlocks | None = None) -> jax.Array:
  """Softmax attention; returns [batch, q_len, heads, head_dim] in q's dtype.

  Args:
    q, k, v: see module docstring.
    mask: bool, broadcastable to [batch, 1, q_len, kv_len]; True = may attend. It already
      contains causality and padding when given; `is_causal` then only tells the fused
      backends that the mask is lower-triangular plus key padding (splash reads only the
      key padding from it: its last query row).
    backend: "auto", "xla", "cudnn" or "splash".
    is_causal: whether the mask is causal (lets flash kernels skip masked blocks).
    query_chunk: xla backend only (the fused ones never materialise the scores): when > 0
      and q_len exceeds it, compute the queries in blocks of at most about this many rows.
    splash_blocks: splash tile sizes (default `SPLASH_BLOCKS`).
  """
  backend = _resolve_backend(backend, q.dtype)
  if backend == "splash" and not _splash_supports(q, k, mask, is_causal):
    backend = "xla"
  if backend == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if backend == "splash":
    return _sharded_splash(q, k, v, mask, is_causal, splash_blocks or SPLASH_BLOCKS)
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


def _splash_supports(q, k, mask, is_causal) -> bool:
  """Whether splash computes this call: self-attention (q_len == kv_len) whose mask is
  causal + key padding (is_causal) or absent. Cached decoding (one query against the
  whole cache, a KV-cache mask) stays on xla: it is memory-bound, no kernel needed."""
  return q.shape[1] == k.shape[1] and (mask is None or is_causal)


def _sharded_splash(q, k, v, mask, is_causal, blocks: SplashBlocks):
  """`_splash_attention` per shard: under `shard_map` when an `activation_sharding` mesh
  is set, with batch over the data-parallel axes and heads over tensor (where they divide).

  A Pallas kernel is opaque to XLA's partitioner, so without shard_map a sharded input
  would be gathered onto every device. Keys' padding (from the mask) is computed first
  and travels as a [batch, kv_len] array, so the [b, 1, q, s] mask is never split.
  """
  key_valid = _key_valid(mask, q.shape[0], k.shape[1])
  ctx = sharding_lib.current_activation_sharding()
  run = functools.partial(_splash_attention, is_causal=is_causal, blocks=blocks,
                          interpret=_interpret)
  if ctx is None:
    return run(q, k, v, key_valid)
  mesh, rules = ctx
  batch_axes = sharding_lib.logical_to_spec(("activation_batch",), rules)[0]
  head_axis = sharding_lib.logical_to_spec(("activation_heads",), rules)[0]
  heads_ok = all(x.shape[2] % sharding_lib._mesh_size(mesh, head_axis) == 0 for x in (q, k))
  spec = sharding_lib.divisible_spec(
      q.shape, PartitionSpec(batch_axes, None, head_axis if heads_ok else None, None), mesh)
  valid_spec = PartitionSpec(spec[0], None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, valid_spec),
                       out_specs=spec, check_vma=False)(q, k, v, key_valid)


def _key_valid(mask, batch: int, kv_len: int) -> jax.Array:
  """bool [batch, kv_len]: which keys any query may attend to (all, without a mask).

  For a causal + key-padding mask, the last query row is exactly the key padding (every
  real key is at or before the last position), for left and right padding alike.
  """
  if mask is None:
    return jnp.ones((batch, kv_len), bool)
  return jnp.broadcast_to(mask[:, 0, -1, :], (batch, kv_len)).astype(bool)


def _splash_kernel(heads: int, length: int, is_causal: bool, blocks: SplashBlocks,
                   interpret: bool):
  """The splash kernel for [heads, length, head_dim] queries (length a multiple of blocks).

  Not cached: it holds its block masks as jax arrays, made in the current trace.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  base = sm.CausalMask((length, length)) if is_causal else sm.FullMask((length, length))
  sizes = sk.BlockSizes(block_q=blocks.q, block_kv=blocks.kv, block_kv_compute=blocks.kv,
                        block_q_dkv=blocks.q, block_kv_dkv=blocks.kv,
                        block_kv_dkv_compute=blocks.kv, block_q_dq=blocks.q,
                        block_kv_dq=blocks.kv)
  return sk.make_splash_mha(sm.MultiHeadMask([base] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, key_valid, *, is_causal: bool, blocks: SplashBlocks,
                      interpret: bool):
  """Splash attention of one shard. q [b, t, h, d]; k, v [b, t, kv, d]; key_valid [b, t].

  The sequence is padded to a multiple of the block. Real tokens get segment id 1, key
  padding and block padding 0: a real query sees only real keys, as in the mask. Padding
  queries see padding keys (at least themselves, so no row is empty); their outputs are
  garbage the caller never reads, like the xla backend's rows for masked queries.
  GQA: the MHA kernel maps query head i to kv head i // (h / kv) itself, no repeat.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  batch, length, heads, head_dim = q.shape
  blocks = blocks.for_length(length)
  padded = -(-length // blocks.multiple) * blocks.multiple
  pad = padded - length
  kernel = _splash_kernel(heads, padded, is_causal, blocks, interpret)
  # [b, t, h, d] -> [b, h, t_padded, d], the kernel's layout (one example per call).
  to_kernel = lambda x: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), 1, 2)
  segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, pad)))
  scale = head_dim ** -0.5

  def one(q_, k_, v_, seg):
    return kernel(q_ * scale, k_, v_, segment_ids=sk.SegmentIds(q=seg, kv=seg))

  out = jax.vmap(one)(to_kernel(q), to_kernel(k), to_kernel(v), segments)
  return jnp.swapaxes(out, 1, 2)[:, :length].astype(q.dtype)
