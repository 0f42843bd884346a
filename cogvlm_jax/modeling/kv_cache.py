"""Preallocated KV cache for decoding under `jit` (static shapes, written in place).

All rows of a batch share one write index: prompts are left-padded to a common length, so
the slot of step t is the same for every row; padding is excluded through `key_mask`.
Keys are stored after RoPE and without repeating grouped KV heads.

The whole cache ([layers, batch, max_len, ...]) is carried through the layer scan, and each
layer writes its new keys / values into it with one `dynamic_update_slice` at
(layer, index). A buffer that is loop-carried (and donated across jitted steps) is updated
in place by XLA; returning per-layer caches as the scan's stacked outputs instead makes XLA
build a fresh zero-filled cache and copy it back on every decoding step.

Attention reads only the first `kv_len` slots (static): the filled part rounded up by the
caller (`generate` grows it in phases), not the whole preallocated length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cogvlm_jax.config import CogVLMConfig

CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  """key, value: [layers, batch, max_len, kv_heads, head_dim];
  key_mask: bool [batch, max_len] (slot holds a real token); index: int32 [] next free slot."""

  key: jax.Array
  value: jax.Array
  key_mask: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: CogVLMConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.key.shape[2]

  def attention_mask(self, attention_mask: jax.Array,
                     kv_len: int | None = None) -> tuple["KVCache", jax.Array]:
    """Records the new tokens' padding and returns the mask of the step's queries.

    attention_mask: [batch, new] (1 = real token); kv_len: static number of leading slots
    the queries attend to (default max_len; the caller ensures index + new <= kv_len).
    Returns the cache with `key_mask` updated and bool [batch, 1, new, kv_len]: query i
    (slot index+i) may see slot j iff j is a real token and j <= index + i.
    """
    kv_len = self.max_len if kv_len is None else kv_len
    new = attention_mask.shape[1]
    key_mask = jax.lax.dynamic_update_slice_in_dim(self.key_mask, attention_mask.astype(bool),
                                                   self.index, axis=1)
    query_slot = self.index + jnp.arange(new)[:, None]
    causal = jnp.arange(kv_len)[None, :] <= query_slot  # [new, kv_len]
    mask = causal[None, None] & key_mask[:, None, None, :kv_len]
    return self.replace(key_mask=key_mask), mask


@struct.dataclass
class LayerCache:
  """One layer's view of the whole cache inside the layer scan.

  key, value: the full buffers [layers, batch, max_len, kv_heads, head_dim] (scan carry);
  layer: int32 [] this layer; index: int32 [] first slot of the new tokens;
  kv_len: static number of leading slots attention reads.
  """

  key: jax.Array
  value: jax.Array
  layer: jax.Array
  index: jax.Array
  kv_len: int = struct.field(pytree_node=False)

  def update(self, k: jax.Array, v: jax.Array):
    """Writes k, v [batch, new, kv_heads, head_dim] at (layer, index), in place.

    Returns (the updated view, this layer's keys and values [batch, kv_len, kv_heads,
    head_dim] for attention).
    """
    key, value = _write(self.key, self.layer, self.index, k), _write(
        self.value, self.layer, self.index, v)
    view = self.replace(key=key, value=value)
    return view, _read(key, self.layer, self.kv_len), _read(value, self.layer, self.kv_len)


def _write(buffer: jax.Array, layer: jax.Array, index: jax.Array, new: jax.Array) -> jax.Array:
  """buffer [L, B, S, KV, hd] with new [B, T, KV, hd] at [layer, :, index:index+T]."""
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_update_slice(buffer, new[None].astype(buffer.dtype),
                                      (layer, zero, index, zero, zero))


def _read(buffer: jax.Array, layer: jax.Array, kv_len: int) -> jax.Array:
  """buffer[layer, :, :kv_len] -> [B, kv_len, KV, hd] (the only part attention reads)."""
  _, batch, _, heads, dim = buffer.shape
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_slice(buffer, (layer, zero, zero, zero, zero),
                               (1, batch, kv_len, heads, dim))[0]
