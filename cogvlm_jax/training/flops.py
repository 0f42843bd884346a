"""FLOPs per train step, accelerator peaks, and MFU.

* `train_step_flops` counts the model FLOPs of one step (forward + backward of the loss; the
  optimizer's O(params) work is left out) with XLA's cost analysis of the step LOWERED with the
  decoder layers unrolled: XLA's analysis counts a while-loop body once, so the compiled
  (scanned, accumulated) step would undercount by the number of layers. Weight gradients of
  frozen parameters are not computed and so not counted. Recomputation (remat) is not counted:
  this is MODEL FLOPs utilisation.
* `PEAK_FLOPS`: dense bf16 peak per chip from the vendors' data sheets.
* On CPU there is no data sheet: `measured_matmul_peak` times a large `jnp.dot` on this host,
  and MFU is relative to that.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Dense bf16 peak FLOP/s per chip (TPU: per chip; GPU: SXM, without sparsity).
PEAK_FLOPS = {
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
}

# jax `device_kind` substrings -> PEAK_FLOPS key.
_KIND_TO_CHIP = (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
                 ("v5", "v5p"), ("v4", "v4"), ("h200", "H200"), ("h100", "H100"))


def chip_peak(name: str) -> float:
  """Peak FLOP/s of a chip named as in PEAK_FLOPS (case-insensitive)."""
  for k, v in PEAK_FLOPS.items():
    if k.lower() == name.lower():
      return v
  raise ValueError(f"unknown chip {name!r}; known: {', '.join(PEAK_FLOPS)}")


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` [n, n] @ [n, n] `jnp.dot`s on the first local device.

  On CPU the simulated devices of one process share the host's cores, so this is the
  throughput of the whole host, not of one simulated device.
  """
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype), device)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def device_peak_flops(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of ALL devices of the run, where the number comes from).

  `override` > 0: that many FLOP/s per device. TPU/GPU: the data-sheet peak of the device
  kind. CPU (or an unknown kind): the measured host matmul peak times the process count.
  """
  n = jax.device_count()
  if override > 0:
    return override * n, f"configured {override:.3g} FLOP/s per device"
  kind = jax.devices()[0].device_kind.lower()
  if jax.default_backend() != "cpu":
    for sub, chip in _KIND_TO_CHIP:
      if sub in kind:
        return PEAK_FLOPS[chip] * n, f"{chip} bf16 peak x {n}"
  peak = measured_matmul_peak()
  return peak * jax.process_count(), (f"measured jnp.dot peak of the host "
                                      f"({peak / 1e9:.1f} GFLOP/s) x {jax.process_count()}")


def train_step_flops(setup, batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> float:
  """Model FLOPs (whole batch, all devices) of one forward + backward of the train loss."""
  from cogvlm_jax.training.state import make_model
  from cogvlm_jax.training.step import model_inputs, next_token_loss

  cfg = dataclasses.replace(setup.model_config, scan_layers=False, remat_policy="none")
  # The run's model (with its LoRA adapters: the trainable set of a LoRA run).
  model = nnx.eval_shape(lambda: make_model(cfg, 0, setup.lora))
  graphdef, params, frozen = nnx.split(model, setup.param_filter, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  # Frozen weights as they are held (e.g. bf16), trainable ones as in the state.
  plain = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_spec.items()}

  def loss(p, f, b):
    m = nnx.merge(graphdef, p, f)
    logits = m(**model_inputs(b, cfg.dtype))
    return next_token_loss(logits, b["input_ids"], b["loss_mask"])[0]

  lowered = jax.jit(jax.grad(loss)).lower(plain(params), plain(frozen), batch)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])
