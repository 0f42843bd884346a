"""Tensor-by-tensor conversion: parameter groups, up-front checks, assembly and splitting.

Our parameters stack every layer on a leading axis, and a fused Hugging Face QKV tensor feeds
three of our parameters (q, k, v). A *group* is the smallest set of our parameters that can be
built from (or turned back into) whole Hugging Face tensors: e.g. all layers' q, k and v of the
vision expert, fed by `model.layers.*.self_attn.vision_expert_query_key_value.weight`.
Converting one group at a time bounds host memory by the largest group (one stacked
parameter, or the three of a fused QKV) plus one Hugging Face tensor, never the whole model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.mapping import Path, TensorRule, copy_into, tensor_rules

# Weights are converted in these dtypes; anything else must be cast explicitly (`dtype=`).
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the config: missing, unexpected or mis-shaped tensors."""


def is_float(dtype) -> bool:
  # ml_dtypes' bfloat16 is not a numpy floating subtype, so check it by name too.
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def path_name(path: Path) -> str:
  return "/".join(path)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Parameters converted together and the Hugging Face tensors (in HF order) that feed them."""

  paths: tuple[Path, ...]
  rules: tuple[TensorRule, ...]


def param_groups(cfg: CogVLMConfig) -> list[ParamGroup]:
  """Connected components of the bipartite graph rules <-> our parameter paths.

  Ordered by each group's first Hugging Face tensor, so conversion walks the checkpoint
  roughly in its own order (embeddings, decoder, vision, adapter, head).
  """
  rules = tensor_rules(cfg)
  parent: dict[Path, Path] = {}

  def find(p):
    while parent.setdefault(p, p) != p:
      parent[p] = parent[parent[p]]
      p = parent[p]
    return p

  for rule in rules:
    for p in rule.paths[1:]:
      parent[find(p)] = find(rule.paths[0])
    find(rule.paths[0])
  members: dict[Path, list[TensorRule]] = {}
  order: list[Path] = []
  for rule in rules:
    root = find(rule.paths[0])
    if root not in members:
      members[root] = []
      order.append(root)
    members[root].append(rule)
  groups = []
  for root in order:
    group_rules = members[root]
    paths = tuple(dict.fromkeys(p for r in group_rules for p in r.paths))
    groups.append(ParamGroup(paths, tuple(group_rules)))
  return groups


def batch_groups(groups: Sequence[ParamGroup], nbytes: Callable[[ParamGroup], int],
                 budget: int | None = None) -> list[list[ParamGroup]]:
  """Consecutive groups batched up to `budget` bytes (default: the largest group, min 64 MiB).

  Batching small groups saves per-call overhead (one Orbax write or read per batch) without
  raising the peak, which the largest group sets anyway.
  """
  sizes = [nbytes(g) for g in groups]
  budget = budget if budget is not None else max([64 << 20] + sizes)
  batches: list[list[ParamGroup]] = []
  total = 0
  for g, size in zip(groups, sizes):
    if batches and total + size <= budget:
      batches[-1].append(g)
      total += size
    else:
      batches.append([g])
      total = size
  return batches


# ---- checks before anything is read or written ----------------------------------------


def resolve_dtype(name: str, dtype: np.dtype, cast, where: str) -> np.dtype:
  """The dtype tensor `name` will be converted in, or a ValueError naming it."""
  dtype = np.dtype(dtype)
  if not is_float(dtype):
    raise ValueError(f"tensor {name} ({where}) has dtype {dtype.name}; weights must be "
                     f"floating point ({', '.join(SUPPORTED_DTYPES)})")
  if cast is not None:
    return np.dtype(cast)
  if dtype.name not in SUPPORTED_DTYPES:
    raise ValueError(f"tensor {name} ({where}) has dtype {dtype.name}, which is not converted "
                     f"as is; pick one of {', '.join(SUPPORTED_DTYPES)} with --dtype")
  return dtype


def check_hf_source(cfg: CogVLMConfig, source, dtype=None) -> dict[str, np.dtype]:
  """Checks names, shapes and dtypes of all tensors against `cfg` from headers only.

  Returns the dtype each tensor will be converted in. Raises CheckpointMismatch (names,
  shapes) or ValueError (dtypes) naming the tensors, their files, and what was expected.
  """
  rules = tensor_rules(cfg)
  names = set(source.names())
  expected = {r.hf_name for r in rules}
  missing = sorted(expected - names, key=_natural)
  unexpected = sorted(names - expected, key=_natural)
  if missing or unexpected:
    hint = ""
    if unexpected:
      hint = f" (e.g. {unexpected[0]} in {source.file_of(unexpected[0])})"
    raise CheckpointMismatch(
        f"checkpoint does not match the {cfg.variant} config: missing {len(missing)} tensors "
        f"{missing[:8]}, unexpected {len(unexpected)} tensors {unexpected[:8]}{hint}; does "
        f"config.json (num_hidden_layers={cfg.num_hidden_layers}, vision "
        f"num_hidden_layers={cfg.vision.num_hidden_layers}) belong to these weights?")
  bad = []
  for rule in rules:
    shape = tuple(source.shape(rule.hf_name))
    if shape != rule.hf_shape:
      bad.append(f"{rule.hf_name} has shape {shape}, expected {rule.hf_shape} for this config "
                 f"({source.file_of(rule.hf_name)})")
  if len(bad) == 1:
    raise CheckpointMismatch(f"tensor {bad[0]}")
  if bad:
    raise CheckpointMismatch(f"{len(bad)} tensors do not fit the config (does config.json "
                             f"belong to these weights?): " + "; ".join(bad[:4]))
  return {r.hf_name: resolve_dtype(r.hf_name, source.dtype(r.hf_name), dtype,
                                   source.file_of(r.hf_name)) for r in rules}


def check_params(cfg: CogVLMConfig, stored: Mapping[Path, tuple[tuple, np.dtype]],
                 expected: Mapping[Path, tuple], where: str) -> None:
  """Our stored parameters (path -> (shape, dtype)) against the model's (path -> shape)."""
  missing = sorted(path_name(p) for p in set(expected) - set(stored))
  unexpected = sorted(path_name(p) for p in set(stored) - set(expected))
  if missing or unexpected:
    raise CheckpointMismatch(
        f"{where} does not match its {cfg.variant} config: missing {len(missing)} parameters "
        f"{missing[:8]}, unexpected {len(unexpected)} parameters {unexpected[:8]}")
  bad = [f"{path_name(p)} has shape {tuple(stored[p][0])}, expected {tuple(expected[p])}"
         for p in sorted(expected) if tuple(stored[p][0]) != tuple(expected[p])]
  if bad:
    raise CheckpointMismatch(f"{where}: {len(bad)} parameters do not fit its config: "
                             + "; ".join(bad[:4]))
  for p in sorted(stored):
    if not is_float(stored[p][1]):
      raise ValueError(f"{where}: parameter {path_name(p)} has dtype {np.dtype(stored[p][1])}; "
                       f"weights must be floating point")


def _natural(name: str):
  """Sort key that orders layers.10 after layers.9."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---- conversion ------------------------------------------------------------------------


def cast(array: np.ndarray, dtype) -> np.ndarray:
  if dtype is None or array.dtype == np.dtype(dtype):
    return array
  return array.astype(dtype)


class Arena:
  """One reusable block of host memory that hands out arrays; `reset()` frees them all.

  A fresh allocation costs a page fault per page on first touch (on a VM about as much as
  the copy itself), and converting group after group through fresh allocations would pay
  that for every byte of the model. The arena is allocated once, sized for the largest
  batch, and reused. Arrays are carved from the front (`empty`); one scratch buffer, e.g.
  for the tensor being read, from the back (`scratch`). A request that does not fit falls
  back to a fresh allocation.
  """

  def __init__(self, nbytes: int = 0):
    self._buf = np.empty(int(nbytes), np.uint8) if nbytes else None
    self._size = self._buf.size if self._buf is not None else 0
    self._front = 0  # end of the arrays handed out by `empty`
    self._back = self._size  # start of the scratch buffer

  def empty(self, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    start = -(-self._front // 64) * 64  # 64-byte aligned
    if self._buf is None or start + nbytes > self._back or nbytes == 0:
      return np.empty(shape, dtype)
    self._front = start + nbytes
    return self._buf[start:start + nbytes].view(dtype).reshape(shape)

  def scratch(self, nbytes: int) -> np.ndarray:
    """A uint8 buffer of `nbytes` at the back, replacing the previous scratch buffer."""
    nbytes = int(nbytes)
    start = (self._size - nbytes) // 64 * 64
    if self._buf is None or start < self._front:
      self._back = self._size
      return np.empty(nbytes, np.uint8)
    self._back = start
    return self._buf[start:start + nbytes]

  def reset(self) -> None:
    self._front = 0
    self._back = self._size


def assemble_group(group: ParamGroup, source, shapes: Mapping[Path, tuple],
                   dtypes: Mapping[str, np.dtype] | None = None,
                   on_tensor: Callable[[str, int], None] | None = None,
                   alloc=np.empty, scratch: Arena | None = None) -> dict[Path, np.ndarray]:
  """Reads the group's Hugging Face tensors one at a time and builds our parameters.

  shapes: our parameter shapes (stacked: [layers, ...]); dtypes: the dtype to convert each
  HF tensor in (from `check_hf_source`; default: as stored); alloc: allocates the
  parameters; scratch: an Arena whose scratch buffer each tensor is read into (sources with
  `supports_out`). Peak memory is the group's parameters plus one Hugging Face tensor.
  """
  out: dict[Path, np.ndarray] = {}
  first: dict[Path, str] = {}
  for rule in group.rules:
    if scratch is not None and getattr(source, "supports_out", False):
      tensor = source.get(rule.hf_name, out=scratch.scratch(source.nbytes(rule.hf_name)))
    else:
      tensor = np.asarray(source.get(rule.hf_name))
    if tuple(tensor.shape) != rule.hf_shape:
      raise CheckpointMismatch(f"tensor {rule.hf_name} has shape {tuple(tensor.shape)}, "
                               f"expected {rule.hf_shape} for this config")
    if dtypes is not None:
      tensor = cast(tensor, dtypes[rule.hf_name])
    for path, part in zip(rule.paths, rule.to_ours(tensor)):
      array = out.get(path)
      if array is None:
        array = out[path] = alloc(shapes[path], part.dtype)
        first[path] = rule.hf_name
      elif array.dtype != part.dtype:
        raise CheckpointMismatch(
            f"tensor {rule.hf_name} has dtype {part.dtype} but {first[path]} has "
            f"{array.dtype}; both go into parameter {path_name(path)} (pass a dtype to cast)")
      copy_into(array if rule.layer is None else array[rule.layer], part)
    if on_tensor is not None:
      on_tensor(rule.hf_name, tensor.nbytes)
    del tensor
  return out


def split_group(group: ParamGroup, arrays: Mapping[Path, np.ndarray], dtype=None,
                scratch: Arena | None = None) -> Iterator[tuple[TensorRule, np.ndarray]]:
  """Our parameters of a group -> its Hugging Face tensors (contiguous, HF order).

  With `scratch`, each tensor is built in that reused buffer: it is only valid until the
  next one is yielded (write it out first).
  """
  for rule in group.rules:
    pieces = [np.asarray(arrays[p]) if rule.layer is None else np.asarray(arrays[p])[rule.layer]
              for p in rule.paths]
    if scratch is not None:
      scratch.reset()
    tensor = rule.to_hf(pieces, alloc=scratch.empty if scratch is not None else np.empty)
    tensor = np.ascontiguousarray(cast(tensor, dtype))
    if tuple(tensor.shape) != rule.hf_shape:
      raise CheckpointMismatch(f"parameters {[path_name(p) for p in rule.paths]} give "
                               f"{rule.hf_name} shape {tuple(tensor.shape)}, expected "
                               f"{rule.hf_shape}")
    yield rule, tensor


def hf_output_dtype(rule: TensorRule, stored: Mapping[Path, np.dtype], dtype=None) -> np.dtype:
  """The dtype `split_group` gives `rule`'s tensor: `dtype`, else that of its parameters."""
  if dtype is not None:
    return np.dtype(dtype)
  return np.result_type(*[np.dtype(stored[p]) for p in rule.paths])


def group_nbytes(group: ParamGroup, shapes: Mapping[Path, tuple],
                 dtypes: Mapping[Path, np.dtype] | Callable[[Path], np.dtype]) -> int:
  get = dtypes if callable(dtypes) else dtypes.__getitem__
  return sum(int(np.prod(shapes[p], dtype=np.int64)) * np.dtype(get(p)).itemsize
             for p in group.paths)


def iter_rules(groups: Iterable[ParamGroup]) -> Iterator[TensorRule]:
  for g in groups:
    yield from g.rules
