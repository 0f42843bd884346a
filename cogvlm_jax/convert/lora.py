"""LoRA exports of a training run with `train.lora`: merge-lora and to-peft.

    python -m cogvlm_jax.convert merge-lora --src LORA_RUN --dst OUT_DIR
    python -m cogvlm_jax.convert to-peft    --src LORA_RUN --dst PEFT_DIR [--base-model NAME]
    python -m cogvlm_jax.convert from-peft  --src PEFT_DIR --base BASE_CKPT --dst LORA_CKPT

merge-lora writes a weights checkpoint (like to-jax's output) with every adapter merged into
its base kernel (W + alpha/r * A @ B, float32 math, stored dtype back): `to-hf` then exports
it as a plain CogVLM checkpoint. to-peft writes `adapter_config.json` and
`adapter_model.safetensors` with the original module names (`model.layers.0.self_attn.
vision_expert_query_key_value`, ...), which `peft.PeftModel.from_pretrained(<the original
Hugging Face model>, PEFT_DIR)` loads. from-peft is the way back: a PEFT LoRA adapter folder
plus its base model (a cogvlm_jax weights checkpoint: `to-jax` output) -> a LoRA checkpoint
(base weights + adapters, the adapter's settings as its `train.lora`) that merge-lora,
to-peft and `train.init_from` of a LoRA run with the same settings take. In code:
`read_peft_adapter` + `modeling.lora.apply_lora` / `set_adapters`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flax import nnx

from cogvlm_jax import checkpoint as ckpt
from cogvlm_jax.convert.stream import is_float
from cogvlm_jax.fileio import atomic_output_dir
from cogvlm_jax.modeling import lora as lora_lib
from cogvlm_jax.modeling import quantize
from cogvlm_jax.modeling.models import model_class

COMMANDS = ("merge-lora", "to-peft", "from-peft")
_BATCH_BYTES = 64 << 20  # parameters restored per Orbax call (small ones together)


def add_parsers(sub, common) -> None:
  """Registers merge-lora and to-peft on the convert CLI's subparsers."""
  sub.add_parser("merge-lora", parents=[common],
                 help="LoRA training run -> cogvlm_jax checkpoint with the adapters merged")
  peft = sub.add_parser("to-peft", parents=[common],
                        help="LoRA training run -> PEFT adapter folder (original module names)")
  peft.add_argument("--base-model", default=None,
                    help="base_model_name_or_path written to adapter_config.json")
  back = sub.add_parser("from-peft", parents=[common],
                        help="PEFT adapter folder + base checkpoint -> LoRA checkpoint")
  back.add_argument("--base", required=True,
                    help="the adapter's base model: a cogvlm_jax weights checkpoint")


def run(args) -> str:
  """Runs the LoRA command of `args`; returns its summary line."""
  if args.command == "merge-lora":
    return merge_lora(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype)
  if args.command == "from-peft":
    return from_peft(args.src, args.base, args.dst, overwrite=args.overwrite, dtype=args.dtype)
  return to_peft(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype,
                 base_model=args.base_model)


def run_lora(step: str):
  """(model config, LoraSpec, units, stored params metadata) of a LoRA run's step dir;
  ValueError when it is not a LoRA run or its adapters do not match its spec."""
  config = ckpt.read_checkpoint_config(step)
  spec = (config.get("train") or {}).get("lora")
  if not spec:
    raise ValueError(f"{step} is not a LoRA training run (its config has no train.lora)")
  spec = lora_lib.LoraSpec.from_dict(spec)
  cfg = ckpt.read_model_config(step)
  units = lora_lib.lora_units(cfg, spec.targets)
  stored = ckpt.params_metadata(step)
  for unit in units:
    for leaf in ("a",) + tuple(f"b_{k}" for k in unit.kernels):
      path = unit.path(leaf)
      if path not in stored:
        raise ValueError(f"{step}: adapter {'/'.join(path)} of train.lora is missing")
      if leaf == "a" and stored[path][0][-1] != spec.rank:
        raise ValueError(f"{step}: adapter {'/'.join(path)} has rank {stored[path][0][-1]}, "
                         f"train.lora.rank is {spec.rank}")
  return cfg, spec, units, stored


def _batches(paths, stored):
  """`paths` in groups of at most _BATCH_BYTES stored bytes (one large parameter alone)."""
  batch, size = [], 0
  for p in paths:
    shape, dtype = stored[p]
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if batch and size + n > _BATCH_BYTES:
      yield batch
      batch, size = [], 0
    batch.append(p)
    size += n
  if batch:
    yield batch


def merge_lora(src: str, dst: str, *, overwrite: bool = False, dtype: str | None = None) -> str:
  """A LoRA run (workdir or step dir) -> a weights checkpoint with the adapters merged.

  One batch of base parameters (with the adapters of its kernels) in memory at a time. A
  QLoRA run's (train.lora.base_dtype) kernels are dequantized (qvalue * qscale, what its
  model computed with) and written in the model's param_dtype (or `dtype`).
  """
  t0 = time.perf_counter()
  step = ckpt.resolve_step_dir(src)
  cfg, spec, units, stored = run_lora(step)
  feeds = {}  # kernel path -> (unit, kernel name)
  for unit in units:
    for k in unit.kernels:
      feeds[unit.owner + (k,)] = unit
  quantized = lora_lib.stored_layout(cfg, stored)
  sizes = {p: v for p, v in stored.items() if not quantize.is_quant_path(p)}
  sizes.update({p: stored[p + ("qvalue",)] for p in quantized})
  base_paths = [p for p in sizes if not lora_lib.is_lora_path(p)]
  merged = 0
  with atomic_output_dir(dst, overwrite) as (stage, out):
    writer = ckpt.ParamsWriter(stage)
    for batch in _batches(base_paths, sizes):
      extra = sorted({u.path(leaf) for p in batch if p in feeds
                      for u in [feeds[p]] for leaf in ("a", f"b_{p[-1]}")})
      arrays = _restore_base(step, batch + extra, quantized, cfg.param_dtype)
      out_arrays = {}
      for p in batch:
        value = arrays[p]
        if p in feeds:
          unit = feeds[p]
          value = lora_lib.merged_kernel(value, arrays[unit.path("a")],
                                         arrays[unit.path(f"b_{p[-1]}")], spec.scale,
                                         unit.stacked)
          merged += 1
        if dtype is not None and is_float(value.dtype):
          value = value.astype(_np_dtype(dtype))
        out_arrays[p] = value
      writer.add(out_arrays)
    hf_config = ckpt.read_checkpoint_config(step).get("hf_config")
    out_cfg = cfg if dtype is None else cfg.replace(param_dtype=dtype)
    ckpt.write_step_dir(out, writer.finalize(), ckpt.weights_config(out_cfg, hf_config))
  base = f", base dequantized from {spec.base_dtype}" if quantized else ""
  return (f"merge-lora: {merged} kernels merged (rank {spec.rank}, alpha {spec.alpha:g}, "
          f"targets {', '.join(spec.targets)}{base}), {len(base_paths)} parameters in "
          f"{time.perf_counter() - t0:.1f}s -> {os.path.abspath(dst)}")


def _restore_base(step: str, paths, layout: quantize.Layout, param_dtype: str) -> dict:
  """`paths` restored as numpy; a quantized kernel's path dequantized to `param_dtype`."""
  stored = [q for p in paths for q in ((p + ("qvalue",), p + ("qscale",)) if p in layout
                                       else (p,))]
  arrays = quantize.dequantize_flat(ckpt.restore_numpy(step, stored), layout)
  return {p: arrays[p].astype(_np_dtype(param_dtype)) if p in layout else arrays[p]
          for p in paths}


def _np_dtype(name: str):
  import ml_dtypes

  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def to_peft(src: str, dst: str, *, overwrite: bool = False, dtype: str | None = None,
            base_model: str | None = None) -> str:
  """A LoRA run (workdir or step dir) -> a PEFT adapter folder on the original's modules."""
  from cogvlm_jax.convert.safetensors_io import write_safetensors

  t0 = time.perf_counter()
  step = ckpt.resolve_step_dir(src)
  _, spec, units, stored = run_lora(step)
  paths = [u.path(leaf) for u in units for leaf in ("a",) + tuple(f"b_{k}" for k in u.kernels)]
  tensors = lora_lib.to_peft_tensors(units, ckpt.restore_numpy(step, paths))
  if dtype is not None:
    tensors = {k: v.astype(_np_dtype(dtype)) for k, v in tensors.items()}
  with atomic_output_dir(dst, overwrite) as (_, out):
    os.makedirs(out)
    write_safetensors(os.path.join(out, lora_lib.ADAPTER_WEIGHTS), tensors,
                      metadata={"format": "pt"})
    with open(os.path.join(out, lora_lib.ADAPTER_CONFIG), "w") as f:
      json.dump(lora_lib.peft_config(spec, units, base_model), f, indent=2)
      f.write("\n")
  modules = sum(len(u.hf_modules) for u in units)
  return (f"to-peft: {modules} modules, {len(tensors)} tensors (rank {spec.rank}) in "
          f"{time.perf_counter() - t0:.1f}s -> {os.path.abspath(dst)}")


def read_peft_adapter(folder: str, cfg) -> tuple[lora_lib.LoraSpec, dict]:
  """A PEFT LoRA adapter folder -> (our spec, flat adapter arrays for `set_adapters`)."""
  from cogvlm_jax.convert.safetensors_io import SafetensorsFile

  with open(os.path.join(folder, lora_lib.ADAPTER_CONFIG)) as f:
    config = json.load(f)
  st = SafetensorsFile(os.path.join(folder, lora_lib.ADAPTER_WEIGHTS))
  try:
    tensors = {name: st.get(name) for name in st.names()}
  finally:
    st.close()
  spec = lora_lib.spec_from_peft(config, lora_lib.peft_module_names(tensors))
  return spec, lora_lib.from_peft_tensors(cfg, spec, tensors)


def from_peft(src: str, base: str, dst: str, *, overwrite: bool = False,
              dtype: str | None = None) -> str:
  """A PEFT LoRA adapter folder + its base (a cogvlm_jax weights checkpoint) -> a LoRA
  checkpoint: the base's parameters copied batch by batch, the adapters in our layout
  (float32, or `dtype`), config = the base's + train.lora = the adapter's settings."""
  t0 = time.perf_counter()
  step = ckpt.resolve_step_dir(base)
  ckpt.refuse_lora_run(step)
  cfg = ckpt.read_model_config(step)
  spec, adapters = read_peft_adapter(src, cfg)
  stored = ckpt.params_metadata(step)
  with atomic_output_dir(dst, overwrite) as (stage, out):
    writer = ckpt.ParamsWriter(stage)
    for batch in _batches(list(stored), stored):
      writer.add(ckpt.restore_numpy(step, batch))
    shapes = adapter_shapes(cfg, spec)  # PEFT's [in, r] -> e.g. [heads, dim, r]
    writer.add({p: v.reshape(shapes[p]).astype(_np_dtype(dtype) if dtype else v.dtype)
                for p, v in adapters.items()})
    config = ckpt.weights_config(cfg, ckpt.read_checkpoint_config(step).get("hf_config"))
    config["train"] = {"lora": spec.to_dict(), "init_from": os.path.abspath(base)}
    ckpt.write_step_dir(out, writer.finalize(), config)
  return (f"from-peft: {len(adapters)} adapters (rank {spec.rank}, alpha {spec.alpha:g}, "
          f"targets {', '.join(spec.targets)}) on {len(stored)} base parameters in "
          f"{time.perf_counter() - t0:.1f}s -> {os.path.abspath(dst)}")


def adapter_shapes(cfg, spec: lora_lib.LoraSpec) -> dict[tuple, tuple[int, ...]]:
  """Shape of every adapter variable of `spec` on the model of `cfg` (an abstract build)."""
  model = nnx.eval_shape(
      lambda: lora_lib.apply_lora(model_class(cfg)(cfg, rngs=nnx.Rngs(0)), spec))
  return {tuple(str(p) for p in path): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
