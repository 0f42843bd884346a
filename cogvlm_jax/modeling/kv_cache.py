"""Preallocated KV cache for decoding under `jit` (static shapes, written in place).

All rows of a batch share one write index: prompts are left-padded to a common length, so
the slot of step t is the same for every row; padding is excluded through `key_mask`.
Keys are stored after RoPE and without repeating grouped KV heads.
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

  def attention_mask(self, attention_mask: jax.Array) -> tuple["KVCache", jax.Array]:
    """Records the new tokens' padding and returns the mask of the step's queries.

    attention_mask: [batch, new] (1 = real token). Returns the cache with `key_mask` updated
    and bool [batch, 1, new, max_len]: query i (slot index+i) may see slot j iff j is a real
    token and j <= index + i.
    """
    new = attention_mask.shape[1]
    key_mask = jax.lax.dynamic_update_slice_in_dim(self.key_mask, attention_mask.astype(bool),
                                                   self.index, axis=1)
    query_slot = self.index + jnp.arange(new)[:, None]
    causal = jnp.arange(self.max_len)[None, :] <= query_slot  # [new, max_len]
    mask = causal[None, None] & key_mask[:, None, None, :]
    return self.replace(key_mask=key_mask), mask
