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
