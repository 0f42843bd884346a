"""The expert-routed LLaMA decoder: RoPE, visual-expert attention and MLP, the layer stack.

Each layer: h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h)). Attention and MLP hold two sets of
weights (`vision_expert_*`, `language_expert_*` / `vision_mlp`, `language_mlp`); `route`
sends every token through exactly one of them. All tokens share one causal attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.attention import QUERY_CHUNK, attention
from cogvlm_jax.modeling.common import RMSNorm, RopeFrequencies, dense, param
from cogvlm_jax.modeling.kv_cache import LayerCache
from cogvlm_jax.modeling.lora import lora_for
from cogvlm_jax.modeling.routing import ExpertRouting, route
from cogvlm_jax.sharding import constrain


def rope_inv_freq(head_dim: int, base: float) -> jax.Array:
  """inv_freq[j] = 1 / base^(2j / head_dim), j < head_dim / 2 (float32)."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, position_ids: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """GPT-NeoX rotate-half RoPE over the full head dim.

  x: [batch, seq, heads, head_dim]; position_ids: int [batch, seq]; inv_freq: [head_dim/2].
  Angles are float32 positions times the stored inv_freq, as in the original.
  """
  angles = position_ids.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, hd]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class QKVProjection(nnx.Module):
  """One expert's query/key/value projections, [B, T, D] -> q [B,T,H,hd], k/v [B,T,KV,hd]."""

  def __init__(self, cfg: CogVLMConfig, use_bias: bool, *, rngs: nnx.Rngs):
    d, h, kv, hd, pd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.param_dtype)
    self.dtype = cfg.dtype
    self.query = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std=cfg.init_std)
    self.key = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, std=cfg.init_std)
    self.value = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd,
                       std=cfg.init_std)
    if use_bias:
      self.query_bias = param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros")
      self.key_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, "zeros")
      self.value_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, "zeros")
    else:
      self.query_bias = self.key_bias = self.value_bias = None

  def __call__(self, x: jax.Array):
    return (dense(x, self.query, self.dtype, self.query_bias, lora=lora_for(self, "query")),
            dense(x, self.key, self.dtype, self.key_bias, lora=lora_for(self, "key")),
            dense(x, self.value, self.dtype, self.value_bias,
                  lora=lora_for(self, "value")))


class OutputProjection(nnx.Module):
  """[B, T, H, hd] -> [B, T, D], no bias."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.kernel = param(rngs, (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size),
                        ("heads", "head_dim", "embed"), cfg.param_dtype, std=cfg.init_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(x, self.kernel, self.dtype, in_dims=2, lora=lora_for(self, "kernel"))


class SwiGLU(nnx.Module):
  """down(SiLU(gate(x)) * up(x)), no biases: [B, T, D] -> [B, T, D]."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    d, f, pd, std = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype, cfg.init_std
    self.dtype = cfg.dtype
    self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), pd, std=std)
    self.up_proj = param(rngs, (d, f), ("embed", "mlp"), pd, std=std)
    self.down_proj = param(rngs, (f, d), ("mlp", "embed"), pd, std=std)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = dense(x, self.gate_proj, self.dtype, lora=lora_for(self, "gate_proj"))
    up = dense(x, self.up_proj, self.dtype, lora=lora_for(self, "up_proj"))
    return dense(jax.nn.silu(gate) * up, self.down_proj, self.dtype,
                 lora=lora_for(self, "down_proj"))


class VisionExpertAttention(nnx.Module):
  """Causal attention whose QKV and output projections are chosen per token by `route`."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    self.backend = cfg.attention_backend
    # As in the ViT: query blocks (a loop) only when the layers are scanned too.
    self.query_chunk = QUERY_CHUNK if cfg.scan_layers else 0
    self.vision_expert_query_key_value = QKVProjection(cfg, cfg.vision_expert_qkv_bias,
                                                       rngs=rngs)
    self.language_expert_query_key_value = QKVProjection(cfg, False, rngs=rngs)
    self.vision_expert_dense = OutputProjection(cfg, rngs=rngs)
    self.language_expert_dense = OutputProjection(cfg, rngs=rngs)
    self.inv_freq = RopeFrequencies(rope_inv_freq(cfg.head_dim, cfg.rope_base),
                                    logical_axes=(None,))

  def __call__(self, x, routing: ExpertRouting, position_ids, mask,
               kv_cache: LayerCache | None = None):
    """x [B,T,D]; mask bool [B,1,T,K] (K = T, or kv_cache.kv_len); kv_cache or None.

    Returns the output [B, T, D] and the updated cache view (None without one).
    """
    q, k, v = route(x, routing, self.vision_expert_query_key_value,
                    self.language_expert_query_key_value)
    q = apply_rope(q, position_ids, self.inv_freq[...])
    k = apply_rope(k, position_ids, self.inv_freq[...])
    if kv_cache is not None:
      kv_cache, k, v = kv_cache.update(k, v)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, backend=self.backend,
                    is_causal=True, query_chunk=self.query_chunk)
    out = route(out, routing, self.vision_expert_dense, self.language_expert_dense)
    return out, kv_cache


class VisionExpertMLP(nnx.Module):
  """Per-token choice between `vision_mlp` and `language_mlp`."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    self.language_mlp = SwiGLU(cfg, rngs=rngs)
    self.vision_mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x, routing: ExpertRouting):
    return route(x, routing, self.vision_mlp, self.language_mlp)


class DecoderLayer(nnx.Module):
  """Pre-norm LLaMA layer with visual experts."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    pd = cfg.param_dtype
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.self_attn = VisionExpertAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd,
                                            rngs=rngs)
    self.mlp = VisionExpertMLP(cfg, rngs=rngs)

  def __call__(self, h, routing, position_ids, mask, kv_cache: LayerCache | None = None):
    """h [B, T, D] -> ([B, T, D], the updated cache view or None)."""
    attn_out, kv_cache = self.self_attn(self.input_layernorm(h), routing, position_ids, mask,
                                        kv_cache)
    h = h + attn_out
    h = h + self.mlp(self.post_attention_layernorm(h), routing)
    h = constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    return h, kv_cache
