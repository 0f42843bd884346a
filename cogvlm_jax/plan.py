"""Plan a training run without the hardware: compile the real train step for a simulated mesh.

    python -m cogvlm_jax.plan --config configs/cogvlm_stage1.py --mesh fsdp=64 [--chip v5p]

Simulates the mesh with that many CPU devices (XLA's host device count), builds the train
state ABSTRACTLY (ShapeDtypeStructs: no weight is allocated), lowers and compiles the real
train step (recipe, microbatches, dtypes, remat, shardings of the config) and prints

* parameters: total and trainable (the recipe's split);
* per-device memory from XLA's memory analysis of the compiled step: arguments (params,
  frozen weights, optimizer state, batch), outputs, temporaries (activations, gradients),
  minus what the donated state aliases; compared with each chip's HBM;
* model FLOPs per step (forward + backward, see `cogvlm_jax.training.flops`);
* for each chip of the peak table (or `--chip`): the step time at 100% MFU, the step time at
  an assumed MFU (`--assumed_mfu`), and, given a measured `--step_time`, the MFU it means.

The memory numbers come from XLA's CPU compiler with the accelerator's sharding: a good
guide to what is resident per device, not an exact figure for the TPU/GPU compiler (its
fusion and rematerialisation decisions differ).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Mapping

# HBM per chip, GiB (the memory the compiled step must fit in).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "H100": 80, "H200": 141}


def parse_mesh(text: str) -> dict[str, int]:
  """"fsdp=64" / "data=2,fsdp=32,tensor=1" -> sizes of ("data", "fsdp", "tensor")."""
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"bad --mesh entry {part!r}: want AXIS=SIZE with AXIS in "
                       f"{tuple(sizes)} and SIZE >= 1, e.g. fsdp=64")
    sizes[name] = int(value)
  return sizes


def batch_spec_for(setup, batch_size: int, seq_len: int) -> dict:
  """Abstract batch as the data pipeline makes it (uint8 images, int32 token rows)."""
  import jax
  import numpy as np

  from cogvlm_jax.batch_layout import SEQUENCE_KEYS
  from cogvlm_jax.training.step import batch_sharding

  v = setup.model_config.vision
  shapes = {"images": ((batch_size, v.image_size, v.image_size, 3), np.uint8),
            "image_valid": ((batch_size,), np.bool_)}
  for k in SEQUENCE_KEYS:
    shapes[k] = ((batch_size, seq_len), np.int32)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(setup, len(s)))
          for k, (s, d) in shapes.items()}


def as_run_config(config):
  """A train.py config of `config`: itself, or, for a model-only config (configs/tiny_*.py,
  the presets), configs/base.py around its model with rows of BOS + the image span + 64 text
  tokens."""
  from cogvlm_jax.config import CogVLMConfig
  from configs import base

  if "train" in config:
    return config
  run = base.get_config()
  for field in ("model", "recipe", "seed"):  # what a model-only config may set
    if field in config:
      run[field] = config[field]
  run.data.max_length = CogVLMConfig.from_dict(config.model).image_span_length + 64
  return run


def plan(config, mesh_sizes: Mapping[str, int], *, batch_size: int | None = None,
         seq_len: int | None = None, grad_accum_steps: int | None = None) -> dict[str, Any]:
  """Compiles the config's train step on a mesh of `mesh_sizes` (needs that many devices).

  The settings are the run's (`run_config.validate_config` checks them against the planned
  mesh first); batch_size / seq_len / grad_accum_steps replace the config's when given.
  """
  import jax

  from cogvlm_jax.config import CogVLMConfig
  from cogvlm_jax.sharding import make_mesh
  from cogvlm_jax.training.flops import train_step_flops
  from cogvlm_jax.training.run_config import sharding_rules, validate_config
  from cogvlm_jax.training.state import build_setup
  from cogvlm_jax.training.step import lower_train_step

  config = as_run_config(config)
  model_cfg = CogVLMConfig.from_dict(config.model).validate()
  n = math.prod(mesh_sizes.values())
  if jax.device_count() < n:
    raise ValueError(f"mesh {dict(mesh_sizes)} needs {n} devices, {jax.device_count()} exist")
  mesh = make_mesh(dict(mesh_sizes), devices=jax.devices()[:n])
  dp = mesh_sizes["data"] * mesh_sizes["fsdp"]
  train = config.train
  batch_size = batch_size or train.batch_size
  seq_len = seq_len or config.data.max_length
  accum = int(grad_accum_steps or train.grad_accum_steps)
  if batch_size % (accum * dp):
    raise ValueError(f"batch {batch_size} does not split into {accum} microbatches over "
                     f"{dp} data-parallel devices")
  checked = config.copy_and_resolve_references()
  checked.train.update(dict(batch_size=batch_size, grad_accum_steps=accum))
  checked.data.max_length = seq_len
  # A plan reads no data: a recipe's dataset locations may still be unset.
  checked.data.source, checked.data.mixture = "demo", None
  validate_config(checked, model_cfg, mesh)
  recipe = config.recipe
  optim = config.optim

  t0 = time.perf_counter()
  setup = build_setup(model_cfg, recipe, optim, int(train.steps), mesh,
                      rules=sharding_rules(config), frozen_dtype=train.frozen_dtype or None)
  trainable, total = setup.num_params()
  spec = batch_spec_for(setup, batch_size, seq_len)
  lowered = lower_train_step(setup, spec, microbatches=accum,
                             z_loss=float(train.z_loss))
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  flops = train_step_flops(setup, spec)
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
                mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {
      "recipe": recipe, "mesh": dict(mesh_sizes), "devices": n, "batch_size": batch_size,
      "seq_len": seq_len, "microbatches": accum, "dtype": model_cfg.dtype,
      "remat_policy": model_cfg.remat_policy,
      "params_total": total, "params_trainable": trainable,
      "memory_per_device": {
          "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
          "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
          "total": per_device},
      "flops_per_step": flops, "lower_s": t_lower, "compile_s": t_compile,
  }


def chip_table(result: Mapping[str, Any], chips, assumed_mfu: float,
               step_time: float | None) -> list[dict]:
  from cogvlm_jax.training.flops import PEAK_FLOPS

  rows = []
  for chip in chips:
    peak = PEAK_FLOPS[chip] * result["devices"]
    ideal = result["flops_per_step"] / peak
    row = {"chip": chip, "peak_tflops_per_chip": PEAK_FLOPS[chip] / 1e12,
           "step_s_at_100pct": ideal, f"step_s_at_{assumed_mfu:.0%}_mfu": ideal / assumed_mfu,
           "fits_hbm": result["memory_per_device"]["total"] <= HBM_GIB[chip] * 2**30}
    if step_time:
      row["mfu_at_measured_step"] = ideal / step_time
    rows.append(row)
  return rows


def format_report(result: Mapping[str, Any], rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  m = result["memory_per_device"]
  lines = [
      f"recipe {result['recipe']!r} on mesh {result['mesh']} ({result['devices']} devices), "
      f"batch {result['batch_size']} x seq {result['seq_len']} in {result['microbatches']} "
      f"microbatch(es), compute {result['dtype']}, remat {result['remat_policy']}",
      f"parameters: {result['params_total']:,} total, {result['params_trainable']:,} trainable "
      f"({result['params_trainable'] / result['params_total']:.1%})",
      f"memory per device (XLA): {gib(m['total'])} = arguments {gib(m['arguments'])} + "
      f"outputs {gib(m['outputs'])} + temporaries {gib(m['temporaries'])} - aliased "
      f"{gib(m['aliased'])}",
      f"FLOPs per step (model, fwd+bwd): {result['flops_per_step']:.4g} "
      f"({result['flops_per_step'] / result['devices']:.4g} per device)",
      f"lowered in {result['lower_s']:.1f}s, compiled in {result['compile_s']:.1f}s",
      "",
  ]
  keys = [k for k in rows[0] if k != "chip"]
  lines.append("chip   " + "  ".join(f"{k:>22s}" for k in keys))
  for r in rows:
    cells = []
    for k in keys:
      v = r[k]
      cells.append(f"{str(v):>22s}" if isinstance(v, bool) else
                   f"{v:>22.1%}" if k.startswith("mfu") else f"{v:>22.4g}")
    lines.append(f"{r['chip']:6s} " + "  ".join(cells))
  return "\n".join(lines)


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="config file (get_config()); "
                      "'path:arg' passes arg to get_config")
  parser.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=64 or data=2,fsdp=32")
  parser.add_argument("--chip", default="", help="one of the peak table (default: all)")
  parser.add_argument("--batch_size", type=int, default=0, help="default: train.batch_size")
  parser.add_argument("--seq_len", type=int, default=0, help="default: data.max_length")
  parser.add_argument("--grad_accum_steps", type=int, default=0,
                      help="microbatches per step; default: train.grad_accum_steps")
  parser.add_argument("--assumed_mfu", type=float, default=0.4)
  parser.add_argument("--step_time", type=float, default=0.0,
                      help="a measured step time (s): prints the MFU it means")
  parser.add_argument("--debug", action="store_true",
                      help="show the Python traceback of an error instead of one line")
  args = parser.parse_args(argv)
  from cogvlm_jax.cli import run_main  # bad input: one line `error: ...`, exit 2
  return run_main(lambda: _plan_command(args), debug=args.debug)


def _plan_command(args) -> int:
  """main's work: simulate the mesh, load the config, plan, print the report."""
  mesh_sizes = parse_mesh(args.mesh)
  n = math.prod(mesh_sizes.values())
  # The simulated devices: XLA reads this once, when the backend starts.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import importlib.util

  from cogvlm_jax.training.flops import PEAK_FLOPS, chip_peak

  path, _, arg = args.config.partition(":")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("plan_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  if args.chip:
    chip_peak(args.chip)  # validates the name
    chips = [k for k in PEAK_FLOPS if k.lower() == args.chip.lower()]
  else:
    chips = list(PEAK_FLOPS)
  result = plan(config, mesh_sizes, batch_size=args.batch_size or None,
                seq_len=args.seq_len or None, grad_accum_steps=args.grad_accum_steps or None)
  print(format_report(result, chip_table(result, chips, args.assumed_mfu,
                                         args.step_time or None)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
