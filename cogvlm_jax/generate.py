"""Prefill + incremental decoding with a preallocated KV cache, all under `jit`.

One compiled program per (batch, prompt length, max_new_tokens): the prompt goes through the
model once (with its images) filling the cache, then `lax.while_loop`s feed one token per
step until every row has produced a stop token or `max_new_tokens` is reached. Prompts in a
batch are left-padded to a common length, so all rows share the cache write index.

Position ids follow the original: computed by the CogVLM rule over the prompt, then each
generated (language) token takes the previous position + 1.

A decoding step does the work of one token: its embedding, language-expert routing (a
single-token step is always language), its position (the previous + 1, not recomputed over
the sequence), one in-place cache write per layer and attention over the filled part of the
cache. That part has a static length, so the loop runs in phases (`decode_phases`): phase
p attends to the prompt plus the first `DECODE_BLOCK * 2**p` generated slots, so a step
reads at most prompt + 2 x generated slots, and there are only log2(max_new_tokens /
DECODE_BLOCK) + 1 step programs to compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM, _check_image_spans, build_position_ids
from cogvlm_jax.modeling.kv_cache import KVCache

# Generated slots the first decoding phase attends to; each later phase doubles them.
DECODE_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self) -> "SamplingConfig":
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    return self


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Picks one token per row from float32 logits [batch, vocab] -> int32 [batch]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  neg_inf = jnp.finfo(logits.dtype).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if sampling.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill(model, input_ids, token_type_ids, attention_mask, images, rng, *,
             max_new_tokens: int, sampling: SamplingConfig, mixed_batch: bool,
             cross_images=None):
  """Runs the prompt; returns (first token [B], its position [B], cache, rng).

  CogAgent (`cross_images` [B, Sx, Sx, 3]): the returned cache also holds every layer's
  cross K/V, so decoding steps run neither vision tower.
  """
  batch, prompt_len = input_ids.shape
  cache = KVCache.init(model.config, batch, prompt_len + max_new_tokens)
  position_ids = build_position_ids(token_type_ids, attention_mask)
  cross = {} if cross_images is None else {"cross_images": cross_images}
  out = model.forward(input_ids, token_type_ids, images, attention_mask, position_ids,
                      mixed_batch=mixed_batch, cache=cache, kv_len=prompt_len, **cross)
  rng, step_rng = jax.random.split(rng)
  token = sample_token(out.logits[:, -1], step_rng, sampling)
  return token, position_ids[:, -1] + 1, out.cache, rng


def decode_phases(prompt_len: int, max_new_tokens: int,
                  block: int | None = None) -> list[tuple[int, int]]:
  """[(stop, kv_len)]: decoding steps run while step < stop, attending to kv_len slots.

  Step s (1 <= s < max_new_tokens) writes slot prompt_len + s - 1, so a phase whose last
  step is stop - 1 needs kv_len = prompt_len + stop - 1 (<= the cache's prompt + max_new).
  Stops double from `block` (default DECODE_BLOCK) up to max_new_tokens.
  """
  phases, stop = [], block or DECODE_BLOCK
  while True:
    stop = min(stop, max_new_tokens)
    phases.append((stop, prompt_len + stop - 1))
    if stop == max_new_tokens:
      return phases
    stop *= 2


def _decode_step(model, token, position, done, cache, rng, stop_ids, pad_id, *,
                 sampling: SamplingConfig, kv_len: int):
  """Feeds `token` [B] at `position` [B]; returns the next (token, position, done, cache, rng).

  Attention reads the first `kv_len` cache slots (static). Rows already `done` emit
  `pad_id`.
  """
  batch = token.shape[0]
  out = model.forward(token[:, None], jnp.zeros((batch, 1), jnp.int32), None,
                      jnp.ones((batch, 1), jnp.int32), position[:, None], cache=cache,
                      kv_len=kv_len)
  rng, step_rng = jax.random.split(rng)
  new = jnp.where(done, pad_id, sample_token(out.logits[:, 0], step_rng, sampling))
  return new, position + 1, done | jnp.isin(new, stop_ids), out.cache, rng


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "mixed_batch"))
def _generate(graphdef, state, input_ids, token_type_ids, attention_mask, images, stop_ids,
              pad_id, rng, *, max_new_tokens: int, sampling: SamplingConfig, mixed_batch: bool,
              cross_images=None):
  """The whole generation as one program: prefill, then one while_loop per decode phase."""
  model = nnx.merge(graphdef, state)
  token, position, cache, rng = _prefill(
      model, input_ids, token_type_ids, attention_mask, images, rng,
      max_new_tokens=max_new_tokens, sampling=sampling, mixed_batch=mixed_batch,
      cross_images=cross_images)
  batch, prompt_len = input_ids.shape
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  carry = (jnp.int32(1), token, position, jnp.isin(token, stop_ids), cache, tokens, rng)
  for stop, kv_len in decode_phases(prompt_len, max_new_tokens):
    carry = _decode_phase(model, carry, stop_ids, pad_id, stop=stop, kv_len=kv_len,
                          sampling=sampling)
  return carry[5]


def _decode_phase(model, carry, stop_ids, pad_id, *, stop: int, kv_len: int,
                  sampling: SamplingConfig):
  """Decode steps while step < stop and some row is not done; every step reads kv_len slots.

  carry: (step [], token [B], position [B], done [B], cache, tokens [B, new], rng).
  """
  def cond(carry):
    step, done = carry[0], carry[3]
    return (step < stop) & ~jnp.all(done)

  def body(carry):
    step, token, position, done, cache, tokens, rng = carry
    token, position, done, cache, rng = _decode_step(model, token, position, done, cache, rng,
                                                     stop_ids, pad_id, sampling=sampling,
                                                     kv_len=kv_len)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    return step + 1, token, position, done, cache, tokens, rng

  return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "mixed_batch"))
def _jit_prefill(graphdef, state, *args, **kw):
  return _prefill(nnx.merge(graphdef, state), *args, **kw)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "kv_len"),
                   donate_argnums=(5,))
def _jit_decode_step(graphdef, state, token, position, done, cache, rng, stop_ids, pad_id, *,
                     sampling, kv_len):
  return _decode_step(nnx.merge(graphdef, state), token, position, done, cache, rng, stop_ids,
                      pad_id, sampling=sampling, kv_len=kv_len)


def _prepare(model, input_ids, token_type_ids, attention_mask, images, max_new_tokens,
             stop_token_ids, pad_token_id, temperature, top_k, top_p):
  """Checks and normalises `generate`'s inputs (numpy, left padding, image spans)."""
  cfg = model.config
  input_ids = np.asarray(input_ids, np.int32)
  token_type_ids = (np.zeros_like(input_ids) if token_type_ids is None
                    else np.asarray(token_type_ids, np.int32))
  attention_mask = (np.ones_like(input_ids) if attention_mask is None
                    else np.asarray(attention_mask, np.int32))
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if attention_mask.shape != input_ids.shape or token_type_ids.shape != input_ids.shape:
    raise ValueError("input_ids, token_type_ids and attention_mask must have the same shape")
  if not attention_mask[:, -1].all():
    raise ValueError("prompts must be LEFT-padded: the last position of every row must be a "
                     "real token")
  mixed_batch = False
  if images is not None:
    mixed_batch = not _check_image_spans(token_type_ids, cfg.image_span_length).all()
    images = jnp.asarray(images, cfg.dtype)
  elif (token_type_ids == 1).any():
    raise ValueError("token_type_ids mark vision tokens but no images were given")
  stop = list(stop_token_ids) if stop_token_ids is not None else [cfg.eos_token_id]
  pad = stop[0] if pad_token_id is None else pad_token_id
  sampling = SamplingConfig(temperature, top_k, top_p).validate()
  return (input_ids, token_type_ids, attention_mask, images, jnp.asarray(stop, jnp.int32),
          jnp.int32(pad), sampling, mixed_batch)


def _prepare_cross_images(model, cross_images):
  """CogAgent's high-resolution images as a device array (required there), else None."""
  if getattr(model.config, "is_cogagent", False):
    if cross_images is None:
      raise ValueError("CogAgent generates with cross_images (each row's image at "
                       f"{model.config.cross_vision.image_size} px) as well as images")
    return jnp.asarray(cross_images, model.config.dtype)
  if cross_images is not None:
    raise ValueError("cross_images are for CogAgent models only")
  return None


def generate(model: CogVLMForCausalLM, input_ids, token_type_ids=None, attention_mask=None,
             images=None, *, max_new_tokens: int, stop_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, cross_images=None) -> np.ndarray:
  """Generates up to `max_new_tokens` per row; returns int32 [batch, prompt + new].

  Args:
    model: a CogVLM model.
    input_ids, token_type_ids, attention_mask: int [batch, prompt], LEFT-padded.
    images: float [batch, S, S, 3] normalised NHWC (one per row; any image for rows without an
      image span), or None for text-only prompts.
    stop_token_ids: generation of a row ends at any of these (default: the config's eos).
    pad_token_id: written after a row has stopped (default: the first stop token).
    temperature, top_k, top_p: sampling; temperature 0 is greedy.
    seed: the sampling RNG seed.
    cross_images: CogAgent only (required there): float [batch, Sx, Sx, 3], each row's image
      at the high resolution.
  """
  (input_ids, token_type_ids, attention_mask, images, stop, pad, sampling,
   mixed_batch) = _prepare(model, input_ids, token_type_ids, attention_mask, images,
                           max_new_tokens, stop_token_ids, pad_token_id, temperature, top_k,
                           top_p)
  cross_images = _prepare_cross_images(model, cross_images)
  graphdef, state = nnx.split(model)
  new_tokens = _generate(graphdef, state, input_ids, token_type_ids, attention_mask, images,
                         stop, pad, jax.random.key(seed), max_new_tokens=max_new_tokens,
                         sampling=sampling, mixed_batch=mixed_batch, cross_images=cross_images)
  return np.concatenate([input_ids, np.asarray(new_tokens)], axis=1)


def generate_stream(model: CogVLMForCausalLM, input_ids, token_type_ids=None,
                    attention_mask=None, images=None, *, max_new_tokens: int,
                    stop_token_ids: Sequence[int] | None = None, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    cross_images=None) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's tokens (int32 [batch]) as soon as they exist.

  For interactive use (`cogvlm_jax.chat`): one jitted prefill, then one jitted decode step
  per token (the cache is donated, so it is updated in place). Stops when every row has
  produced a stop token; a stop token is yielded, padding after it is not.
  """
  (input_ids, token_type_ids, attention_mask, images, stop, pad, sampling,
   mixed_batch) = _prepare(model, input_ids, token_type_ids, attention_mask, images,
                           max_new_tokens, stop_token_ids, None, temperature, top_k, top_p)
  cross_images = _prepare_cross_images(model, cross_images)
  graphdef, state = nnx.split(model)
  token, position, cache, rng = _jit_prefill(
      graphdef, state, input_ids, token_type_ids, attention_mask, images, jax.random.key(seed),
      max_new_tokens=max_new_tokens, sampling=sampling, mixed_batch=mixed_batch,
      cross_images=cross_images)
  done = jnp.isin(token, stop)
  yield np.asarray(token)
  step = 1
  for phase_stop, kv_len in decode_phases(input_ids.shape[1], max_new_tokens):
    for step in range(step, phase_stop):
      if bool(jnp.all(done)):
        return
      token, position, done, cache, rng = _jit_decode_step(
          graphdef, state, token, position, done, cache, rng, stop, pad, sampling=sampling,
          kv_len=kv_len)
      yield np.asarray(token)
    step = phase_stop
