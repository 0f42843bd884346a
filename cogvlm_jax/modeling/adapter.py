"""Vision-to-language adapter: CogVLM2's 2x2 conv downsample, the GLU, boi/eoi.

Output: [B, n_img + 2, D] image features with boi first and eoi last, ready to be spliced
into the vision-typed positions of the token sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.common import LayerNorm, dense, param
from cogvlm_jax.modeling.lora import lora_for


class Downsample2x2(nnx.Module):
  """CogVLM2: Conv2d(Cv -> Cv, kernel 2, stride 2) on the g x g token grid."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    c = cfg.vision.hidden_size
    self.dtype = cfg.dtype
    self.kernel = param(rngs, (2, 2, c, c), (None, None, "vision_embed", None), cfg.param_dtype,
                        std=cfg.init_std)  # HWIO
    self.bias = param(rngs, (c,), ("vision_embed",), cfg.param_dtype, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, g^2, Cv] -> [B, (g/2)^2, Cv], row-major like the original's flatten."""
    batch, tokens, channels = x.shape
    g = int(round(tokens ** 0.5))
    h = g // 2
    # A stride-2 2x2 conv is a matmul over non-overlapping 2x2 windows.
    windows = x.reshape(batch, h, 2, h, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(batch, h * h, 4 * channels).astype(self.dtype)
    kernel = self.kernel[...].reshape(4 * channels, channels).astype(self.dtype)
    return windows @ kernel + self.bias[...].astype(self.dtype)


class GLU(nnx.Module):
  """linear_proj -> LayerNorm(eps 1e-5) -> GELU(erf) -> down(SiLU(gate(x)) * up(x))."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    d, f, cv, pd, std = (cfg.hidden_size, cfg.intermediate_size, cfg.vision.hidden_size,
                         cfg.param_dtype, cfg.init_std)
    self.dtype = cfg.dtype
    self.linear_proj = param(rngs, (cv, d), ("vision_embed", "embed"), pd, std=std)
    # torch's default LayerNorm eps, not the vision eps: the original builds it without one.
    self.norm1 = LayerNorm(d, 1e-5, param_dtype=pd, rngs=rngs)
    self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), pd, std=std)
    self.dense_h_to_4h = param(rngs, (d, f), ("embed", "mlp"), pd, std=std)
    self.dense_4h_to_h = param(rngs, (f, d), ("mlp", "embed"), pd, std=std)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(x, self.linear_proj, self.dtype, lora=lora_for(self, "linear_proj"))
    x = jax.nn.gelu(self.norm1(x), approximate=False)
    gate = dense(x, self.gate_proj, self.dtype, lora=lora_for(self, "gate_proj"))
    up = dense(x, self.dense_h_to_4h, self.dtype, lora=lora_for(self, "dense_h_to_4h"))
    return dense(jax.nn.silu(gate) * up, self.dense_4h_to_h, self.dtype,
                 lora=lora_for(self, "dense_4h_to_h"))


class Adapter(nnx.Module):
  """Vision tower features [B, g^2, Cv] -> [B, n_img + 2, D] (boi, image tokens, eoi)."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.conv = Downsample2x2(cfg, rngs=rngs) if cfg.downsample else None
    self.linear_proj = GLU(cfg, rngs=rngs)
    self.boi = param(rngs, (cfg.hidden_size,), ("embed",), cfg.param_dtype, std=cfg.init_std)
    self.eoi = param(rngs, (cfg.hidden_size,), ("embed",), cfg.param_dtype, std=cfg.init_std)

  def __call__(self, features: jax.Array) -> jax.Array:
    if self.conv is not None:
      features = self.conv(features)
    x = self.linear_proj(features)
    batch, _, dim = x.shape
    boi = jnp.broadcast_to(self.boi[...].astype(x.dtype), (batch, 1, dim))
    eoi = jnp.broadcast_to(self.eoi[...].astype(x.dtype), (batch, 1, dim))
    return jnp.concatenate([boi, x, eoi], axis=1)
