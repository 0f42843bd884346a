"""CogAgent's high-resolution tower: EVA2-CLIP-L with 2D RoPE (`model.cross_vision`).

[B, Sx, Sx, 3] normalised images -> patch conv (with bias) -> prepend CLS -> + absolute table
`vit_pos_embed` -> the first Lx - 1 of Lx stored pre-norm blocks (2D RoPE on the patch tokens'
q and k, sub-LayerNorms before `proj` and `w3`) -> drop CLS -> + `pos_embed` = the cross
features E [B, N, Cx] that every decoder layer's cross-attention reads. The stored last block,
`norm` and `head` are parameters (checkpoints carry them) but are never computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.config import CogVLMConfig, CrossVisionConfig
from cogvlm_jax.modeling.attention import QUERY_CHUNK, attention
from cogvlm_jax.modeling.common import (LayerNorm, RopeFrequencies, dense, param, scan_layers,
                                        stack_layers)
from cogvlm_jax.sharding import constrain

# As in vision.py: pin the batch of the activations, whose weights shard "cross_embed" over
# the same mesh axis (fsdp), so XLA does not gather the batch instead.
_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


def rope_2d_tables(cross: CrossVisionConfig) -> tuple[jax.Array, jax.Array]:
  """(freqs_cos, freqs_sin), each float32 [N, dx], row p = r * G + c.

  Per axis Da = dx / 2 dims: frequencies f_m = 1 / 10000^(2m / Da); positions interpolated
  from the pretraining grid, t_k = (k / G) * pt; each frequency fills two adjacent dims; dims
  [0, Da) carry the row position, [Da, dx) the column position.
  """
  axis_dims, g = cross.head_width // 2, cross.grid_size
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, axis_dims, 2, dtype=jnp.float32) / axis_dims))
  t = jnp.arange(g, dtype=jnp.float32) / g * cross.pt_hw_seq_len
  per_axis = jnp.repeat(t[:, None] * freqs[None, :], 2, axis=-1)  # [G, Da], pairs adjacent
  rows = jnp.broadcast_to(per_axis[:, None, :], (g, g, axis_dims))
  cols = jnp.broadcast_to(per_axis[None, :, :], (g, g, axis_dims))
  angles = jnp.concatenate([rows, cols], axis=-1).reshape(g * g, 2 * axis_dims)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope_2d(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, 1 + N, heads, dx] with CLS first; cos / sin [N, dx]. CLS is left untouched.

  Interleaved pairs: rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i] (not rotate-half).
  """
  cls, patches = x[:, :1], x[:, 1:].astype(jnp.float32)
  pairs = patches.reshape(patches.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(patches.shape)
  cos = cos.astype(jnp.float32)[None, :, None, :]
  sin = sin.astype(jnp.float32)[None, :, None, :]
  out = (patches * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([cls, out], axis=1)


class Rope2D(nnx.Module):
  """The stored 2D RoPE tables (`vit.model.rope.freqs_cos / freqs_sin`), shared by all blocks.

  Buffers, not parameters: the original uses the stored values (bf16-rounded in bf16
  checkpoints), so they are loaded rather than recomputed.
  """

  def __init__(self, cross: CrossVisionConfig):
    cos, sin = rope_2d_tables(cross)
    self.freqs_cos = RopeFrequencies(cos, logical_axes=(None, None))
    self.freqs_sin = RopeFrequencies(sin, logical_axes=(None, None))


class CrossVisionAttention(nnx.Module):
  """Bidirectional attention: bias-less q/k/v projections + q_bias, v_bias (no k bias),
  2D RoPE on the patch tokens, then `inner_attn_ln` over the concatenated heads, `proj`."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    c, pd, std = cfg.cross_vision, cfg.param_dtype, cfg.init_std
    self.dtype, self.backend = cfg.dtype, cfg.attention_backend
    self.query_chunk = QUERY_CHUNK if cfg.scan_layers else 0
    shape_in = (c.width, c.num_heads, c.head_width)
    axes_in = ("cross_embed", "cross_heads", "head_dim")
    self.q_proj = param(rngs, shape_in, axes_in, pd, std=std)
    self.k_proj = param(rngs, shape_in, axes_in, pd, std=std)
    self.v_proj = param(rngs, shape_in, axes_in, pd, std=std)
    self.q_bias = param(rngs, shape_in[1:], axes_in[1:], pd, "zeros")
    self.v_bias = param(rngs, shape_in[1:], axes_in[1:], pd, "zeros")
    self.inner_attn_ln = LayerNorm(c.width, c.layer_norm_eps, param_dtype=pd, rngs=rngs)
    self.proj = param(rngs, (c.num_heads, c.head_width, c.width),
                      ("cross_heads", "head_dim", "cross_embed"), pd, std=std)
    self.proj_bias = param(rngs, (c.width,), ("cross_embed",), pd, "zeros")

  def __call__(self, x: jax.Array, rope: Rope2D) -> jax.Array:
    """[B, 1 + N, Cx] -> [B, 1 + N, Cx]."""
    cos, sin = rope.freqs_cos[...], rope.freqs_sin[...]
    q = apply_rope_2d(dense(x, self.q_proj, self.dtype, self.q_bias), cos, sin)
    k = apply_rope_2d(dense(x, self.k_proj, self.dtype), cos, sin)
    v = dense(x, self.v_proj, self.dtype, self.v_bias)
    q, k, v = (constrain(t, _HEADS) for t in (q, k, v))
    out = attention(q, k, v, None, backend=self.backend, query_chunk=self.query_chunk)
    batch, tokens, heads, dim = out.shape
    # The sub-LayerNorm normalises over all heads together, so it runs on the flat width.
    out = self.inner_attn_ln(out.reshape(batch, tokens, heads * dim))
    return dense(out.reshape(batch, tokens, heads, dim), self.proj, self.dtype, self.proj_bias,
                 in_dims=2)


class SwiGLUSubLN(nnx.Module):
  """w3(ffn_ln(SiLU(w1(x)) * w2(x))), all with biases: [B, T, Cx] -> [B, T, Cx]."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    c, pd, std = cfg.cross_vision, cfg.param_dtype, cfg.init_std
    self.dtype = cfg.dtype
    f = c.mlp_width
    self.w1 = param(rngs, (c.width, f), ("cross_embed", "cross_mlp"), pd, std=std)
    self.w1_bias = param(rngs, (f,), ("cross_mlp",), pd, "zeros")
    self.w2 = param(rngs, (c.width, f), ("cross_embed", "cross_mlp"), pd, std=std)
    self.w2_bias = param(rngs, (f,), ("cross_mlp",), pd, "zeros")
    self.ffn_ln = LayerNorm(f, c.layer_norm_eps, axis_name="cross_mlp", param_dtype=pd,
                            rngs=rngs)
    self.w3 = param(rngs, (f, c.width), ("cross_mlp", "cross_embed"), pd, std=std)
    self.w3_bias = param(rngs, (c.width,), ("cross_embed",), pd, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(dense(x, self.w1, self.dtype, self.w1_bias)) * dense(
        x, self.w2, self.dtype, self.w2_bias)
    return dense(self.ffn_ln(h), self.w3, self.dtype, self.w3_bias)


class CrossVisionBlock(nnx.Module):
  """Pre-norm block: x += Attn(norm1(x)); x += SwiGLU(norm2(x)). No layer scale."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    c, pd = cfg.cross_vision, cfg.param_dtype
    self.norm1 = LayerNorm(c.width, c.layer_norm_eps, axis_name="cross_embed", param_dtype=pd,
                           rngs=rngs)
    self.attn = CrossVisionAttention(cfg, rngs=rngs)
    self.norm2 = LayerNorm(c.width, c.layer_norm_eps, axis_name="cross_embed", param_dtype=pd,
                           rngs=rngs)
    self.mlp = SwiGLUSubLN(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, rope: Rope2D) -> jax.Array:
    """[B, 1 + N, Cx] -> [B, 1 + N, Cx]."""
    x = constrain(x + self.attn(self.norm1(x), rope), _HIDDEN)
    return constrain(x + self.mlp(self.norm2(x)), _HIDDEN)


class CrossVisionTower(nnx.Module):
  """[B, Sx, Sx, 3] normalised images -> cross features E [B, N, Cx]."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    c, pd, std = cfg.cross_vision, cfg.param_dtype, cfg.init_std
    self.cfg = cfg
    p = c.patch_size
    self.patch_proj = param(rngs, (p, p, 3, c.width), (None, None, None, "cross_embed"), pd,
                            std=std)  # HWIO
    self.patch_proj_bias = param(rngs, (c.width,), ("cross_embed",), pd, "zeros")
    self.cls_token = param(rngs, (c.width,), ("cross_embed",), pd, std=std)
    self.vit_pos_embed = param(rngs, (c.num_tokens + 1, c.width), (None, "cross_embed"), pd,
                               std=std)
    self.rope = Rope2D(c)
    self.blocks = stack_layers(lambda r: CrossVisionBlock(cfg, rngs=r), c.layers, rngs)
    # Stored, exported, never computed (the original runs no final norm and no head).
    self.norm = LayerNorm(c.width, c.layer_norm_eps, axis_name="cross_embed", param_dtype=pd,
                          rngs=rngs)
    self.head = param(rngs, (c.width, c.head_size), ("cross_embed", None), pd, std=std)
    self.head_bias = param(rngs, (c.head_size,), (None,), pd, "zeros")
    self.pos_embed = param(rngs, (c.num_tokens, c.width), (None, "cross_embed"), pd, std=std)

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """[B, Sx, Sx, 3] -> [B, 1 + N, Cx]: conv patches (row-major), CLS first, + vit_pos_embed."""
    dtype = self.cfg.dtype
    batch, height, width, channels = images.shape
    p = self.cfg.cross_vision.patch_size
    g_h, g_w = height // p, width // p
    patches = images.reshape(batch, g_h, p, g_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, g_h * g_w, p * p * channels).astype(dtype)
    kernel = self.patch_proj[...].reshape(p * p * channels, -1).astype(dtype)
    x = patches @ kernel + self.patch_proj_bias[...].astype(dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.vit_pos_embed[...].astype(dtype)[None]

  def run_blocks(self, x: jax.Array) -> jax.Array:
    """The first Lx - 1 stored blocks over x [B, 1 + N, Cx] (the last one is not run)."""
    graphdef, state = nnx.split(self.blocks)
    run = nnx.merge(graphdef, jax.tree.map(lambda a: a[:-1], state))
    x, _ = scan_layers(run, x, None, lambda block, h, _: (block(h, self.rope), None),
                       use_scan=self.cfg.scan_layers, remat_policy=self.cfg.remat_policy)
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, Sx, Sx, 3] -> E [B, N, Cx] (CLS dropped, + pos_embed)."""
    size = self.cfg.cross_vision.image_size
    if images.shape[1:] != (size, size, 3):
      raise ValueError(f"cross_images must be [batch, {size}, {size}, 3] (NHWC, normalised); "
                       f"got {images.shape}")
    x = constrain(self.embed_patches(images.astype(self.cfg.dtype)), _HIDDEN)
    x = self.run_blocks(x)
    return x[:, 1:] + self.pos_embed[...].astype(x.dtype)[None]
