"""Plan a training run without the hardware: compile the real train step for a TPU slice.

    python -m cogvlm_jax.plan --config configs/cogvlm_stage1.py --topology v5p-128 \
        [--mesh fsdp=64] [--num_slices 1] [--config.FIELD=VALUE ...] [--eval] \
        [--after_switch] [--json FILE]
    python -m cogvlm_jax.plan --config configs/cogvlm_stage1.py --mesh fsdp=64 [--chip v5p]

With --topology, the TPU compiler (libtpu, loaded by path; no TPU needed) compiles the step
for that slice's devices, and memory is per chip. Without it, the mesh is simulated with
that many CPU devices (XLA's host device count) and XLA's CPU compiler estimates. It builds the train
state ABSTRACTLY (ShapeDtypeStructs: no weight is allocated), lowers and compiles the real
train step (recipe, microbatches, dtypes, remat, shardings of the config) and prints

* parameters: total and trainable (the recipe's split);
* per-device memory from XLA's memory analysis of the compiled step: arguments (params,
  frozen weights, optimizer state, batch), outputs, temporaries (activations, gradients),
  minus what the donated state aliases; compared with each chip's HBM;
* model FLOPs per step (forward + backward, see `cogvlm_jax.training.flops`);
* for each chip of the peak table (or `--chip`): the step time at 100% MFU, the step time at
  an assumed MFU (`--assumed_mfu`), and, given a measured `--step_time`, the MFU it means;
* with --topology: `fits` / `does not fit` the chip's HBM, and if not, the largest buffer.

`--eval` then compiles eval's generate program too (`plan_generate`: prefill + cached decode,
weights in the compute dtype) and prints its per-chip memory and compile time.
`--after_switch` plans the step after `train.resolution_switch` (CogVLM stage 2 at 490 px).
`--json FILE` writes the numbers (benchmarks/tpu_table.py builds README's table from them).

Without --topology, the memory numbers come from XLA's CPU compiler with the accelerator's
sharding: a guide to what is resident per device, not the TPU/GPU compiler's figure (its
fusion and rematerialisation decisions differ: CogVLM stage 1 on 64 chips, 8.30 GiB on the
CPU plan, is 6.07 GiB per chip for the TPU compiler).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from typing import Any, Mapping

# HBM per chip, GiB (the memory the compiled step must fit in).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "H100": 80, "H200": 141}

# Cloud TPU accelerator-type prefixes -> (chip, libtpu topology family, TensorCores per chip
# counted in N, torus dimensions). v4 / v5p names count TensorCores (2 per chip), v5e / v6e
# names count chips.
_TPU_FAMILIES = {"v4": ("v4", "v4", 2, 3), "v5p": ("v5p", "v5p", 2, 3),
                 "v5litepod": ("v5e", "v5e", 1, 2), "v5e": ("v5e", "v5e", 1, 2),
                 "v6e": ("v6e", "v6e", 1, 2)}
_CHIP_COUNTS = {2: (1, 4, 8, 16, 32, 64, 128, 256), 3: (4, 8, 16, 32, 64, 128, 256, 512, 1024)}
LIBTPU_VERSION = "0.0.42.1"  # what jax[tpu]==0.10.2 pins; .ci/setup installs it


def valid_topologies() -> list[str]:
  """Every accepted --topology name, e.g. v5p-128, v5litepod-256, v6e-8."""
  names = []
  for prefix, (_, _, cores, dims) in _TPU_FAMILIES.items():
    names += [f"{prefix}-{chips * cores}" for chips in _CHIP_COUNTS[dims]]
  return names


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """A chip count as the slice's torus, as Cloud TPU names it: 8 -> (2, 4) in 2D,
  (2, 2, 2) in 3D; 4 in 3D is (2, 2, 1)."""
  if dims == 3 and chips == 4:
    return (2, 2, 1)
  shape = [1] * dims
  axis = 0
  while math.prod(shape) < chips:
    shape[axis % dims] *= 2
    axis += 1
  return tuple(sorted(shape))


def parse_topology(name: str) -> dict[str, Any]:
  """"v5p-128" -> {chip: "v5p", chips: 64, topology: "v5p:4x4x4", hbm_gib: 95, ...}.

  Raises ValueError listing the valid names for anything else.
  """
  prefix, _, count = name.lower().partition("-")
  family = _TPU_FAMILIES.get(prefix)
  valid = valid_topologies()
  if family is None or not count.isdigit() or f"{prefix}-{count}" not in valid:
    raise ValueError(f"unknown --topology {name!r}; valid: {', '.join(valid)}")
  chip, libtpu_name, cores, dims = family
  chips = int(count) // cores
  shape = _torus(chips, dims)
  host = (2, 2, 1) if chips >= 4 else (1, 1, 1)  # 4 chips per TPU VM host (1-chip v5e: 1)
  return {"name": name, "chip": chip, "chips": chips, "hbm_gib": HBM_GIB[chip],
          "topology": f"{libtpu_name}:{'x'.join(map(str, shape))}", "host_bounds": host}


def libtpu_path() -> str:
  """The libtpu.so the TPU compiler comes from: $TPU_LIBRARY_PATH, an installed `libtpu`
  (jax[tpu]), or the one .ci/setup puts aside in .venv/libtpu. ValueError saying how to
  install it otherwise."""
  import importlib.util

  candidates = [os.environ.get("TPU_LIBRARY_PATH", "")]
  spec = importlib.util.find_spec("libtpu")
  if spec and spec.submodule_search_locations:
    candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidates.append(os.path.join(root, ".venv", "libtpu", "libtpu", "libtpu.so"))
  for path in candidates:
    if path and os.path.isfile(path):
      return path
  raise ValueError(
      "--topology needs the TPU compiler (libtpu), which is not installed: run `bash "
      ".ci/setup` (puts libtpu==" + LIBTPU_VERSION + " in .venv/libtpu) or `pip install "
      "--target .venv/libtpu libtpu==" + LIBTPU_VERSION + "`")


def tpu_devices(name: str, num_slices: int = 1) -> list:
  """The devices of TPU topology `name` x num_slices, for compiling only: no TPU needed.

  Loads libtpu by path on a CPU host. The environment keeps libtpu from looking for TPU
  hardware or a metadata server (warnings, delays) and from taking /tmp/libtpu_lockfile,
  which only guards real chips and would stop a second planner running at once.
  """
  topo = parse_topology(name)
  os.environ["TPU_LIBRARY_PATH"] = libtpu_path()
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", name.lower())):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo["topology"], chip_config_name="default",
      chips_per_host_bounds=topo["host_bounds"], num_slices=num_slices)
  return list(desc.devices)


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
  """Abstract batch as the data pipeline makes it (uint8 images, and CogAgent's uint8
  cross_images, int32 token rows)."""
  import jax
  import numpy as np

  from cogvlm_jax.batch_layout import SEQUENCE_KEYS
  from cogvlm_jax.training.step import batch_sharding

  v, x = setup.model_config.vision, setup.model_config.cross_vision
  shapes = {"images": ((batch_size, v.image_size, v.image_size, 3), np.uint8),
            "image_valid": ((batch_size,), np.bool_)}
  if x is not None:  # CogAgent: the same picture at the cross tower's size
    shapes["cross_images"] = ((batch_size, x.image_size, x.image_size, 3), np.uint8)
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


def after_switch(config):
  """The config of the phase train.py runs after `train.resolution_switch` (CogVLM stage 2's
  224 -> 490 px): the switch's image size, max_length and grad_accum_steps, and no switch.
  ValueError if the config has none."""
  switch = config.train.get("resolution_switch") if "train" in config else None
  if not switch or not switch.get("step"):
    raise ValueError("--after_switch: the config has no train.resolution_switch")
  c = config.copy_and_resolve_references()
  if "image_size" in switch:
    c.model.vision.image_size = int(switch["image_size"])
  if "max_length" in switch:
    c.data.max_length = int(switch["max_length"])
  if "grad_accum_steps" in switch:
    c.train.grad_accum_steps = int(switch["grad_accum_steps"])
  c.train.resolution_switch = None
  return c


def plan(config, mesh_sizes: Mapping[str, int], *, batch_size: int | None = None,
         seq_len: int | None = None, grad_accum_steps: int | None = None,
         devices=None) -> dict[str, Any]:
  """Compiles the config's train step on a mesh of `mesh_sizes` (needs that many devices).

  The settings are the run's (`run_config.validate_config` checks them against the planned
  mesh first); batch_size / seq_len / grad_accum_steps replace the config's when given.
  `devices`: those of the mesh (e.g. `tpu_devices("v5p-128")`: the TPU compiler compiles);
  default: this process's devices. The result's "compiled" is the compiled step.
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
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < n:
    raise ValueError(f"mesh {dict(mesh_sizes)} needs {n} devices, {len(devices)} exist")
  mesh = make_mesh(dict(mesh_sizes), devices=devices[:n])
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
                      rules=sharding_rules(config), frozen_dtype=train.frozen_dtype or None,
                      lora=train.get("lora"))
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
      "platform": devices[0].platform, "compiled": compiled,
  }


# Text tokens after the image span in the eval prompt the generate plan compiles: the
# largest of eval's default length buckets (`eval.generator.DEFAULT_TEXT_BUCKETS`).
EVAL_TEXT_TOKENS = 256


def plan_generate(config, mesh_sizes: Mapping[str, int], *, batch_size: int | None = None,
                  prompt_len: int | None = None, max_new_tokens: int | None = None,
                  devices=None) -> dict[str, Any]:
  """Compiles the generation program eval.py runs (`cogvlm_jax.generate._generate`: the
  prefill of a left-padded prompt batch filling the KV cache, then the cached decode steps in
  their `while_loop` phases) for the config's model on a mesh of `mesh_sizes`.

  As eval.py runs it: weights in the compute dtype (`model.dtype`, bf16 for the recipes; no
  optimizer state), sharded by the config's rules, under `activation_sharding`, greedy.
  Defaults: batch_size = mesh data x fsdp (one prompt per data-parallel device), prompt_len
  = BOS + the image span + EVAL_TEXT_TOKENS (eval's largest default bucket),
  max_new_tokens = config.eval.max_new_tokens or 32.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from cogvlm_jax.config import CogVLMConfig
  from cogvlm_jax.modeling.models import abstract_model
  from cogvlm_jax.sharding import activation_sharding, make_mesh, state_shardings
  from cogvlm_jax.training.run_config import sharding_rules

  # The module (the package's `generate` attribute is the function of the same name).
  generate_lib = importlib.import_module("cogvlm_jax.generate")
  config = as_run_config(config)
  model = dict(config.model.to_dict())
  model["param_dtype"] = model["dtype"]  # eval holds the weights in the compute dtype
  model_cfg = CogVLMConfig.from_dict(model).validate()
  n = math.prod(mesh_sizes.values())
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < n:
    raise ValueError(f"mesh {dict(mesh_sizes)} needs {n} devices, {len(devices)} exist")
  mesh = make_mesh(dict(mesh_sizes), devices=devices[:n])
  rules = sharding_rules(config)
  dp = mesh_sizes["data"] * mesh_sizes["fsdp"]
  batch_size = batch_size or dp
  if batch_size % dp:
    raise ValueError(f"eval batch {batch_size} does not split over {dp} data-parallel "
                     "devices (mesh data x fsdp)")
  prompt_len = prompt_len or 1 + model_cfg.image_span_length + EVAL_TEXT_TOKENS
  max_new_tokens = int(max_new_tokens or config.eval.get("max_new_tokens") or 32)

  t0 = time.perf_counter()
  graphdef, state = abstract_model(model_cfg)
  weights = nnx.to_pure_dict(state)
  shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
  weights = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         weights, shardings)
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # the batch dim, as eval
  replicated = NamedSharding(mesh, PartitionSpec())
  tokens = jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32, sharding=rows)
  size = model_cfg.vision.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), model_cfg.dtype, sharding=rows)
  kw = {}
  if model_cfg.is_cogagent:
    cross = model_cfg.cross_vision.image_size
    kw["cross_images"] = jax.ShapeDtypeStruct((batch_size, cross, cross, 3), model_cfg.dtype,
                                              sharding=rows)
  stop_ids = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated)
  pad_id = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  with activation_sharding(mesh, rules):
    lowered = generate_lib._generate.lower(
        graphdef, weights, tokens, tokens, tokens, images, stop_ids, pad_id, rng,
        max_new_tokens=max_new_tokens, sampling=generate_lib.SamplingConfig(),
        mixed_batch=False, **kw)
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
           mem.alias_size_in_bytes)
  return {
      "batch_size": batch_size, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
      "dtype": model_cfg.dtype, "mesh": dict(mesh_sizes), "devices": n,
      "decode_phases": len(generate_lib.decode_phases(prompt_len, max_new_tokens)),
      "memory_per_device": {
          "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
          "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
          "total": total},
      "lower_s": t_lower, "compile_s": t_compile, "platform": devices[0].platform,
      "compiled": compiled,
  }


def format_generate_report(result: Mapping[str, Any]) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  m = result["memory_per_device"]
  return "\n".join([
      f"eval / generate: batch {result['batch_size']} x prompt {result['prompt_len']} + "
      f"{result['max_new_tokens']} new tokens (prefill + cached decode in "
      f"{result['decode_phases']} phase(s)), weights in {result['dtype']}, greedy",
      f"memory per device (XLA): {gib(m['total'])} = arguments {gib(m['arguments'])} + "
      f"outputs {gib(m['outputs'])} + temporaries {gib(m['temporaries'])} - aliased "
      f"{gib(m['aliased'])}",
      f"lowered in {result['lower_s']:.1f}s, compiled in {result['compile_s']:.1f}s"])


def largest_buffer(compiled) -> tuple[str, int]:
  """(HLO instruction with its per-device shape, bytes) of the largest array the compiled
  program makes: what to shrink (microbatches, remat, sharding) when a step does not fit."""
  import re

  import numpy as np

  sizes = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
           "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
  best = ("none", 0)
  pattern = re.compile(r"(%[\w.\-]+) = (\w+)\[([\d,]*)\]")
  for line in compiled.as_text().splitlines():
    m = pattern.search(line)
    if not m or m.group(2) not in sizes:
      continue
    dims = [int(d) for d in m.group(3).split(",") if d]
    nbytes = int(np.prod(dims, dtype=np.int64)) * sizes[m.group(2)]
    if nbytes > best[1]:
      best = (f"{m.group(1)} {m.group(2)}[{m.group(3)}]", nbytes)
  return best


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
  compiler = ("TPU compiler (libtpu), per chip" if result.get("platform") == "tpu" else
              "CPU SIMULATION: XLA's CPU compiler with the accelerator's sharding, an estimate")
  lines = [
      f"compiled by: {compiler}",
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
  parser.add_argument("--mesh", default="", help="e.g. fsdp=64 or data=2,fsdp=32 (default: "
                      "fsdp over every chip of --topology, else fsdp=8)")
  parser.add_argument("--topology", default="", help="compile with the TPU compiler for a "
                      "Cloud TPU slice: v4-N / v5p-N (N TensorCores), v5litepod-N / v5e-N / "
                      "v6e-N (N chips); default: a CPU simulation")
  parser.add_argument("--num_slices", type=int, default=1, help="slices of --topology")
  parser.add_argument("--chip", default="", help="one of the peak table (default: all)")
  parser.add_argument("--batch_size", type=int, default=0, help="default: train.batch_size")
  parser.add_argument("--seq_len", type=int, default=0, help="default: data.max_length")
  parser.add_argument("--grad_accum_steps", type=int, default=0,
                      help="microbatches per step; default: train.grad_accum_steps")
  parser.add_argument("--assumed_mfu", type=float, default=0.4)
  parser.add_argument("--step_time", type=float, default=0.0,
                      help="a measured step time (s): prints the MFU it means")
  parser.add_argument("--after_switch", action="store_true", help="plan the step after "
                      "train.resolution_switch (stage 2 at 490 px) instead of the first one")
  parser.add_argument("--eval", action="store_true", help="also compile the eval / "
                      "generate program (prefill + cached decode, as eval.py runs it)")
  parser.add_argument("--eval_batch_size", type=int, default=0,
                      help="--eval prompts per step; default: mesh data x fsdp")
  parser.add_argument("--eval_prompt_len", type=int, default=0, help="--eval prompt tokens; "
                      f"default: BOS + the image span + {EVAL_TEXT_TOKENS}")
  parser.add_argument("--eval_max_new_tokens", type=int, default=0,
                      help="--eval new tokens; default: eval.max_new_tokens or 32")
  parser.add_argument("--json", default="", help="also write the numbers (memory, verdict, "
                      "largest buffer, compile times, FLOPs, ideal step time) to this file")
  parser.add_argument("--debug", action="store_true",
                      help="show the Python traceback of an error instead of one line")
  args, rest = parser.parse_known_args(argv)
  args._argv = list(sys.argv[1:] if argv is None else argv)
  # --config.FIELD=VALUE overrides go to config_flags (load_config), anything else is an error.
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  from cogvlm_jax.cli import run_main  # bad input: one line `error: ...`, exit 2
  return run_main(lambda: _plan_command(args, rest), debug=args.debug)


def load_config(path: str, overrides=()):
  """The config of `path` ('file.py' or 'file.py:arg') with `--config.FIELD=VALUE`
  overrides applied by ml_collections' config_flags, exactly as train.py does."""
  from absl import flags
  from ml_collections import config_flags

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:  # configs import `configs._recipes`
    sys.path.insert(0, root)
  values = flags.FlagValues()
  argv = ["plan", f"--config={path}", *overrides]
  # sys_argv: config_flags defines the override flags from these args (default: sys.argv).
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=False, sys_argv=argv)
  values(argv)
  return values.config


def _mesh_for_topology(text: str, chips: int, name: str) -> dict[str, int]:
  """--mesh on a topology: default fsdp over every chip; otherwise its product must be the
  chip count (ValueError naming both)."""
  sizes = parse_mesh(text) if text else {"data": 1, "fsdp": chips, "tensor": 1}
  if math.prod(sizes.values()) != chips:
    raise ValueError(f"--mesh {text!r} has {math.prod(sizes.values())} devices but "
                     f"--topology {name} has {chips} chips; make the mesh sizes multiply "
                     f"to {chips}")
  return sizes


def _plan_command(args, overrides) -> int:
  """main's work: the devices (a TPU topology or simulated CPUs), the config, plan, report."""
  devices, topo = None, None
  if args.topology:
    topo = parse_topology(args.topology)  # bad names fail here, before jax starts
    topo["chips"] *= args.num_slices
    mesh_sizes = _mesh_for_topology(args.mesh, topo["chips"], args.topology)
    libtpu_path()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing: CPU only
  else:
    mesh_sizes = parse_mesh(args.mesh or "fsdp=8")
    n = math.prod(mesh_sizes.values())
    # The simulated devices: XLA reads this once, when the backend starts.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  from cogvlm_jax.training.flops import PEAK_FLOPS, chip_peak

  config = load_config(args.config, overrides)
  if args.after_switch:
    config = after_switch(config)
  if topo:
    devices = tpu_devices(args.topology, args.num_slices)
    chips = [topo["chip"]]
  elif args.chip:
    chip_peak(args.chip)  # validates the name
    chips = [k for k in PEAK_FLOPS if k.lower() == args.chip.lower()]
  else:
    chips = list(PEAK_FLOPS)
  result = plan(config, mesh_sizes, batch_size=args.batch_size or None,
                seq_len=args.seq_len or None, grad_accum_steps=args.grad_accum_steps or None,
                devices=devices)
  rows = chip_table(result, chips, args.assumed_mfu, args.step_time or None)
  print(format_report(result, rows))
  record = {"argv": args._argv,
            "topology": args.topology or None, "train": _summary(result),
            "ideal_step_s": {r["chip"]: r["step_s_at_100pct"] for r in rows}}
  if topo:
    record["hbm_gib"] = topo["hbm_gib"]
    record["train"].update(_print_verdict("train step", result, args.topology,
                                          topo["hbm_gib"]))
  if args.eval:
    del result  # the train step's executable: free it before the next compile
    generated = plan_generate(config, mesh_sizes, batch_size=args.eval_batch_size or None,
                              prompt_len=args.eval_prompt_len or None,
                              max_new_tokens=args.eval_max_new_tokens or None,
                              devices=devices)
    print()
    print(format_generate_report(generated))
    record["eval"] = _summary(generated)
    if topo:
      record["eval"].update(_print_verdict("eval / generate", generated, args.topology,
                                           topo["hbm_gib"]))
  if args.json:
    import json
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
  return 0


def _summary(result: Mapping[str, Any]) -> dict:
  """The JSON-able part of a plan result (not the executable)."""
  return {k: v for k, v in result.items() if k != "compiled"}


def _print_verdict(what: str, result: Mapping[str, Any], topology: str,
                   hbm_gib: float) -> dict:
  """Prints `TOPOLOGY WHAT: X GiB per chip of H GiB HBM: fits`, and if it does not, the
  largest buffer of the compiled program (what to shrink). Returns them as a dict."""
  total, hbm = result["memory_per_device"]["total"], hbm_gib * 2**30
  verdict = {"fits": total <= hbm}
  print(f"{topology} {what}: {total / 2**30:.2f} GiB per chip of {hbm_gib} GiB HBM: "
        f"{'fits' if total <= hbm else 'does not fit'}")
  if total > hbm:
    name, nbytes = largest_buffer(result["compiled"])
    print(f"largest buffer: {name} = {nbytes / 2**30:.2f} GiB per chip")
    verdict["largest_buffer"], verdict["largest_buffer_bytes"] = name, nbytes
  return verdict


if __name__ == "__main__":
  sys.exit(main())
