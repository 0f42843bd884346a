"""Visual-expert routing: which tokens use the vision weights, at no extra FLOPs.

The rule (`expert_mask`): a token uses the VISION expert iff its type is vision AND the next
token's type is vision. Within one image span (boi, image tokens, eoi) that is boi and the
image tokens; eoi, text, BOS and padding use the LANGUAGE expert.

Each row holds at most one image span of static length, so the vision-expert tokens of a row
are one contiguous window of static length `num_vision = span - 1` starting at a per-row
offset. `route` gathers that window ([B, num_vision, ...]) and the rest of the row
([B, seq - num_vision, ...]), runs each through exactly one expert and scatters the results
back. Every token goes through exactly one expert's matmuls, so the decoder costs what a
dense decoder costs. Mixed batches (some rows without an image) additionally run their
window through the language expert and select per row; that extra cost is the price of
static shapes and is reported by `benchmarks/expert_flops.py`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from cogvlm_jax.batch_layout import VISION_TOKEN_TYPE


def expert_mask(token_type_ids: jax.Array) -> jax.Array:
  """The original rule as a mask: bool [batch, seq], True = vision expert."""
  is_vision = token_type_ids == VISION_TOKEN_TYPE
  nxt = jnp.concatenate([is_vision[:, 1:], jnp.zeros_like(is_vision[:, :1])], axis=1)
  return is_vision & nxt


@struct.dataclass
class ExpertRouting:
  """Where each row's vision-expert window starts; static window length and batch kind.

  vision_start: int32 [batch], first vision-expert token of the row (0 when none).
  row_has_image: bool [batch].
  num_vision: static window length (0 = text-only: everything uses the language expert).
  mixed: static; True when some rows may have no image.
  """

  vision_start: jax.Array
  row_has_image: jax.Array
  num_vision: int = struct.field(pytree_node=False, default=0)
  mixed: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def text_only(cls, batch: int) -> "ExpertRouting":
    return cls(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), 0, False)

  @classmethod
  def from_token_types(cls, token_type_ids: jax.Array, span_length: int,
                       mixed: bool) -> "ExpertRouting":
    """Routing for rows with one image span of `span_length` vision-typed tokens."""
    is_vision = token_type_ids == VISION_TOKEN_TYPE
    start = jnp.argmax(is_vision, axis=1).astype(jnp.int32)
    return cls(start, jnp.any(is_vision, axis=1), span_length - 1, mixed)

  def mask(self, seq_len: int) -> jax.Array:
    """bool [batch, seq]: True where the vision expert is used (for checks and tests)."""
    pos = jnp.arange(seq_len)[None]
    start = self.vision_start[:, None]
    inside = (pos >= start) & (pos < start + self.num_vision)
    return inside & self.row_has_image[:, None] if self.num_vision else jnp.zeros_like(inside)


def _window(x: jax.Array, start: jax.Array, n: int) -> jax.Array:
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, n, axis=0))(x, start)


def _rest_index(start: jax.Array, seq_len: int, n: int) -> jax.Array:
  j = jnp.arange(seq_len - n)[None]
  return j + n * (j >= start[:, None])


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(lambda row, i: row[i])(x, index)


def route(x: jax.Array, routing: ExpertRouting, vision_fn: Callable, language_fn: Callable):
  """Applies `vision_fn` to the vision-expert tokens and `language_fn` to the others.

  Args:
    x: [batch, seq, ...] token activations.
    vision_fn, language_fn: per-token functions [batch, n, ...] -> pytree of [batch, n, ...].
  Returns:
    The pytree of outputs in the original token order, [batch, seq, ...] each.
  """
  n = routing.num_vision
  if n == 0:
    return language_fn(x)
  seq_len = x.shape[1]
  start = routing.vision_start
  rest_index = _rest_index(start, seq_len, n)
  window_out = vision_fn(_window(x, start, n))
  if routing.mixed:
    language_window_out = language_fn(_window(x, start, n))
    keep = routing.row_has_image
    window_out = jax.tree.map(
        lambda v, l: jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, l),
        window_out, language_window_out)
  rest_out = language_fn(_take_rows(x, rest_index))
  # Inverse permutation of [window, rest] back to sequence order.
  pos = jnp.arange(seq_len)[None]
  s = start[:, None]
  source = jnp.where(pos < s, n + pos, jnp.where(pos < s + n, pos - s, pos))
  return jax.tree.map(lambda w, r: _take_rows(jnp.concatenate([w, r], axis=1), source),
                      window_out, rest_out)
