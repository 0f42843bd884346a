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
  stage2  the second pretraining stage: same trainable set as stage1 (the data mix and the
          224 -> 490 resolution switch are the config's business, see configs/cogvlm_stage2.py).
  sft     supervised fine-tuning: every parameter trains, the ViT at `optim.vit_lr_scale`
          (default 0.1) times the learning rate.
  cogagent  CogAgent's recipe (arXiv 2312.08914): the language model, the low-res ViT and its
          adapter are frozen; the high-resolution cross module (the EVA2-CLIP-L tower and every
          layer's cross-attention with its norm) and the visual experts train. The tower's
          stored-but-never-run norm and head stay frozen; its never-run last block is in the
          stacked block arrays, so it trains in name only: zero gradients, weight decay alone
          moves it.

Frozen parameters get no optimizer state and no weight gradients, and can be held in another
dtype than the trainable ones (`frozen_dtype`, e.g. bf16 with fp32 master weights for the
trainable ones).

LoRA (`lora`, a `modeling.lora.LoraSpec`): adapters are attached to the model
(`apply_lora`) and only they train (`nnx.LoRAParam`); every base weight is frozen. The recipe
then only sets learning-rate multipliers ("sft": ViT adapters at `optim.vit_lr_scale`).
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
from cogvlm_jax.modeling import lora as lora_lib
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM
from cogvlm_jax.modeling.models import model_class
from cogvlm_jax.sharding import DEFAULT_RULES, state_shardings

RECIPES = ("full", "stage1", "stage2", "sft", "cogagent")


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


def is_vit(path) -> bool:
  names = _names(path)
  return bool(names) and names[0] == "vision"


# CogAgent's tower parameters that are stored and exported but never computed.
_UNUSED_CROSS = ("norm", "head", "head_bias")


def is_cross_module(path) -> bool:
  """CogAgent's high-resolution cross module: the EVA2-CLIP-L tower (without its unused norm
  and head) and each decoder layer's cross-attention and post_cross_attention_layernorm."""
  names = _names(path)
  if names[:1] == ["cross_vision"]:
    return len(names) > 1 and names[1] not in _UNUSED_CROSS
  return names[:1] == ["layers"] and any(
      n in ("cross_attn", "post_cross_attention_layernorm") for n in names)


def trainable_filter(recipe: str, lora: lora_lib.LoraSpec | None = None):
  """The nnx filter selecting the trainable parameters of `recipe` (with LoRA: the adapters)."""
  if lora is not None:
    if recipe not in ("full", "sft"):
      raise ValueError(f"recipe {recipe!r} freezes modules itself; LoRA runs use recipe 'full' "
                       f"or 'sft' (train.lora.targets chooses what adapts)")
    return nnx.LoRAParam
  if recipe in ("full", "sft"):
    return nnx.Param
  if recipe in ("stage1", "stage2"):
    return nnx.All(nnx.Param, lambda path, _: is_visual_expert(path) or is_adapter(path))
  if recipe == "cogagent":
    return nnx.All(nnx.Param, lambda path, _: is_visual_expert(path) or is_cross_module(path))
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


def lr_scales(recipe: str, optim: Mapping[str, Any], abstract_params: dict) -> dict | None:
  """Per-parameter learning-rate multipliers of `recipe` (None: all 1)."""
  if recipe != "sft":
    return None
  vit = float(optim.get("vit_lr_scale", 0.1))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: vit if is_vit([getattr(k, "key", k) for k in path]) else 1.0,
      abstract_params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by the float at its place in `scales` (a per-leaf lr multiplier:
  applied after AdamW, it scales the whole step, weight decay included)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype), updates,
                        scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule,
                   mask: Any, scales: Any = None) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule), weight decay on matrices only (-> per-parameter
  lr multipliers)."""
  parts = [
      optax.clip_by_global_norm(float(optim["clip_norm"])),
      optax.adamw(schedule, b1=float(optim["b1"]), b2=float(optim["b2"]),
                  eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]),
                  mask=mask),
  ]
  if scales is not None:
    parts.append(scale_by_tree(scales))
  return optax.chain(*parts)


# ---- the state -------------------------------------------------------------------------


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; jit-able, checkpointable)."""

  step: jax.Array  # int32 []
  params: dict  # trainable params (nested dict of arrays)
  frozen: dict  # frozen params and buffers
  opt_state: Any  # optax state of `params` only
  rng: jax.Array  # raw key data (uint32 [2] for threefry); per-step keys: fold_in(rng, step)


# Frozen leaves that are not model parameters: RoPE tables (the LM's inv_freq, CogAgent's
# 2D-RoPE freqs_cos / freqs_sin), layer indices, QLoRA's scales.
_NOT_PARAMETERS = ("inv_freq", "freqs_cos", "freqs_sin", "layer_index", "qscale")


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
  frozen_dtype: Any = None
  lora: lora_lib.LoraSpec | None = None

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def num_params(self) -> tuple[int, int]:
    """(trainable, total) parameter counts (buffers excluded)."""
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract.params))
    frozen = sum(math.prod(x.shape) for path, x in
                 jax.tree_util.tree_leaves_with_path(self.abstract.frozen)
                 if not any(getattr(k, "key", None) in _NOT_PARAMETERS for k in path))
    return trainable, trainable + frozen


def cast_frozen(frozen: dict, dtype) -> dict:
  """Floating frozen weights to `dtype` (None: unchanged); RoPE `inv_freq` buffers and
  QLoRA's float32 `qscale`s stay."""
  if dtype is None:
    return frozen

  def one(path, x):
    if any(getattr(k, "key", None) in ("inv_freq", "qscale") for k in path):
      return x
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree_util.tree_map_with_path(one, frozen)


def make_model(cfg: CogVLMConfig, seed: int, lora: lora_lib.LoraSpec | None = None):
  """The randomly initialised model of a run, with fresh LoRA adapters when `lora` is set
  (and its base kernels quantized when `lora.base_dtype` is: QLoRA, modeling/quantize.py)."""
  model = model_class(cfg)(cfg, rngs=nnx.Rngs(seed))  # CogAgent for a 'cogagent' config
  if lora is None:
    return model
  model = lora_lib.apply_lora(model, lora, seed)
  return lora_lib.quantize_base(model, lora.base_dtype) if lora.base_dtype else model


def build_setup(model_config: CogVLMConfig, recipe: str, optim: Mapping[str, Any],
                total_steps: int, mesh: Mesh, rules=DEFAULT_RULES, seed: int = 0,
                frozen_dtype=None, lora=None) -> TrainSetup:
  """Splits the (abstract) model by recipe and derives the optimizer and all shardings.

  frozen_dtype: dtype the frozen weights are held in (e.g. "bfloat16"); None = the model's
  param_dtype, like the trainable ones. lora: `train.lora` (a dict or `LoraSpec`) or None.
  """
  model_config.validate()
  if recipe == "cogagent" and not model_config.is_cogagent:
    raise ValueError(f"recipe 'cogagent' trains CogAgent's cross module; the model is "
                     f"variant {model_config.variant!r}")
  if lora is not None and not isinstance(lora, lora_lib.LoraSpec):
    lora = lora_lib.LoraSpec.from_dict(lora)
  param_filter = trainable_filter(recipe, lora)
  model = nnx.eval_shape(lambda: make_model(model_config, seed, lora))
  graphdef, params, frozen = nnx.split(model, param_filter, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"recipe {recipe!r} selects no trainable parameters")
  schedule = make_schedule(optim, total_steps)
  params_abs, frozen_abs = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  frozen_dtype = None if frozen_dtype in (None, "") else jnp.dtype(frozen_dtype)
  frozen_abs = cast_frozen(frozen_abs, frozen_dtype)
  tx = make_optimizer(optim, schedule, decay_mask(params), lr_scales(recipe, optim, params_abs))

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
                    shardings, param_filter, frozen_dtype, lora)


def init_train_state(setup: TrainSetup, seed: int) -> TrainState:
  """A fresh state: random init, each array created directly with its sharding."""
  cfg, param_filter, tx = setup.model_config, setup.param_filter, setup.tx

  def init():
    model = make_model(cfg, seed, setup.lora)
    _, params, frozen = nnx.split(model, param_filter, ...)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=cast_frozen(nnx.to_pure_dict(frozen), setup.frozen_dtype),
                      opt_state=tx.init(params),
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
