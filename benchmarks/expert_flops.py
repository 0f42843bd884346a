"""Does the visual expert cost extra FLOPs? And does compile time grow with depth?

Prints, from XLA's cost analysis of the compiled decoder (layers unrolled, because XLA counts
a loop body once), the FLOPs of the expert decoder divided by the FLOPs of the same decoder
without experts (every token through the language weights: a plain LLaMA decoder), for
  * a batch with an image in every sample (images ~80% of the sequence),
  * a text-only batch,
  * a mixed batch (half the rows have an image), in both of routing.py's mixed modes:
    "rows" (a `lax.cond` per row, the CPU default) and "select" (both experts over the
    windows, the GPU / TPU default); the goal is <= 1.05 for the backend's default,
and the compile time of the whole model (scanned layers) at 2 vs 16 layers.

    python benchmarks/expert_flops.py
"""

from __future__ import annotations

import _common  # noqa: F401  (puts the repository root on sys.path)

import time

import jax
import jax.numpy as jnp
from flax import nnx

from cogvlm_jax.config import preset
from cogvlm_jax.modeling.cogvlm import (CogVLMForCausalLM, build_position_ids,
                                        causal_padding_mask)
from cogvlm_jax.modeling.routing import ExpertRouting, mixed_mode

BATCH = 4


def bench_config(layers: int, scan: bool):
  # 224 px / patch 14 -> 256 image tokens + boi/eoi; 64 text tokens: images ~80% of seq.
  return preset("tiny-cogvlm", hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=8, num_hidden_layers=layers, vocab_size=4096,
                scan_layers=scan,
                vision=dict(image_size=224, patch_size=14, hidden_size=64, num_heads=4,
                            intermediate_size=128, num_hidden_layers=2))


def decoder_flops(model, token_type_ids, routing_kind: str, mode: str | None = None) -> float:
  """FLOPs of the compiled decoder (layers + final norm + lm_head) on embeddings."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  batch, seq = token_type_ids.shape
  span = cfg.image_span_length

  def run(state, h, token_type_ids):
    m = nnx.merge(graphdef, state)
    attention_mask = jnp.ones_like(token_type_ids)
    if routing_kind == "dense":
      routing = ExpertRouting.text_only(batch)
    else:
      routing = ExpertRouting.from_token_types(token_type_ids, span, routing_kind == "mixed",
                                               mode)
    position_ids = build_position_ids(token_type_ids, attention_mask)
    return m.decode(h, routing, position_ids, causal_padding_mask(attention_mask))[1]

  h = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.float32)
  compiled = jax.jit(run).lower(state, h, token_type_ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def flop_ratios():
  cfg = bench_config(layers=4, scan=False)
  model = CogVLMForCausalLM(cfg, rngs=nnx.Rngs(0))
  span, seq = cfg.image_span_length, cfg.image_span_length + 64
  all_image = jnp.zeros((BATCH, seq), jnp.int32).at[:, 1:1 + span].set(1)
  text_only = jnp.zeros((BATCH, seq), jnp.int32)
  mixed = all_image.at[BATCH // 2:].set(0)
  dense = decoder_flops(model, text_only, "dense")
  print(f"decoder: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, batch {BATCH}, "
        f"seq {seq}, image span {span} ({span / seq:.0%} of the sequence)")
  print(f"  dense decoder (no experts): {dense / 1e9:.3f} GFLOP")
  default = mixed_mode()
  rows = [("image in every sample", decoder_flops(model, all_image, "image")),
          ("text-only batch", decoder_flops(model, text_only, "dense")),
          ("mixed batch, rows mode", decoder_flops(model, mixed, "mixed", "rows")),
          ("mixed batch, select mode", decoder_flops(model, mixed, "mixed", "select"))]
  for name, flops in rows:
    print(f"  {name:32s} expert/dense FLOP ratio = {flops / dense:.4f}")
  chosen = dict(rows)[f"mixed batch, {default} mode"] / dense
  print(f"  goal: mixed batch with this backend's mode ({default}) <= 1.05: {chosen:.4f} "
        f"({'met' if chosen <= 1.05 else 'NOT met'})")
  return rows, dense


def compile_seconds(layers: int) -> float:
  cfg = bench_config(layers=layers, scan=True)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CogVLMForCausalLM(cfg, rngs=nnx.Rngs(0))))
  span = cfg.image_span_length
  seq = span + 64
  ids = jax.ShapeDtypeStruct((BATCH, seq), jnp.int32)
  images = jax.ShapeDtypeStruct((BATCH, 224, 224, 3), jnp.float32)

  def forward(state, ids, types, images):
    return nnx.merge(graphdef, state)(ids, types, images)

  start = time.perf_counter()
  jax.jit(forward).lower(state, ids, ids, images).compile()
  return time.perf_counter() - start


def main():
  print(_common.machine_line())
  print(f"jax {jax.__version__} on {jax.default_backend()}")
  flop_ratios()
  compile_seconds(2)  # warm up tracing caches so both timings see the same process state
  shallow, deep = compile_seconds(2), compile_seconds(16)
  print(f"compile time, whole model with scanned layers: 16 layers / 2 layers = "
        f"{deep / shallow:.2f} ({deep:.2f}s / {shallow:.2f}s, same process)")


if __name__ == "__main__":
  main()
