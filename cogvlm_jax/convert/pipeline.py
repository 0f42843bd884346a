"""The two conversions behind `python -m cogvlm_jax.convert`: to-jax and to-hf.

Both stream: they work one parameter group at a time (`stream.param_groups`: one stacked
weight, or q/k/v of one fused projection), so host memory stays near the largest group plus
one Hugging Face tensor, whatever the model size (to-hf adds one parameter while Orbax
restores it, since Orbax reads into a buffer and copies out; `.bin` input adds the one
memory-mapped shard that is open). Measured by `benchmarks/convert_memory.py`. Both check everything that can be checked
from headers and metadata (names, shapes, dtypes, config) before writing anything, write into
a temporary folder next to the destination, and rename it into place only when complete.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import time

import numpy as np
from flax import nnx

from cogvlm_jax import checkpoint as ckpt
from cogvlm_jax.fileio import atomic_output_dir
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.safetensors_io import ShardedSafetensorsWriter, parse_size
from cogvlm_jax.convert.sources import is_weight_file, open_hf_checkpoint, read_hf_config
from cogvlm_jax.convert.stream import (Arena, assemble_group, batch_groups, check_hf_source,
                                       check_params, group_nbytes, hf_output_dtype,
                                       param_groups, split_group)

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
SMALL_RESTORE = 64 << 20  # bytes; batches of groups up to this size are restored in one call


def _check_src_dst(src: str, dst: str) -> None:
  s, d = os.path.realpath(src), os.path.realpath(dst)
  if s == d or s.startswith(d + os.sep) or d.startswith(s + os.sep):
    raise ValueError(f"destination {dst} must not be, contain, or be inside the source {src}")


_LIBC = None


def release_memory() -> None:
  """Returns freed heap pages to the OS (glibc keeps large freed blocks otherwise).

  Without this, the resident set after converting group k stays at the high-water mark of
  groups 1..k even though the arrays are gone, which is what a memory limit sees.
  """
  global _LIBC
  try:
    if _LIBC is None:
      _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim(0)
  except (OSError, AttributeError):
    pass


# ---- progress and summary --------------------------------------------------------------


class Progress:
  """A tqdm bar over bytes, with the tensor count as postfix."""

  def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool):
    self.total_tensors = total_tensors
    self.tensors = 0
    self.bytes = 0
    self._bar = None
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=desc, dynamic_ncols=True)

  def update(self, nbytes: int, tensors: int = 1) -> None:
    self.tensors += tensors
    self.bytes += nbytes
    if self._bar is not None:
      self._bar.update(nbytes)
      self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


@dataclasses.dataclass
class Summary:
  direction: str
  dst: str
  tensors: int
  parameters: int
  bytes: int
  seconds: float
  shards: int = 0

  def line(self) -> str:
    mb = self.bytes / 1e6
    shards = (f" in {self.shards} shard{'s' if self.shards > 1 else ''}" if self.shards
              else "")
    return (f"{self.direction}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{mb:,.1f} MB{shards} in {self.seconds:.1f}s ({mb / max(self.seconds, 1e-9):,.1f} "
            f"MB/s) -> {self.dst}")


def _is_buffer(hf_name: str) -> bool:
  return hf_name.endswith("rotary_emb.inv_freq")


# ---- Hugging Face -> cogvlm_jax ---------------------------------------------------------


def hf_model_config(src: str, hf_config: dict) -> CogVLMConfig:
  if "vision_config" not in hf_config:
    raise ValueError(f"{src}/config.json has no 'vision_config': not a CogVLM/CogVLM2 "
                     f"checkpoint")
  try:
    return CogVLMConfig.from_hf_dict(hf_config)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{src}/config.json cannot describe a model: {e}") from e


def to_jax(src: str, dst: str, *, overwrite: bool = False, dtype: str | None = None,
           progress: bool = True) -> Summary:
  """Hugging Face folder (safetensors or .bin) -> cogvlm_jax weights checkpoint at `dst`."""
  from cogvlm_jax.modeling.models import abstract_model

  t0 = time.perf_counter()
  if not os.path.isdir(src):
    raise FileNotFoundError(f"source folder {src} does not exist")
  _check_src_dst(src, dst)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"destination {dst} already exists; pass --overwrite to replace it")
  hf_config = read_hf_config(src)
  cfg = hf_model_config(src, hf_config)
  source = open_hf_checkpoint(src)
  try:
    dtypes = check_hf_source(cfg, source, dtype)
    cfg = cfg.replace(param_dtype=dtypes["model.embed_tokens.weight"].name)
    _, abstract = abstract_model(cfg)
    shapes = {p: a.shape for p, a in ckpt.flatten(nnx.to_pure_dict(abstract)).items()}
    groups = param_groups(cfg)
    # Our parameter dtype = that of the (first) Hugging Face tensor feeding it.
    path_dtype = {}
    for g in groups:
      for r in g.rules:
        for p in r.paths:
          path_dtype.setdefault(p, dtypes[r.hf_name])
    total = sum(int(np.prod(r.hf_shape, dtype=np.int64)) * dtypes[r.hf_name].itemsize
                for g in groups for r in g.rules)
    n_tensors = sum(len(g.rules) for g in groups)
    batches = batch_groups(groups, lambda g: group_nbytes(g, shapes, path_dtype))
    # One reused buffer bounds (and pre-faults) the host memory the conversion needs: a
    # batch of our parameters at the front, the Hugging Face tensor being read at the back.
    arena = Arena(max(sum(group_nbytes(g, shapes, path_dtype) for g in b)
                      + max(source.nbytes(r.hf_name) for g in b for r in g.rules)
                      + 64 * (len(shapes) + 2) for b in batches))
    bar = Progress("to-jax", total, n_tensors, progress)
    parameters = 0
    try:
      with atomic_output_dir(dst, overwrite) as (stage, out):
        writer = ckpt.ParamsWriter(stage)
        for batch in batches:
          arrays = {}
          for group in batch:
            arrays.update(assemble_group(group, source, shapes, dtypes,
                                         on_tensor=lambda name, n: bar.update(n),
                                         alloc=arena.empty, scratch=arena))
            parameters += sum(int(np.prod(r.hf_shape)) for r in group.rules
                              if not _is_buffer(r.hf_name))
          writer.add(arrays)  # written to disk when it returns: the arena can be reused
          del arrays
          arena.reset()
        del arena
        release_memory()
        ckpt.write_step_dir(out, writer.finalize(), ckpt.weights_config(cfg, hf_config))
        ckpt.copy_hf_files(src, os.path.join(out, ckpt.HF_FILES_DIR), is_weight_file)
    finally:
      bar.close()
  finally:
    source.close()
  return Summary("to-jax", os.path.abspath(dst), n_tensors, parameters, total,
                 time.perf_counter() - t0)


# ---- cogvlm_jax -> Hugging Face ---------------------------------------------------------


def _hf_config_for(cfg: CogVLMConfig, stored: dict | None, torch_dtype: str) -> dict:
  """config.json for the export: the original one when we have it, else built from cfg."""
  if stored is None:
    return cfg.to_hf_dict(torch_dtype=torch_dtype)
  hf = json.loads(json.dumps(stored))
  again = CogVLMConfig.from_hf_dict(hf, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
  arch = ("variant", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "vision")
  diff = [k for k in arch if getattr(again, k) != getattr(cfg, k)]
  if diff:
    raise ValueError(f"the stored Hugging Face config.json disagrees with the model config on "
                     f"{diff}")
  if "torch_dtype" in hf:  # unchanged unless the weights were cast
    hf["torch_dtype"] = torch_dtype
  return hf


def to_hf(src: str, dst: str, *, overwrite: bool = False, dtype: str | None = None,
          max_shard_size: str | int = "5GB", progress: bool = True) -> Summary:
  """cogvlm_jax checkpoint (to-jax output, training step or workdir) -> Hugging Face folder."""
  from cogvlm_jax.modeling.models import abstract_model

  t0 = time.perf_counter()
  max_bytes = parse_size(max_shard_size)
  step = ckpt.resolve_step_dir(src)
  ckpt.refuse_lora_run(step)
  _check_src_dst(step, dst)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"destination {dst} already exists; pass --overwrite to replace it")
  config = ckpt.read_checkpoint_config(step)
  cfg = ckpt.read_model_config(step)
  _, abstract = abstract_model(cfg)
  expected = {p: a.shape for p, a in ckpt.flatten(nnx.to_pure_dict(abstract)).items()}
  stored = ckpt.params_metadata(step)
  check_params(cfg, stored, expected, step)
  stored_dtype = {p: d for p, (_, d) in stored.items()}
  if dtype is None:
    for p, d in stored_dtype.items():
      if d.name not in DTYPE_CHOICES:
        raise ValueError(f"{step}: parameter {'/'.join(p)} has dtype {d.name}; pick an output "
                         f"dtype with --dtype ({', '.join(DTYPE_CHOICES)})")
  groups = param_groups(cfg)
  plan = [(r.hf_name, r.hf_shape, hf_output_dtype(r, stored_dtype, dtype))
          for g in groups for r in g.rules]
  total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in plan)
  embed_dtype = dict((n, d) for n, _, d in plan)["model.embed_tokens.weight"]
  hf_config = _hf_config_for(cfg, config.get("hf_config"), np.dtype(embed_dtype).name)
  # Each exported tensor is built in one reused buffer (written out before the next).
  scratch = Arena(max(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                      for _, s, d in plan) + 64)
  bar = Progress("to-hf", total, len(plan), progress)
  parameters = 0
  try:
    with atomic_output_dir(dst, overwrite) as (stage, out):
      os.makedirs(out)
      writer = ShardedSafetensorsWriter(out, plan, max_bytes)
      try:
        for batch in batch_groups(groups, lambda g: group_nbytes(g, expected, stored_dtype)):
          # Orbax reads an array into a buffer and then copies it out, so a large group is
          # restored one parameter at a time (transient: one parameter, not the group);
          # a batch of small groups in one call.
          paths = [p for group in batch for p in group.paths]
          if sum(group_nbytes(g, expected, stored_dtype) for g in batch) <= SMALL_RESTORE:
            arrays = ckpt.restore_numpy(step, paths)
          else:
            arrays = {}
            for p in paths:
              arrays.update(ckpt.restore_numpy(step, [p]))
          for group in batch:
            for rule, tensor in split_group(group, arrays, dtype, scratch):
              writer.write(rule.hf_name, tensor)
              bar.update(tensor.nbytes)
              if not _is_buffer(rule.hf_name):
                parameters += tensor.size
              del tensor
          del arrays
          release_memory()
        writer.close()
      finally:
        writer.abort()
      with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
        f.write("\n")
      extra = os.path.join(step, ckpt.HF_FILES_DIR)
      if os.path.isdir(extra):
        ckpt.copy_hf_files(extra, out, lambda n: n == "config.json")
  finally:
    bar.close()
  return Summary("to-hf", os.path.abspath(dst), len(plan), parameters, total,
                 time.perf_counter() - t0, shards=len(writer.shards))
