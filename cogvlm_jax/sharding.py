"""Device mesh, logical-axis rules, and the shardings they give parameters and activations.

Every parameter carries logical axis names (`("embed", "mlp")`); a rule table maps each name
to a mesh axis (or None = replicated along that dim). Changing the parallelism of a run means
changing the mesh shape or the rules, never the model code.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded,
ZeRO-3 style), ``tensor`` (Megatron-style tensor parallel over heads / MLP width / vocab).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None). Params shard their "embed"-like dim
# over fsdp and their head/MLP/vocab dim over tensor; activations shard batch over data+fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    # CogAgent's high-resolution tower. Its SwiGLU width int(1024 * 2.6667) = 2730 =
    # 2*3*5*7*13 divides no tensor size above 2, so it stays replicated over tensor (the
    # tower is 0.3 B parameters; its embed dim is still sharded over fsdp).
    ("cross_embed", "fsdp"),
    ("cross_heads", "tensor"),
    ("cross_mlp", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh; one size may be -1 (= fill the devices).

  Raises a ValueError that names the sizes when they do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {"data": 1, "fsdp": -1, "tensor": 1}
  if not isinstance(shape, Mapping):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Iterable[str | None],
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules")
    target = table[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def _mesh_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def spec_for_shape(name: str, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                   rules=DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of one array, checked: each sharded dim must divide evenly.

  A dim that does not divide would otherwise make XLA pad or fail deep inside compilation;
  we fail here with the parameter's name instead.
  """
  if len(axes) != len(shape):
    raise ValueError(f"{name}: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  spec = logical_to_spec(axes, rules)
  for dim, (size, entry, axis) in enumerate(zip(shape, spec, axes)):
    n = _mesh_size(mesh, entry)
    if size % n:
      raise ValueError(
          f"{name}: dim {dim} ({axis!r}, size {size}) is not divisible by mesh axes {entry} "
          f"(size {n}); change the mesh or the rule for {axis!r}")
  return spec


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every variable of an nnx State (same tree structure, raw leaves)."""

  def one(path, variable):
    name = "/".join(str(p) for p in path)
    axes = getattr(variable, "logical_axes", None)
    shape = variable.get_value().shape
    if axes is None:
      axes = (None,) * len(shape)
    return NamedSharding(mesh, spec_for_shape(name, shape, axes, mesh, rules))

  return jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- activation constraints ------------------------------------------------------------
_context = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Within this context, `constrain` pins activations to shardings on `mesh`."""
  previous = getattr(_context, "value", None)
  _context.value = None if mesh is None else (mesh, tuple(rules))
  try:
    yield
  finally:
    _context.value = previous


def current_activation_sharding() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) of the enclosing `activation_sharding` context, or None outside one.

  Lets code that must know the devices it runs on (the attention backend, shard_map'ped
  kernels) find them while being traced, when arrays carry no devices.
  """
  return getattr(_context, "value", None)


def mesh_platform(mesh: Mesh | None = None) -> str:
  """Platform ("cpu", "gpu", "tpu") of `mesh`, else of the `activation_sharding` mesh, else
  `jax.default_backend()`. A compile for TPU topology devices from a CPU host says "tpu"."""
  if mesh is None:
    ctx = current_activation_sharding()
    mesh = ctx[0] if ctx else None
  if mesh is None:
    return jax.default_backend()
  platform = mesh.devices.flat[0].platform.lower()
  # CUDA and ROCm devices report "cuda" / "rocm"; jax.default_backend() calls both "gpu".
  return "gpu" if platform in ("cuda", "rocm") else platform


def divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with every entry whose mesh size does not divide its dim replaced by None."""
  return PartitionSpec(*[e if shape[i] % _mesh_size(mesh, e) == 0 else None
                         for i, e in enumerate(spec)])


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`.

  Dims that do not divide their mesh axes are left unconstrained (e.g. a batch of 1 during
  decoding on a data-parallel mesh) rather than failing.
  """
  ctx = getattr(_context, "value", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = divisible_spec(x.shape, logical_to_spec(axes, rules), mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
