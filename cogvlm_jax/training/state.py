"""Train state: which parameters train (recipes), the optimizer, shardings, creation.

The model's variables are split once, by the recipe's filter, into

* ``params``  — the trainable `nnx.Param`s: differentiated, updated, with optimizer state;
* ``frozen``  — everything else (frozen params and non-param buffers such as RoPE
  ``inv_freq``): passed through the step untouched, no optimizer state.

Both are kept as plain nested dicts of arrays (`nnx.to_pure_dict`), which optax, Orbax and
`jax.jit` shardings all take as they are; `nnx.merge(graphdef, params, frozen)` rebuilds the
model inside the step.

Recipes:
  full    every parameter trains.
  stage1  CogVLM's first pretraining stage: only the visual experts of the decoder
          (`vision_expert_query_key_value`, `vision_expert_dense`, `vision_mlp` in every layer)
          and the adapter (GLU + boi/eoi) train; the language model and the ViT are frozen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM
from cogvlm_jax.sharding import DEFAULT_RULES, state_shardings

RECIPES = ("full", "stage1")


# ---- recipes ---------------------------------------------------------------------------


def _names(path) -> list[str]:
  return [str(p) for p in path]


def is_visual_expert(path) -> bool:
  """Decoder-layer weights of the visual expert (attention QKV/dense and the MLP)."""
  names = _names(path)
  return bool(names) and names[0] == "layers" and any(
      n.startswith("vision_expert_") or n == "vision_mlp" for n in names)


def is_adapter(path) -> bool:
  names = _names(path)
  return bool(names) and names[0] == "adapter"


def trainable_filter(recipe: str):
  """The nnx filter selecting the trainable parameters of `recipe`."""
  if recipe == "full":
    return nnx.Param
  if recipe == "stage1":
    return nnx.All(nnx.Param, lambda path, _: is_visual_expert(path) or is_adapter(path))
  raise ValueError(f"unknown recipe {recipe!r}; known: {RECIPES}")


# ---- optimizer -------------------------------------------------------------------------


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, cosine decay to `lr * end_lr_ratio` at `total_steps`."""
  warmup = int(optim["warmup_steps"])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(optim["lr"]), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=float(optim["lr"]) * float(optim.get("end_lr_ratio", 0.0)))


def decay_mask(abstract_params: nnx.State) -> dict:
  """True for matrices (weight decay), False for vectors: norms, biases, boi/eoi, CLS.

  Ranks are counted without the stacked "layers" axis.
  """

  def one(variable):
    axes = getattr(variable, "logical_axes", None) or ()
    rank = len(variable.get_value().shape) - (1 if axes[:1] == ("layers",) else 0)
    return rank >= 2

  mask = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(mask)


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule,
                   mask: Any) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule), weight decay on matrices only."""
  return optax.chain(
      optax.clip_by_global_norm(float(optim["clip_norm"])),
      optax.adamw(schedule, b1=float(optim["b1"]), b2=float(optim["b2"]),
                  eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]),
                  mask=mask),
  )


# ---- the state -------------------------------------------------------------------------


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; jit-able, checkpointable)."""

  step: jax.Array  # int32 []
  params: dict  # trainable params (nested dict of arrays)
  frozen: dict  # frozen params and buffers
  opt_state: Any  # optax state of `params` only
  rng: jax.Array  # raw key data (uint32 [2] for threefry); per-step keys: fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The static side of training: model structure, optimizer, shapes and shardings."""

  model_config: CogVLMConfig
  recipe: str
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: Mesh
  rules: tuple
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings, same structure
  param_filter: Any

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def num_params(self) -> tuple[int, int]:
    """(trainable, total) parameter counts (buffers excluded)."""
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract.params))
    frozen = sum(math.prod(x.shape) for path, x in
                 jax.tree_util.tree_leaves_with_path(self.abstract.frozen)
                 if not any(getattr(k, "key", None) == "inv_freq" for k in path))
    return trainable, trainable + frozen


def build_setup(model_config: CogVLMConfig, recipe: str, optim: Mapping[str, Any],
                total_steps: int, mesh: Mesh, rules=DEFAULT_RULES, seed: int = 0) -> TrainSetup:
  """Splits the (abstract) model by recipe and derives the optimizer and all shardings."""
  model_config.validate()
  param_filter = trainable_filter(recipe)
  model = nnx.eval_shape(lambda: CogVLMForCausalLM(model_config, rngs=nnx.Rngs(seed)))
  graphdef, params, frozen = nnx.split(model, param_filter, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"recipe {recipe!r} selects no trainable parameters")
  schedule = make_schedule(optim, total_steps)
  tx = make_optimizer(optim, schedule, decay_mask(params))

  params_abs, frozen_abs = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  param_sh = nnx.to_pure_dict(state_shardings(params, mesh, rules))
  frozen_sh = nnx.to_pure_dict(state_shardings(frozen, mesh, rules))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_abs = jax.eval_shape(tx.init, params_abs)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt_abs, param_sh, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs,
                        frozen=frozen_abs, opt_state=opt_abs,
                        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
  shardings = TrainState(step=replicated, params=param_sh, frozen=frozen_sh, opt_state=opt_sh,
                         rng=replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return TrainSetup(model_config, recipe, graphdef, tx, schedule, mesh, tuple(rules), abstract,
                    shardings, param_filter)


def init_train_state(setup: TrainSetup, seed: int) -> TrainState:
  """A fresh state: random init, each array created directly with its sharding."""
  cfg, param_filter, tx = setup.model_config, setup.param_filter, setup.tx

  def init():
    model = CogVLMForCausalLM(cfg, rngs=nnx.Rngs(seed))
    _, params, frozen = nnx.split(model, param_filter, ...)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=nnx.to_pure_dict(frozen), opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  # The init program runs once: on CPU, compiling it without XLA's backend optimisations
  # cuts its compile time ~4x (dozens of inlined RNGs), which matters for small runs.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  lowered = jax.jit(init, out_shardings=setup.shardings).lower()
  return lowered.compile(compiler_options=options)()


def merge_dicts(a: Mapping, b: Mapping) -> dict:
  """Deep union of two nested dicts with disjoint leaves (params + frozen -> all weights)."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if not (isinstance(out[k], Mapping) and isinstance(v, Mapping)):
        raise ValueError(f"key {k!r} is a leaf in both trees")
      out[k] = merge_dicts(out[k], v)
    else:
      out[k] = v
  return out


def split_dict(full: Mapping, like: Mapping) -> tuple[dict, dict]:
  """Inverse of `merge_dicts`: (the part of `full` shaped like `like`, the rest)."""
  taken, rest = {}, {}
  for k, v in full.items():
    if k in like and isinstance(v, Mapping) and isinstance(like[k], Mapping):
      t, r = split_dict(v, like[k])
      if t:
        taken[k] = t
      if r:
        rest[k] = r
    elif k in like:
      taken[k] = v
    else:
      rest[k] = v
  return taken, rest


def all_weights(state: TrainState) -> dict:
  """Every model variable (trainable and frozen) as one nested dict: the checkpoint layout."""
  return merge_dicts(state.params, state.frozen)


def model_from_state(setup: TrainSetup, state: TrainState) -> CogVLMForCausalLM:
  """An nnx model sharing the state's arrays (for evaluation and generation)."""
  return nnx.merge(setup.graphdef, state.params, state.frozen)
