"""EVA2-CLIP vision tower as used by CogVLM and CogVLM2 (the released, last-layer-dropped one).

Patch conv -> prepend CLS -> add the learned position table in full -> post-norm transformer
layers (h += LN(Attn(h)); h += LN(MLP(h))) -> drop CLS. No final norm, no interpolation: the
image size is fixed by the position table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.attention import QUERY_CHUNK, attention
from cogvlm_jax.modeling.common import LayerNorm, dense, param, scan_layers, stack_layers
from cogvlm_jax.modeling.lora import lora_for
from cogvlm_jax.sharding import constrain

# Logical axes of the ViT's activations. Pinning them matters: the ViT weights shard their
# "vision_embed" dim over the same mesh axis (fsdp) as the activations' batch, and left
# alone XLA's partitioner resolves that conflict by gathering the whole batch and sharding
# the hidden dim instead (every device then attends over all images of the microbatch).
_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


class PatchEmbedding(nnx.Module):
  """Conv(p x p, stride p) patches + CLS + learned positions: [B,S,S,3] -> [B, g^2+1, Cv]."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    v, pd = cfg.vision, cfg.param_dtype
    self.patch_size = v.patch_size
    self.dtype = cfg.dtype
    # HWIO conv kernel; the patch conv is computed as a matmul over flattened patches.
    self.proj_kernel = param(rngs, (v.patch_size, v.patch_size, v.in_channels, v.hidden_size),
                             (None, None, None, "vision_embed"), pd, std=cfg.init_std)
    self.proj_bias = param(rngs, (v.hidden_size,), ("vision_embed",), pd, "zeros")
    self.cls_embedding = param(rngs, (v.hidden_size,), ("vision_embed",), pd, std=cfg.init_std)
    self.position_embedding = param(rngs, (v.num_positions, v.hidden_size),
                                    (None, "vision_embed"), pd, std=cfg.init_std)

  def __call__(self, images: jax.Array) -> jax.Array:
    batch, height, width, channels = images.shape
    p = self.patch_size
    g_h, g_w = height // p, width // p
    # [B, gh, p, gw, p, C] -> [B, gh, gw, p, p, C]: patch rows in row-major order.
    patches = images.reshape(batch, g_h, p, g_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, g_h * g_w, p * p * channels)
    kernel = self.proj_kernel[...].reshape(p * p * channels, -1).astype(self.dtype)
    x = patches.astype(self.dtype) @ kernel + self.proj_bias[...].astype(self.dtype)
    cls = jnp.broadcast_to(self.cls_embedding[...].astype(self.dtype), (batch, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding[...].astype(self.dtype)[None]


class Attention(nnx.Module):
  """Bidirectional multi-head attention with biased q/k/v/dense projections."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    v, pd, std = cfg.vision, cfg.param_dtype, cfg.init_std
    self.dtype, self.backend = cfg.dtype, cfg.attention_backend
    # Query blocks are a loop (`lax.map`) like the layer scan; unscanned (straight-line code,
    # e.g. for XLA's FLOP count, which counts a loop body once) attention runs whole.
    self.query_chunk = QUERY_CHUNK if cfg.scan_layers else 0
    shape_in = (v.hidden_size, v.num_heads, v.head_dim)
    axes_in = ("vision_embed", "vision_heads", "head_dim")
    for name in ("query", "key", "value"):
      setattr(self, f"{name}_kernel", param(rngs, shape_in, axes_in, pd, std=std))
      setattr(self, f"{name}_bias", param(rngs, shape_in[1:], axes_in[1:], pd, "zeros"))
    self.dense_kernel = param(rngs, (v.num_heads, v.head_dim, v.hidden_size),
                              ("vision_heads", "head_dim", "vision_embed"), pd, std=std)
    self.dense_bias = param(rngs, (v.hidden_size,), ("vision_embed",), pd, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, Cv] -> [B, T, Cv]."""
    q, k, v = (constrain(dense(x, getattr(self, f"{n}_kernel"), self.dtype,
                               getattr(self, f"{n}_bias"), lora=lora_for(self, f"{n}_kernel")),
                         _HEADS) for n in ("query", "key", "value"))
    out = attention(q, k, v, None, backend=self.backend,
                    query_chunk=self.query_chunk)
    return dense(out, self.dense_kernel, self.dtype, self.dense_bias, in_dims=2,
                 lora=lora_for(self, "dense_kernel"))


class MLP(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2, with biases."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    v, pd, std = cfg.vision, cfg.param_dtype, cfg.init_std
    self.dtype = cfg.dtype
    self.fc1_kernel = param(rngs, (v.hidden_size, v.intermediate_size),
                            ("vision_embed", "vision_mlp"), pd, std=std)
    self.fc1_bias = param(rngs, (v.intermediate_size,), ("vision_mlp",), pd, "zeros")
    self.fc2_kernel = param(rngs, (v.intermediate_size, v.hidden_size),
                            ("vision_mlp", "vision_embed"), pd, std=std)
    self.fc2_bias = param(rngs, (v.hidden_size,), ("vision_embed",), pd, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(x, self.fc1_kernel, self.dtype, self.fc1_bias, lora=lora_for(self, "fc1_kernel"))
    return dense(jax.nn.gelu(h, approximate=False), self.fc2_kernel, self.dtype, self.fc2_bias,
                 lora=lora_for(self, "fc2_kernel"))


class TransformerLayer(nnx.Module):
  """Post-norm block: h += LN_a(Attn(h)); h += LN_b(MLP(h))."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    v, pd = cfg.vision, cfg.param_dtype
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.input_layernorm = LayerNorm(v.hidden_size, v.layer_norm_eps, axis_name="vision_embed",
                                     param_dtype=pd, rngs=rngs)
    self.post_attention_layernorm = LayerNorm(v.hidden_size, v.layer_norm_eps,
                                              axis_name="vision_embed", param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x + self.input_layernorm(self.attention(x)), _HIDDEN)
    return constrain(x + self.post_attention_layernorm(self.mlp(x)), _HIDDEN)


class EVA2CLIPVisionTower(nnx.Module):
  """[B, S, S, 3] normalised images -> [B, g^2, Cv] patch features (CLS dropped)."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch_embedding = PatchEmbedding(cfg, rngs=rngs)
    self.layers = stack_layers(lambda r: TransformerLayer(cfg, rngs=r),
                               cfg.vision.num_hidden_layers, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    size = self.cfg.vision.image_size
    if images.shape[1:] != (size, size, self.cfg.vision.in_channels):
      raise ValueError(f"images must be [batch, {size}, {size}, {self.cfg.vision.in_channels}] "
                       f"(NHWC, normalised); got {images.shape}")
    x = constrain(self.patch_embedding(images), _HIDDEN)
    x, _ = scan_layers(self.layers, x, None, lambda layer, h, _: (layer(h), None),
                       use_scan=self.cfg.scan_layers, remat_policy=self.cfg.remat_policy)
    return x[:, 1:]
