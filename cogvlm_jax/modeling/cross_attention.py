"""CogAgent's cross-attention block and the decoder layer that uses it.

Layer order (all norms RMSNorm, float32 statistics):
  h += SelfAttn(input_layernorm(h))                       (CogVLM v1's, unchanged)
  h += CrossAttn(post_cross_attention_layernorm(h), E)    (this file)
  h += MLP(post_attention_layernorm(h))                   (CogVLM v1's, unchanged)

The cross-attention has one set of weights for every token (no expert routing), no biases,
no RoPE and no mask: the queries of row b attend to all N cross features of row b. It uses
the LM's head count H with head dim hc = Cc / H (and scale hc^-1/2).
"""

from __future__ import annotations

import jax
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.attention import QUERY_CHUNK, attention
from cogvlm_jax.modeling.common import RMSNorm, dense, param
from cogvlm_jax.modeling.decoder import DecoderLayer
from cogvlm_jax.sharding import constrain

_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


class CrossAttention(nnx.Module):
  """`cross_attn`: query [D -> H x hc], key / value [Cx -> H x hc] (the original's fused
  `key_value`, split), dense [H x hc -> D]."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    d, h, hc, cx = (cfg.hidden_size, cfg.num_attention_heads, cfg.cross_head_dim,
                    cfg.cross_vision.width)
    pd, std = cfg.param_dtype, cfg.init_std
    self.dtype, self.backend = cfg.dtype, cfg.attention_backend
    self.query_chunk = QUERY_CHUNK if cfg.scan_layers else 0
    self.query = param(rngs, (d, h, hc), ("embed", "heads", "head_dim"), pd, std=std)
    self.key = param(rngs, (cx, h, hc), ("cross_embed", "heads", "head_dim"), pd, std=std)
    self.value = param(rngs, (cx, h, hc), ("cross_embed", "heads", "head_dim"), pd, std=std)
    self.dense = param(rngs, (h, hc, d), ("heads", "head_dim", "embed"), pd, std=std)

  def key_value(self, cross: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross features E [B, N, Cx] -> (k, v), each [B, N, H, hc]; computed once per prompt."""
    k = constrain(dense(cross, self.key, self.dtype), _HEADS)
    v = constrain(dense(cross, self.value, self.dtype), _HEADS)
    return k, v

  def __call__(self, x: jax.Array, cross_kv: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [B, T, D], cross_kv ([B, N, H, hc], [B, N, H, hc]) -> [B, T, D]."""
    q = constrain(dense(x, self.query, self.dtype), _HEADS)
    k, v = cross_kv
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), None, backend=self.backend,
                    query_chunk=self.query_chunk)
    return dense(out, self.dense, self.dtype, in_dims=2)


class CogAgentDecoderLayer(DecoderLayer):
  """CogVLM's decoder layer with the cross-attention between self-attention and MLP."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.post_cross_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                  param_dtype=cfg.param_dtype, rngs=rngs)
    self.cross_attn = CrossAttention(cfg, rngs=rngs)

  def __call__(self, h, routing, position_ids, mask, kv_cache=None, *, cross=None,
               cross_kv=None):
    """h [B, T, D] -> ([B, T, D], the updated self-attention cache view or None).

    Exactly one of `cross` (E [B, N, Cx]: this layer projects its K/V) or `cross_kv` (this
    layer's K/V, [B, N, H, hc] each, computed at the prefill) is given.
    """
    if (cross is None) == (cross_kv is None):
      raise ValueError("CogAgent decoder layer: pass exactly one of cross / cross_kv")
    if cross_kv is None:
      cross_kv = self.cross_attn.key_value(cross)
    attn_out, kv_cache = self.self_attn(self.input_layernorm(h), routing, position_ids, mask,
                                        kv_cache)
    h = h + attn_out
    h = h + self.cross_attn(self.post_cross_attention_layernorm(h), cross_kv)
    h = h + self.mlp(self.post_attention_layernorm(h), routing)
    h = constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    return h, kv_cache
