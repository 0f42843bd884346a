"""Expert routing and position ids on hand-written cases (spec sections 4 and 5)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cogvlm_jax.config import preset
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM, build_position_ids
from cogvlm_jax.modeling.routing import ExpertRouting, expert_mask, route

T, F = True, False


def test_expert_mask_hand_written():
  types = jnp.array([[0, 1, 1, 1, 1, 0, 0],    # BOS, boi, img, img, eoi, text, text
                     [0, 0, 1, 1, 1, 1, 0],    # left pad (type 0), BOS, span, text
                     [1, 1, 1, 0, 0, 0, 0],    # span at index 0
                     [0, 0, 0, 0, 0, 1, 1]])   # span at the very end: last token is language
  want = [[F, T, T, T, F, F, F],
          [F, F, T, T, T, F, F],
          [T, T, F, F, F, F, F],
          [F, F, F, F, F, T, F]]
  np.testing.assert_array_equal(expert_mask(types), want)
  # A single-token step (cached decoding) always uses the language expert.
  np.testing.assert_array_equal(expert_mask(jnp.array([[1], [0]])), [[F], [F]])


def test_routing_window_equals_expert_mask():
  types = jnp.array([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]])
  routing = ExpertRouting.from_token_types(types, span_length=4, mixed=True)
  np.testing.assert_array_equal(routing.mask(7), expert_mask(types))


@pytest.mark.parametrize("mode", ["rows", "select"])
@pytest.mark.parametrize("mixed", [False, True])
def test_route_applies_each_expert_to_its_tokens(mixed, mode):
  types = jnp.array([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]] + ([[0] * 6] if mixed else []))
  x = jnp.arange(types.size, dtype=jnp.float32).reshape(types.shape)[..., None] + 1
  routing = ExpertRouting.from_token_types(types, span_length=3, mixed=mixed)
  got = route(x, routing, lambda t: t * 10, lambda t: -t, mode=mode)
  want = jnp.where(expert_mask(types)[..., None], x * 10, -x)
  np.testing.assert_array_equal(got, want)
  # Pytree outputs (q, k, v) are routed alike.
  got_q, got_k = route(x, routing, lambda t: (t * 10, t * 2), lambda t: (-t, t), mode=mode)
  np.testing.assert_array_equal(got_q, want)
  np.testing.assert_array_equal(got_k, jnp.where(expert_mask(types)[..., None], x * 2, x))


def _routed_matmul_flops(types, mixed, mode):
  """XLA's FLOP count of route() with one [64, 64] matmul per expert on x [B, T, 64]."""
  import jax
  w_vision, w_language = jnp.ones((64, 64)), jnp.full((64, 64), 2.0)

  def run(x, types):
    routing = ExpertRouting.from_token_types(types, span_length=4, mixed=mixed)
    return route(x, routing, lambda t: t @ w_vision, lambda t: t @ w_language, mode=mode)

  x = jnp.ones(types.shape + (64,))
  cost = jax.jit(run).lower(x, types).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_mixed_rows_mode_costs_what_the_dense_decoder_costs():
  # Rows 0-1 have an image span of 4 tokens, rows 2-3 are text only.
  types = jnp.zeros((4, 12), jnp.int32).at[:2, 1:5].set(1)
  matmul_flops = 4 * 12 * 64 * 64 * 2  # every token through one [64, 64] matmul
  rows = _routed_matmul_flops(types, True, "rows")
  select = _routed_matmul_flops(types, True, "select")
  # The permutation gathers add a few element ops; the windows' extra language pass
  # ("select") adds 4 rows x 3 window tokens of matmul.
  assert rows < 1.05 * matmul_flops
  assert select > rows + 0.9 * (4 * 3 * 64 * 64 * 2)


def test_position_ids_hand_written():
  types = jnp.array([[0, 1, 1, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 1, 1, 0]])
  mask = jnp.array([[1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]])  # row 1 left-padded by one
  want = [[0, 1, 2, 2, 2, 3, 4, 5],     # BOS 0, boi 1, inner image tokens 2, eoi 3, text 4, 5
          [0, 1, 2, 3, 3, 3, 4, 5]]     # left padding shifts the row by +1 (index 0 is 0)
  np.testing.assert_array_equal(build_position_ids(types, mask), want)


def test_position_ids_edge_cases():
  # Text only: 0, 1, 2, ...; padding adds nothing.
  np.testing.assert_array_equal(
      build_position_ids(jnp.zeros((1, 5), jnp.int32), jnp.array([[0, 0, 1, 1, 1]])),
      [[0, 0, 1, 2, 3]])
  # A span preceded by padding is not re-labelled at its start (spec section 4 subtlety):
  # the first vision token adds nothing, eoi adds 1.
  np.testing.assert_array_equal(
      build_position_ids(jnp.array([[0, 1, 1, 1, 0]]), jnp.array([[0, 1, 1, 1, 1]])),
      [[0, 0, 0, 1, 2]])
  # A span at index 0 and one at the very end: first/last tokens count as language.
  np.testing.assert_array_equal(build_position_ids(jnp.array([[1, 1, 1, 0]]),
                                                   jnp.ones((1, 4), jnp.int32)), [[0, 1, 2, 3]])
  np.testing.assert_array_equal(build_position_ids(jnp.array([[0, 1, 1, 1]]),
                                                   jnp.ones((1, 4), jnp.int32)), [[0, 1, 2, 3]])


def test_bad_image_spans_are_clear_errors():
  cfg = preset("tiny-cogvlm")
  model = CogVLMForCausalLM(cfg, rngs=nnx.Rngs(0))
  span = cfg.image_span_length
  seq = span + 4
  ids = jnp.ones((1, seq), jnp.int32)
  images = jnp.zeros((1, 16, 16, 3))
  short = jnp.zeros((1, seq), jnp.int32).at[:, 1:span].set(1)
  with pytest.raises(ValueError, match="contiguous vision tokens"):
    model(ids, short, images)
  with pytest.raises(ValueError, match="no row of token_type_ids has a vision span"):
    model(ids, jnp.zeros((1, seq), jnp.int32), images)
  with pytest.raises(ValueError, match="no images were given"):
    model(ids, jnp.zeros((1, seq), jnp.int32).at[:, 1:1 + span].set(1))
  with pytest.raises(ValueError, match="images must be"):
    model(ids, jnp.zeros((1, seq), jnp.int32).at[:, 1:1 + span].set(1), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="shorter than the image span"):
    model(ids[:, :4], jnp.zeros((1, 4), jnp.int32), images)
