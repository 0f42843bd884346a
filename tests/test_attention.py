"""The attention function: GQA grouping, masking, backend selection and fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.modeling import attention as attention_lib
from cogvlm_jax.modeling.attention import attention


def _naive(q, k, v, mask):
  """Repeat KV heads (head i uses kv head i // group), softmax in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqs,bshd->bqhd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_xla_attention_matches_naive_gqa(heads, kv_heads):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, heads, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  mask = np.tril(np.ones((5, 7), bool), k=2)[None, None] & (np.arange(7) > 0)[None, None, None]
  mask = np.broadcast_to(mask, (2, 1, 5, 7))
  got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  np.testing.assert_allclose(got, _naive(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_missing_hardware_falls_back_to_xla_with_a_message(backend, caplog):
  if jax.default_backend() != "cpu":
    pytest.skip("fallback is only observable without the accelerator")
  attention_lib._warn_fallback.cache_clear()
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32)
  with caplog.at_level(logging.WARNING):
    got = attention(q, q, q, None, backend=backend)
  assert f"attention backend '{backend}' unavailable" in caplog.text
  np.testing.assert_allclose(got, attention(q, q, q, None), atol=0)


def test_query_blocks_spread_rows_evenly_in_multiples_of_8():
  assert attention_lib._query_blocks(9217, 1024) == (10, 928)  # CogVLM2's ViT: 63 pad rows
  assert attention_lib._query_blocks(4096, 1024) == (4, 1024)
  assert attention_lib._query_blocks(37, 8) == (5, 8)


def _random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim=16):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, kv_len, kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, kv_len, kv_heads, head_dim)), jnp.float32)
  return q, k, v


def _masks(kind, batch, q_len, kv_len):
  if kind == "none":
    return None
  if kind == "causal_padding":  # per-query mask, as the decoder's [b, 1, q, s]
    causal = np.tril(np.ones((q_len, kv_len), bool), k=kv_len - q_len)
    padding = np.arange(kv_len)[None] >= np.array([0, 3])[:batch, None]
    return jnp.asarray(causal[None, None] & padding[:, None, None])
  # key padding only, broadcast over queries: [b, 1, 1, s]
  return jnp.asarray(np.arange(kv_len)[None, None, None] < np.array([kv_len, kv_len - 5])
                     [:batch, None, None, None])


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,chunk,mask_kind", [
    (4, 4, 37, 37, 8, "none"),  # q_len not a multiple of the block: padded rows dropped
    (8, 2, 37, 41, 10, "causal_padding"),
    (4, 4, 100, 100, 16, "key_padding"),
])
def test_chunked_xla_attention_equals_whole(heads, kv_heads, q_len, kv_len, chunk, mask_kind):
  """Query blocks give the xla backend's numbers, forward and gradients, in float32."""
  q, k, v = _random_qkv(2, 2, q_len, kv_len, heads, kv_heads)
  mask = _masks(mask_kind, 2, q_len, kv_len)
  whole = lambda q, k, v: attention(q, k, v, mask)
  chunked = lambda q, k, v: attention(q, k, v, mask, query_chunk=chunk)
  np.testing.assert_allclose(chunked(q, k, v), whole(q, k, v), atol=1e-5, rtol=0)
  # A non-linear readout so every output element gets a different cotangent.
  grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads(chunked), grads(whole)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_query_chunk_leaves_short_queries_alone():
  q, k, v = _random_qkv(3, 1, 8, 8, 2, 2)
  np.testing.assert_array_equal(attention(q, k, v, query_chunk=8), attention(q, k, v))


def _tiny_cogvlm2_with_query_chunk(monkeypatch, chunk):
  """tiny-cogvlm2 (fp32, seed 0) whose ViT and decoder attention use query blocks of `chunk`."""
  from flax import nnx

  from cogvlm_jax.config import preset
  from cogvlm_jax.modeling import decoder, vision
  from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM

  with monkeypatch.context() as m:  # the layers read the block size when built
    m.setattr(vision, "QUERY_CHUNK", chunk)
    m.setattr(decoder, "QUERY_CHUNK", chunk)
    model = CogVLMForCausalLM(preset("tiny-cogvlm2", remat_policy="full"), rngs=nnx.Rngs(0))
  return nnx.split(model)


def test_model_with_query_blocks_equals_whole_attention(monkeypatch):
  """The real layers (ViT: 17 tokens, no mask; decoder: causal + left padding) in blocks of 8
  queries give the logits and gradients of whole attention, in float32."""
  from flax import nnx

  chunked_def, state = _tiny_cogvlm2_with_query_chunk(monkeypatch, 8)
  whole_def, _ = _tiny_cogvlm2_with_query_chunk(monkeypatch, 0)
  cfg = nnx.merge(chunked_def, state).config
  assert cfg.vision.num_positions > 8
  span, text = cfg.image_span_length, 15
  rng = np.random.default_rng(4)
  ids = rng.integers(3, 100, size=(2, 1 + span + text)).astype(np.int32)
  ids[:, 0] = cfg.bos_token_id
  types = np.zeros_like(ids)
  types[:, 1:1 + span] = 1
  attention_mask = np.ones_like(ids)
  attention_mask[1, :1 + span] = 0  # row 1: no image attended, as a bad image is masked
  size = cfg.vision.image_size
  images = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)

  def loss(graphdef, s):
    logits = nnx.merge(graphdef, s)(jnp.asarray(ids), jnp.asarray(types), images,
                                    jnp.asarray(attention_mask))
    return jnp.sum(jnp.sin(logits)), logits

  grad = lambda graphdef: jax.grad(lambda s: loss(graphdef, s), has_aux=True)(state)
  (got_grads, got), (want_grads, want) = grad(chunked_def), grad(whole_def)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Weight gradients sum over tokens in another order (per block): equal up to float32
  # rounding relative to each gradient's scale (some entries are in the hundreds; those
  # that are 0 in exact arithmetic, e.g. of the ViT key bias, are rounding noise).
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(np.max(np.abs(w)))), rtol=0)
