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


# ---- splash (Pallas interpret mode on CPU) against xla ------------------------------------------


def _padded_causal(batch, length, left_pads, right_pads):
  """(mask [b, 1, t, t] causal + key padding, valid [b, t]) with the given pads per row."""
  pos = np.arange(length)[None]
  valid = (pos >= np.array(left_pads)[:, None]) & (pos < length - np.array(right_pads)[:, None])
  mask = np.tril(np.ones((length, length), bool))[None, None] & valid[:, None, None]
  return jnp.asarray(mask), valid


def _splash_vs_xla(q, k, v, mask, valid, is_causal, mesh=None):
  """Max |splash - xla| of the outputs at valid queries and of the gradients of a loss
  that reads only those (padding queries' outputs are never read by the model)."""
  from cogvlm_jax.sharding import activation_sharding

  weight = jnp.asarray(valid[:, :, None, None], jnp.float32)
  blocks = attention_lib.SplashBlocks(128, 128)

  def loss(backend):
    def f(q, k, v):
      out = attention(q, k, v, mask, backend=backend, is_causal=is_causal, splash_blocks=blocks)
      return jnp.sum(jnp.sin(out) * weight), out
    return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

  with attention_lib.splash_interpret(), activation_sharding(mesh):
    got_grads, got = loss("splash")(q, k, v)
  want_grads, want = loss("xla")(q, k, v)
  diffs = [float(jnp.max(jnp.abs((got - want) * weight)))]
  return diffs + [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got_grads, want_grads)]


@pytest.mark.parametrize("heads,kv_heads,length,sharded", [
    (8, 2, 37, False),  # CogVLM2's 4:1 GQA shape, a length no block divides
    (4, 4, 130, True),  # CogVLM: two blocks; batch over data, heads over tensor (shard_map)
])
def test_splash_causal_padding_equals_xla(heads, kv_heads, length, sharded):
  """The decoder's case: causal + left and right padding, forward and gradients, fp32."""
  from cogvlm_jax.sharding import make_mesh

  q, k, v = _random_qkv(5, 4, length, length, heads, kv_heads)
  mask, valid = _padded_causal(4, length, [0, 3, 10, 0], [0, 0, 2, 5])
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4]) if sharded else None
  assert max(_splash_vs_xla(q, k, v, mask, valid, True, mesh)) < 1e-5


def test_splash_full_attention_equals_xla():
  """The ViT's case: no mask, 17 tokens (16 patches + CLS) padded to one block."""
  q, k, v = _random_qkv(6, 2, 17, 17, 4, 4)
  valid = np.ones((2, 17), bool)
  assert max(_splash_vs_xla(q, k, v, None, valid, False)) < 1e-5


def test_splash_runs_per_shard_under_shard_map():
  """On a sharded mesh the kernel is inside a manual (shard_map) computation: XLA cannot
  partition a Pallas call itself."""
  from cogvlm_jax.sharding import activation_sharding, make_mesh

  q, k, v = _random_qkv(7, 4, 17, 17, 4, 2)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  f = lambda q, k, v: attention(q, k, v, None, backend="splash")
  with attention_lib.splash_interpret(), activation_sharding(mesh):
    text = jax.jit(f).lower(q, k, v).as_text()
  assert "manual_computation" in text or "shard_map" in text
  # A fresh function: jit's trace cache does not key on the activation_sharding context.
  g = lambda q, k, v: attention(q, k, v, None, backend="splash")
  with attention_lib.splash_interpret():
    assert "manual_computation" not in jax.jit(g).lower(q, k, v).as_text()


def test_splash_blocks_clip_to_short_sequences_and_pad_long_ones():
  blocks = attention_lib.SplashBlocks(512, 256)
  assert blocks.for_length(17) == attention_lib.SplashBlocks(128, 128)
  assert blocks.for_length(9217) == blocks and blocks.multiple == 512


def test_auto_backend_is_xla_on_a_cpu_mesh_without_a_warning(caplog):
  from cogvlm_jax.sharding import activation_sharding, make_mesh

  with caplog.at_level(logging.WARNING), activation_sharding(make_mesh({"fsdp": 8})):
    assert attention_lib._resolve_backend("auto", jnp.bfloat16) == "xla"
  assert not caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
def test_model_with_splash_equals_xla(name):
  """The real layers with splash (interpret mode): the ViT's full attention over 17 tokens
  and the decoder's causal + padding attention give xla's logits at real tokens and its
  gradients, in float32."""
  from flax import nnx

  from cogvlm_jax.config import preset
  from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM

  graphdefs = {}
  for backend in ("splash", "xla"):
    model = CogVLMForCausalLM(preset(name, attention_backend=backend), rngs=nnx.Rngs(0))
    graphdefs[backend], state = nnx.split(model)
  cfg = model.config
  span, text = cfg.image_span_length, 12
  rng = np.random.default_rng(8)
  ids = rng.integers(3, 100, size=(2, 3 + span + text)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, 3:3 + span] = 1
  ids[:, 2] = cfg.bos_token_id
  attention_mask = np.ones_like(ids)
  attention_mask[1, :2] = 0  # row 1 left-padded
  weight = jnp.asarray(attention_mask[:, :, None], jnp.float32)
  size = cfg.vision.image_size
  images = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)

  def loss(graphdef, s):
    logits = nnx.merge(graphdef, s)(jnp.asarray(ids), jnp.asarray(types), images,
                                    jnp.asarray(attention_mask))
    return jnp.sum(jnp.sin(logits) * weight), logits * weight

  grad = lambda backend: jax.jit(jax.grad(lambda s: loss(graphdefs[backend], s),
                                          has_aux=True))(state)
  with attention_lib.splash_interpret():
    got_grads, got = grad("splash")
  want_grads, want = grad("xla")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(np.max(np.abs(w)))), rtol=0)
