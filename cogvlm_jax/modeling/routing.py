"""Visual-expert routing: which tokens use the vision weights, at no extra FLOPs.

The rule (`expert_mask`): a token uses the VISION expert iff its type is vision AND the next
token's type is vision. Within one image span (boi, image tokens, eoi) that is boi and the
image tokens; eoi, text, BOS and padding use the LANGUAGE expert.

Each row holds at most one image span of static length, so the vision-expert tokens of a row
are one contiguous window of static length `num_vision = span - 1` starting at a per-row
offset. `route` gathers that window ([B, num_vision, ...]) and the rest of the row
([B, seq - num_vision, ...]), runs each through exactly one expert and scatters the results
back. Every token goes through exactly one expert's matmuls, so the decoder costs what a
dense decoder costs.

Mixed batches (some rows without an image): a text-only row's window must go through the
language expert instead. How depends on the backend (`mixed_mode`):
  * "rows" (CPU): one `lax.cond` per row runs that row's window through its own expert
    only, so any mix costs what the dense decoder costs. (`jax.lax.ragged_dot`, the grouped
    alternative, is lowered on XLA:CPU as one masked dense matmul per group: 2.0x the
    FLOPs and 2.4x the time of a plain matmul, measured for [4096, 512] x [512, 1408].)
  * "select" (GPU / TPU, where a per-row branch on a batch-sharded array would gather the
    batch): every window through both experts and a per-row select; the extra cost is one
    language-expert pass over the windows.
`benchmarks/expert_flops.py` reports both against the dense decoder.
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
  mode: static; how mixed batches are routed, "rows" / "select" (None: `mixed_mode()`).
  """

  vision_start: jax.Array
  row_has_image: jax.Array
  num_vision: int = struct.field(pytree_node=False, default=0)
  mixed: bool = struct.field(pytree_node=False, default=False)
  mode: str | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def text_only(cls, batch: int) -> "ExpertRouting":
    return cls(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), 0, False)

  @classmethod
  def from_token_types(cls, token_type_ids: jax.Array, span_length: int, mixed: bool,
                       mode: str | None = None) -> "ExpertRouting":
    """Routing for rows with one image span of `span_length` vision-typed tokens."""
    is_vision = token_type_ids == VISION_TOKEN_TYPE
    start = jnp.argmax(is_vision, axis=1).astype(jnp.int32)
    return cls(start, jnp.any(is_vision, axis=1), span_length - 1, mixed, mode)

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


def mixed_mode() -> str:
  """How `route` handles mixed batches on the default backend: "rows" or "select"."""
  return "rows" if jax.default_backend() == "cpu" else "select"


def _per_row_expert(window: jax.Array, has_image: jax.Array, vision_fn: Callable,
                    language_fn: Callable):
  """Each row of window [B, n, ...] through its own expert: a `lax.cond` per row.

  XLA runs only the taken branch, so a text-only row costs one language pass. Returns the
  pytree of [B, n, ...] outputs.
  """
  rows = [jax.lax.cond(has_image[b], vision_fn, language_fn, window[b:b + 1])
          for b in range(window.shape[0])]
  return jax.tree.map(lambda *r: jnp.concatenate(r, axis=0), *rows)


def route(x: jax.Array, routing: ExpertRouting, vision_fn: Callable, language_fn: Callable,
          mode: str | None = None):
  """Applies `vision_fn` to the vision-expert tokens and `language_fn` to the others.

  Args:
    x: [batch, seq, ...] token activations.
    vision_fn, language_fn: per-token functions [batch, n, ...] -> pytree of [batch, n, ...].
    mode: mixed batches only, "rows" or "select" (default: routing.mode, else
      `mixed_mode()`).
  Returns:
    The pytree of outputs in the original token order, [batch, seq, ...] each.
  """
  n = routing.num_vision
  if n == 0:
    return language_fn(x)
  seq_len = x.shape[1]
  start = routing.vision_start
  rest_index = _rest_index(start, seq_len, n)
  window = _window(x, start, n)
  mode = mode or routing.mode or mixed_mode()
  if mode not in ("rows", "select"):
    raise ValueError(f"unknown mixed routing mode {mode!r}; known: rows, select")
  if routing.mixed and mode == "rows":
    window_out = _per_row_expert(window, routing.row_has_image, vision_fn, language_fn)
  else:
    window_out = vision_fn(window)
  if routing.mixed and mode == "select":
    language_window_out = language_fn(window)
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
