"""The whole CogAgent model: CogVLM v1 + the high-resolution cross module.

images [B,S,S,3] -> EVA2-CLIP-E -> + `vision.pos_embed` -> GLU, boi/eoi -> spliced into the
vision-typed positions (as CogVLM);
cross_images [B,Sx,Sx,3] -> EVA2-CLIP-L (cross_vision.py) -> E [B, N, Cx], which takes no
sequence positions: every decoder layer's cross-attention projects its own K/V from it;
expert-routed decoder with cross-attention (cross_attention.py) -> RMSNorm -> lm_head ->
float32 logits [B, seq, vocab].

Every row holds exactly one image, given at both resolutions: the original has no text-only
CogAgent (its builder and forward both fail without an image), so such calls are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.adapter import Adapter
from cogvlm_jax.modeling.cogvlm import (CausalLMOutput, CogVLMForCausalLM, _check_image_spans,
                                        _is_concrete, build_position_ids, causal_padding_mask)
from cogvlm_jax.modeling.common import RMSNorm, dense, param, scan_layers, stack_layers
from cogvlm_jax.modeling.cross_attention import CogAgentDecoderLayer
from cogvlm_jax.modeling.cross_vision import CrossVisionTower
from cogvlm_jax.modeling.kv_cache import KVCache, LayerCache
from cogvlm_jax.modeling.routing import ExpertRouting
from cogvlm_jax.modeling.vision import EVA2CLIPVisionTower
from cogvlm_jax.sharding import constrain


class CogAgentAdapter(Adapter):
  """CogVLM v1's GLU + boi/eoi, with the learned table `pos_embed` [g^2, Cv] added to the
  tower's patch outputs first: GLU(x + pos_embed)."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    v = cfg.vision
    self.pos_embed = param(rngs, (v.grid_size**2, v.hidden_size), (None, "vision_embed"),
                           cfg.param_dtype, std=cfg.init_std)

  def __call__(self, features: jax.Array) -> jax.Array:
    """[B, g^2, Cv] -> [B, g^2 + 2, D]."""
    return super().__call__(features + self.pos_embed[...].astype(features.dtype)[None])


class CogAgentForCausalLM(CogVLMForCausalLM):
  """CogAgent: `model(input_ids, token_type_ids, images=LOW, cross_images=HIGH, ...)`."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if not cfg.is_cogagent:
      raise ValueError(f"CogAgentForCausalLM needs variant 'cogagent', got {cfg.variant!r}")
    self.config = cfg
    pd = cfg.param_dtype
    self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd,
                              std=cfg.init_std)
    self.vision = EVA2CLIPVisionTower(cfg, rngs=rngs)
    self.adapter = CogAgentAdapter(cfg, rngs=rngs)
    self.cross_vision = CrossVisionTower(cfg, rngs=rngs)
    self.layers = stack_layers(lambda r: CogAgentDecoderLayer(cfg, rngs=r),
                               cfg.num_hidden_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                         std=cfg.init_std)

  # ---- public API ----------------------------------------------------------------------
  def __call__(self, input_ids, token_type_ids=None, images=None, attention_mask=None,
               position_ids=None, *, cross_images=None, mixed_batch: bool = False):
    """float32 logits [batch, seq, vocab].

    Args as `CogVLMForCausalLM.__call__`, plus cross_images: float [batch, Sx, Sx, 3],
    normalised NHWC, the same picture as `images` at the high resolution, one per row.
    """
    return self.forward(input_ids, token_type_ids, images, attention_mask, position_ids,
                        cross_images=cross_images, mixed_batch=mixed_batch).logits

  def encode_cross_images(self, cross_images: jax.Array) -> jax.Array:
    """[batch, Sx, Sx, 3] normalised images -> cross features E [batch, N, Cx]."""
    return self.cross_vision(cross_images)

  def forward(self, input_ids, token_type_ids=None, images=None, attention_mask=None,
              position_ids=None, *, cross_images=None, mixed_batch: bool = False, cache=None,
              kv_len=None, output_hidden_states: bool = False) -> CausalLMOutput:
    """Logits, hidden states (embeddings, layers 0..N-2, the final-normed last layer), cache.

    cache: None (full forward), a fresh `KVCache` (the prefill: both towers run, every
    layer's cross K/V are computed and returned in a `CogAgentCache`), or a `CogAgentCache`
    (a decoding step: no tower runs, images / cross_images are ignored as in the original,
    and each layer reuses its stored cross K/V). `kv_len` as in CogVLMForCausalLM.forward.
    """
    cfg = self.config
    if isinstance(cache, CogAgentCache):
      return self._cached_step(input_ids, token_type_ids, attention_mask, position_ids, cache,
                               kv_len, output_hidden_states)
    if images is None or cross_images is None:
      raise ValueError("CogAgent needs both images (low resolution) and cross_images (high "
                       "resolution), one of each per row; it has no text-only mode")
    batch, _ = input_ids.shape
    if cross_images.shape[0] != batch:
      raise ValueError(f"cross_images has batch {cross_images.shape[0]}, input_ids has batch "
                       f"{batch}; pass one per row")
    if token_type_ids is None:
      raise ValueError("CogAgent needs token_type_ids marking each row's image span")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if mixed_batch:  # e.g. generate() found rows without an image span
      raise ValueError("CogAgent: every row needs an image span (mixed_batch was set)")
    routing, _ = self._routing(token_type_ids, images, mixed_batch)
    if _is_concrete(token_type_ids):
      rows = _check_image_spans(np.asarray(token_type_ids), cfg.image_span_length)
      if not rows.all():
        raise ValueError(f"CogAgent: every row needs an image span; rows "
                         f"{np.flatnonzero(~rows).tolist()} have none")
    if position_ids is None:
      position_ids = build_position_ids(token_type_ids, attention_mask)

    h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.dtype)
    h = self._splice_images(h, self.encode_images(images), routing, False)
    h = constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    cross = self.encode_cross_images(cross_images)
    if cache is None:
      mask = causal_padding_mask(attention_mask)
    else:
      kv_len = cache.max_len if kv_len is None else kv_len
      cache, mask = cache.attention_mask(attention_mask, kv_len)
    h, logits, per_layer, self_cache, cross_kv = self.decode_cross(
        h, routing, position_ids, mask, cross=cross, self_cache=cache, kv_len=kv_len,
        output_hidden_states=output_hidden_states)
    if cache is not None:
      cache = CogAgentCache(self_cache, *cross_kv)
    return CausalLMOutput(logits, _hidden_states(per_layer, h), cache)

  def _cached_step(self, input_ids, token_type_ids, attention_mask, position_ids,
                   cache: "CogAgentCache", kv_len, output_hidden_states):
    """Text tokens [B, T] against the cache: self K/V appended, cross K/V reused."""
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    routing, _ = self._routing(token_type_ids, None, False)  # refuses vision-typed tokens
    if position_ids is None:
      raise ValueError("a cached CogAgent step needs position_ids (generate tracks them)")
    h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.dtype)
    kv_len = cache.max_len if kv_len is None else kv_len
    self_cache, mask = cache.self_cache.attention_mask(attention_mask, kv_len)
    h, logits, per_layer, self_cache, _ = self.decode_cross(
        h, routing, position_ids, mask, cross_kv=(cache.cross_key, cache.cross_value),
        self_cache=self_cache, kv_len=kv_len, output_hidden_states=output_hidden_states)
    return CausalLMOutput(logits, _hidden_states(per_layer, h),
                          cache.replace(self_cache=self_cache))

  def decode_cross(self, h, routing: ExpertRouting, position_ids, mask, *, cross=None,
                   cross_kv=None, self_cache: KVCache | None = None, kv_len=None,
                   output_hidden_states: bool = False):
    """The decoder on embeddings h [B, T, D] with cross features E [B, N, Cx] (`cross`) or
    every layer's stored cross K/V (`cross_kv`: two [layers, B, N, H, hc]).

    With `self_cache`, the self-attention K/V buffers ride in the layer scan's carry and are
    written in place (as CogVLMForCausalLM.decode); attention reads `kv_len` slots.
    Returns (final-normed hidden [B, T, D], float32 logits [B, T, V], the inputs of every
    layer (tuple of N [B, T, D]) or None, the updated self cache or None, the cross K/V of
    every layer (two [layers, B, N, H, hc], computed from `cross`) or None).
    """
    cfg = self.config
    layer_ids = jnp.arange(cfg.num_hidden_layers)
    xs = layer_ids if cross_kv is None else (layer_ids, *cross_kv)
    carry = h if self_cache is None else (h, self_cache.key, self_cache.value)

    def body(layer, carry, x):
      if cross_kv is None:
        layer_id, layer_kv = x, layer.cross_attn.key_value(cross)
      else:
        layer_id, layer_kv = x[0], (x[1], x[2])
      new_kv = layer_kv if (cross_kv is None and self_cache is not None) else None
      if self_cache is None:
        out, _ = layer(carry, routing, position_ids, mask, cross_kv=layer_kv)
        return out, (new_kv, carry if output_hidden_states else None)
      x_in, key, value = carry
      view = LayerCache(key, value, layer_id, self_cache.index, kv_len)
      out, view = layer(x_in, routing, position_ids, mask, view, cross_kv=layer_kv)
      return (out, view.key, view.value), (new_kv, x_in if output_hidden_states else None)

    carry, (new_cross_kv, layer_inputs) = scan_layers(
        self.layers, carry, xs, body, use_scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
    h = carry if self_cache is None else carry[0]
    h = self.norm(h)
    logits = dense(h, self.lm_head, cfg.dtype).astype(jnp.float32)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    per_layer = None
    if output_hidden_states:
      per_layer = tuple(layer_inputs[i] for i in range(cfg.num_hidden_layers))
    if self_cache is not None:
      self_cache = self_cache.replace(key=carry[1], value=carry[2],
                                      index=self_cache.index + h.shape[1])
    return h, logits, per_layer, self_cache, new_cross_kv


@struct.dataclass
class CogAgentCache:
  """CogAgent's decoding cache: CogVLM's self-attention `KVCache` plus every layer's cross
  K/V, cross_key / cross_value [layers, batch, N, H, hc], computed once at the prefill and
  read unchanged by every later step (the towers never run again)."""

  self_cache: KVCache
  cross_key: jax.Array
  cross_value: jax.Array

  @property
  def index(self) -> jax.Array:
    return self.self_cache.index

  @property
  def max_len(self) -> int:
    return self.self_cache.max_len


def _hidden_states(per_layer, h):
  """As the original: embeddings, layers 0..N-2, then the last layer after the final norm."""
  return None if per_layer is None else (*per_layer, h)
