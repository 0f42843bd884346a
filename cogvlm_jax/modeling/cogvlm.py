"""The whole CogVLM / CogVLM2 model.

images [B,S,S,3] -> EVA2-CLIP -> adapter -> [B, span, D] spliced into the vision-typed
positions of the token embeddings -> expert-routed decoder -> RMSNorm -> lm_head -> float32
logits [B, seq, vocab].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.adapter import Adapter
from cogvlm_jax.modeling.common import RMSNorm, dense, param, scan_layers, stack_layers
from cogvlm_jax.modeling.decoder import DecoderLayer
from cogvlm_jax.modeling.kv_cache import KVCache, LayerCache
from cogvlm_jax.batch_layout import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from cogvlm_jax.modeling.routing import ExpertRouting
from cogvlm_jax.modeling.vision import EVA2CLIPVisionTower
from cogvlm_jax.sharding import constrain


def build_position_ids(token_type_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """CogVLM's RoPE positions: int32 [batch, seq].

  Padding is neither type; the first and last token of each image span count as language;
  each position adds 1 if it is language or a vision token right after language. So BOS 0,
  boi 1, every inner image token 2, eoi 3, text 4, 5, ...
  """
  types = jnp.where(attention_mask.astype(bool), token_type_ids, -1)
  is_vision = types == VISION_TOKEN_TYPE
  is_language = types == LANGUAGE_TOKEN_TYPE
  false_col = jnp.zeros_like(is_vision[:, :1])
  true_col = jnp.ones_like(is_vision[:, :1])
  prev_language = jnp.concatenate([false_col, is_language[:, :-1]], axis=1)
  next_language = jnp.concatenate([is_language[:, 1:], false_col], axis=1)
  at_start = jnp.concatenate([true_col, jnp.zeros_like(is_vision[:, 1:])], axis=1)
  at_end = jnp.concatenate([jnp.zeros_like(is_vision[:, 1:]), true_col], axis=1)
  span_edge = is_vision & (prev_language | next_language | at_start | at_end)
  types = jnp.where(span_edge, LANGUAGE_TOKEN_TYPE, types)
  is_language = types == LANGUAGE_TOKEN_TYPE
  prev_language = jnp.concatenate([false_col, is_language[:, :-1]], axis=1)
  step = is_language | ((types == VISION_TOKEN_TYPE) & prev_language)
  step = step.at[:, 0].set(False)
  return jnp.cumsum(step.astype(jnp.int32), axis=1)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """bool [batch, 1, seq, seq]: causal and key-padding mask for an uncached forward."""
  seq = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


class CausalLMOutput(NamedTuple):
  logits: jax.Array  # float32 [batch, seq, vocab]
  hidden_states: tuple[jax.Array, ...] | None  # N+1 tensors [batch, seq, D] when requested
  cache: KVCache | None


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class CogVLMForCausalLM(nnx.Module):
  """CogVLM (v1) or CogVLM2 causal LM with a visual expert in every decoder layer."""

  def __init__(self, cfg: CogVLMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if cfg.is_cogagent:  # never a CogAgent without its cross module
      raise ValueError("a 'cogagent' config builds CogAgentForCausalLM (modeling/cogagent.py; "
                       "pick the class with modeling.models.model_class(cfg))")
    self.config = cfg
    pd = cfg.param_dtype
    self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd,
                              std=cfg.init_std)
    self.vision = EVA2CLIPVisionTower(cfg, rngs=rngs)
    self.adapter = Adapter(cfg, rngs=rngs)
    self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                         std=cfg.init_std)

  # ---- public API ----------------------------------------------------------------------
  def __call__(self, input_ids, token_type_ids=None, images=None, attention_mask=None,
               position_ids=None, *, mixed_batch: bool = False) -> jax.Array:
    """float32 logits [batch, seq, vocab].

    Args:
      input_ids: int [batch, seq].
      token_type_ids: int [batch, seq], 0 language / 1 vision (default: all language).
      images: float [batch, S, S, 3], normalised NHWC, one per row, or None (text only).
      attention_mask: int [batch, seq], 1 = real token (default: all ones).
      position_ids: int [batch, seq] (default: the CogVLM rule, `build_position_ids`).
      mixed_batch: static; set when, under `jit`, some rows carry no image span. Outside
        `jit` it is detected from the inputs.
    """
    return self.forward(input_ids, token_type_ids, images, attention_mask, position_ids,
                        mixed_batch=mixed_batch).logits

  def encode_images(self, images: jax.Array) -> jax.Array:
    """[batch, S, S, 3] normalised images -> [batch, span, D] features incl. boi/eoi."""
    return self.adapter(self.vision(images.astype(self.config.dtype)))

  def forward(self, input_ids, token_type_ids=None, images=None, attention_mask=None,
              position_ids=None, *, mixed_batch: bool = False, cache: KVCache | None = None,
              kv_len: int | None = None, output_hidden_states: bool = False) -> CausalLMOutput:
    """Like `__call__`, returning logits, hidden states and the updated cache.

    With `cache`, the tokens are written at `cache.index` and attend to everything cached
    before them; `position_ids` should then be given (the generate loop tracks them).
    `kv_len` (static, default the cache's length) bounds the slots attention reads: the
    caller guarantees cache.index + seq <= kv_len.
    """
    cfg = self.config
    batch, seq = input_ids.shape
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    routing, mixed_batch = self._routing(token_type_ids, images, mixed_batch)
    if position_ids is None:
      position_ids = build_position_ids(token_type_ids, attention_mask)

    h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.dtype)
    if images is not None:
      h = self._splice_images(h, self.encode_images(images), routing, mixed_batch)
    h = constrain(h, ("activation_batch", "activation_length", "activation_embed"))

    if cache is None:
      mask = causal_padding_mask(attention_mask)
    else:
      kv_len = cache.max_len if kv_len is None else kv_len
      cache, mask = cache.attention_mask(attention_mask, kv_len)
    h, logits, per_layer, cache = self.decode(h, routing, position_ids, mask, cache,
                                              output_hidden_states, kv_len)
    hidden_states = None
    if output_hidden_states:
      # As the original: embeddings, layers 0..N-2, then the last layer after the final norm.
      hidden_states = (*per_layer[:cfg.num_hidden_layers], h)
    return CausalLMOutput(logits, hidden_states, cache)

  def decode(self, h, routing: ExpertRouting, position_ids, mask, cache: KVCache | None = None,
             output_hidden_states: bool = False, kv_len: int | None = None):
    """The expert decoder on spliced embeddings h [B, T, D].

    With `cache`, the whole key / value buffers ride in the layer scan's carry, so each
    layer's write is in place (see kv_cache.py); attention reads the first `kv_len` slots.
    Returns (final-normed hidden [B,T,D], float32 logits [B,T,V], the inputs of every layer
    (tuple of N arrays, or None), the updated cache).
    """
    cfg = self.config
    if cache is None:
      carry, layer_ids = h, None
    else:
      kv_len = cache.max_len if kv_len is None else kv_len
      carry, layer_ids = (h, cache.key, cache.value), jnp.arange(cfg.num_hidden_layers)

    def body(layer, carry, layer_id):
      if cache is None:
        out, _ = layer(carry, routing, position_ids, mask)
        return out, carry if output_hidden_states else None
      x, key, value = carry
      view = LayerCache(key, value, layer_id, cache.index, kv_len)
      out, view = layer(x, routing, position_ids, mask, view)
      return (out, view.key, view.value), x if output_hidden_states else None

    carry, layer_inputs = scan_layers(self.layers, carry, layer_ids, body,
                                      use_scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
    h = carry if cache is None else carry[0]
    h = self.norm(h)
    logits = dense(h, self.lm_head, cfg.dtype).astype(jnp.float32)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    per_layer = None
    if output_hidden_states:
      per_layer = tuple(layer_inputs[i] for i in range(cfg.num_hidden_layers))
    if cache is not None:
      cache = cache.replace(key=carry[1], value=carry[2], index=cache.index + h.shape[1])
    return h, logits, per_layer, cache

  # ---- helpers -------------------------------------------------------------------------
  def _routing(self, token_type_ids, images, mixed_batch):
    cfg = self.config
    batch, seq = token_type_ids.shape
    if images is None:
      if _is_concrete(token_type_ids) and np.any(np.asarray(token_type_ids) == VISION_TOKEN_TYPE):
        raise ValueError("token_type_ids mark vision tokens but no images were given")
      return ExpertRouting.text_only(batch), False
    if images.shape[0] != batch:
      raise ValueError(f"images has batch {images.shape[0]}, input_ids has batch {batch}; "
                       "pass one image per row (any image for rows without an image span)")
    span = cfg.image_span_length
    if seq < span:
      raise ValueError(f"sequence length {seq} is shorter than the image span ({span} tokens)")
    if _is_concrete(token_type_ids):
      rows_with_image = _check_image_spans(np.asarray(token_type_ids), span)
      mixed_batch = mixed_batch or not rows_with_image.all()
    return ExpertRouting.from_token_types(token_type_ids, span, mixed_batch), mixed_batch

  def _splice_images(self, h, features, routing: ExpertRouting, mixed_batch: bool):
    """Writes features [B, span, D] at each row's image span of h [B, seq, D]."""
    spliced = jax.vmap(lambda row, f, s: jax.lax.dynamic_update_slice_in_dim(row, f, s, 0))(
        h, features.astype(h.dtype), routing.vision_start)
    if mixed_batch:
      spliced = jnp.where(routing.row_has_image[:, None, None], spliced, h)
    return spliced


def _check_image_spans(token_type_ids: np.ndarray, span: int) -> np.ndarray:
  """Checks each row holds zero or one contiguous vision span of `span` tokens.

  Returns bool [batch]: rows with a span. Raises ValueError naming the row otherwise.
  """
  is_vision = token_type_ids == VISION_TOKEN_TYPE
  counts = is_vision.sum(axis=1)
  for row, count in enumerate(counts):
    if count == 0:
      continue
    idx = np.flatnonzero(is_vision[row])
    if count != span or idx[-1] - idx[0] + 1 != count:
      raise ValueError(f"row {row}: the image span must be {span} contiguous vision tokens "
                       f"(boi, image tokens, eoi); found {count} vision tokens at "
                       f"{idx[0]}..{idx[-1]}")
  if not counts.any():
    raise ValueError("images were given but no row of token_type_ids has a vision span")
  return counts > 0
