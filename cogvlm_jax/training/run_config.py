"""A train.py config, checked once, and what it resolves to: model, mesh, rules, phases.

Every field and its default is in configs/base.py. `resolve_config(config)` is the only
place a run config is validated: it refuses unknown and missing fields, numbers out of range
and settings that cannot work together, each with a one-line `ConfigError` naming the field,
before any data is read or anything is compiled.

Phases: CogVLM stage 2 changes the image size mid-run (`train.resolution_switch`); the run is
then two `Phase`s with their own model config, sequence length and microbatches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data.mixture import MixtureError, check_spec
from cogvlm_jax.sharding import DEFAULT_RULES, MESH_AXES, make_mesh
from cogvlm_jax.training.state import RECIPES


class ConfigError(ValueError):
  """A setting that cannot work; raised before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps start+1.. trained with one image size (and its sequence length / microbatches)."""

  start: int  # the step count when the phase begins
  model_config: CogVLMConfig
  max_length: int
  grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What a validated run config resolves to."""

  model_config: CogVLMConfig
  mesh: jax.sharding.Mesh
  rules: tuple  # logical axis -> mesh axes, as sharding.DEFAULT_RULES
  phases: tuple[Phase, ...]

  @property
  def data_parallel(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]


def resolve_config(config: ml_collections.ConfigDict) -> RunConfig:
  """The model config, mesh, sharding rules and phases of a run config; ConfigError names
  the first field that is wrong."""
  check_fields(config)
  try:
    model_cfg = CogVLMConfig.from_dict(config.model).validate()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from e
  try:
    mesh = make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from e
  phases = validate_config(config, model_cfg, mesh)
  return RunConfig(model_cfg, mesh, sharding_rules(config), phases)


def validate_config(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig,
                    mesh) -> tuple[Phase, ...]:
  """Checks a config against its model and a mesh (anything with a `shape` mapping, so that
  a planned mesh of other devices works too); returns the phases. ConfigError names the
  field."""
  check_fields(config)
  rules = sharding_rules(config)
  _check_numbers(config)
  _check_batch(config, mesh)
  check_model_mesh(model_cfg, mesh, rules)
  _check_recipe(config, model_cfg)
  _check_data(config, model_cfg)
  check_lora(config)
  return tuple(training_phases(config, model_cfg, mesh.shape["data"] * mesh.shape["fsdp"]))


# ---- fields --------------------------------------------------------------------------------


def _base_config() -> ml_collections.ConfigDict:
  from configs import base  # the one place defaults live (the repository's configs/)
  return base.get_config()


# Sections whose keys are free-form (a model config, a mixture of named sources, rules).
_OPEN_SECTIONS = ("model", "sharding_rules", "data.mixture", "train.resolution_switch",
                  "train.lora")


def check_fields(config: ml_collections.ConfigDict) -> None:
  """ConfigError for a field configs/base.py does not have (a typo) or lacks (a config not
  built on it)."""
  def keys(c, prefix=""):
    out = set()
    for k, v in c.items():
      name = prefix + k
      out.add(name)
      if isinstance(v, (Mapping, ml_collections.ConfigDict)) and name not in _OPEN_SECTIONS:
        out |= keys(v, name + ".")
    return out
  ours, base = keys(config), keys(_base_config())
  unknown = sorted(k for k in ours - base if not k.startswith(tuple(
      s + "." for s in _OPEN_SECTIONS)))
  if unknown:
    raise ConfigError(f"unknown setting {unknown[0]!r} (configs/base.py lists every field)")
  missing = sorted(base - ours)
  if missing:
    raise ConfigError(f"the config lacks {missing[0]!r}: build run configs on "
                      f"configs/base.py's get_config()")


def sharding_rules(config: ml_collections.ConfigDict) -> tuple:
  """config.sharding_rules as a rules tuple (the order of DEFAULT_RULES, then new names)."""
  table = dict(config.sharding_rules)
  for name, axes in table.items():
    for axis in (axes if isinstance(axes, (tuple, list)) else [axes]):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"sharding_rules.{name}: {axis!r} is not a mesh axis {MESH_AXES}")
  known = [name for name, _ in DEFAULT_RULES]
  missing = [n for n in known if n not in table]
  if missing:
    raise ConfigError(f"sharding_rules lacks the logical axis {missing[0]!r}")
  order = known + [n for n in table if n not in known]
  return tuple((n, tuple(table[n]) if isinstance(table[n], list) else table[n]) for n in order)


# ---- numbers -------------------------------------------------------------------------------


def _require(ok: bool, field: str, what: str, value: Any) -> None:
  if not ok:
    raise ConfigError(f"{field} must be {what}, got {value!r}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Type and range of every numeric setting."""
  t, d, o = config.train, config.data, config.optim
  if config.recipe not in RECIPES:
    raise ConfigError(f"recipe must be one of {RECIPES}, got {config.recipe!r}")
  positive_ints = {"train.steps": t.steps, "train.log_every": t.log_every,
                   "train.checkpoint_every": t.checkpoint_every,
                   "train.max_checkpoints": t.max_checkpoints,
                   "train.grad_accum_steps": t.grad_accum_steps,
                   "train.max_nan_steps": t.max_nan_steps, "data.max_length": d.max_length,
                   "data.num_threads": d.num_threads, "data.prefetch": d.prefetch}
  for field, value in positive_ints.items():
    _require(_is_int(value) and value >= 1, field, "an integer >= 1", value)
  for field, value in {"data.num_workers": d.num_workers, "data.bad_min_samples":
                       d.bad_min_samples, "optim.warmup_steps": o.warmup_steps,
                       "eval.batch_size": config.eval.batch_size,
                       "eval.max_new_tokens": config.eval.max_new_tokens,
                       "eval.max_examples_per_task": config.eval.max_examples_per_task}.items():
    _require(_is_int(value) and value >= 0, field, "an integer >= 0", value)
  _require(_is_number(o.lr) and o.lr > 0, "optim.lr", "a number > 0", o.lr)
  _require(o.warmup_steps <= t.steps, "optim.warmup_steps", f"<= train.steps ({t.steps})",
           o.warmup_steps)
  for field in ("end_lr_ratio", "weight_decay", "clip_norm", "vit_lr_scale", "eps"):
    value = o[field]
    _require(_is_number(value) and value >= 0, f"optim.{field}", "a number >= 0", value)
  for field in ("b1", "b2"):
    _require(_is_number(o[field]) and 0 <= o[field] < 1, f"optim.{field}", "in [0, 1)",
             o[field])
  _require(_is_number(t.z_loss) and t.z_loss >= 0, "train.z_loss", "a number >= 0", t.z_loss)
  _require(_is_number(t.peak_flops_per_device) and t.peak_flops_per_device >= 0,
           "train.peak_flops_per_device", "a number >= 0", t.peak_flops_per_device)
  _require(_is_number(d.max_bad_ratio) and 0 <= d.max_bad_ratio <= 1, "data.max_bad_ratio",
           "in [0, 1]", d.max_bad_ratio)
  _require(t.host_data in ("records", "rows"), "train.host_data", "'records' or 'rows'",
           t.host_data)
  _require(d.source in ("demo", "mixture"), "data.source", "'demo' or 'mixture'", d.source)


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  """Batches that split over the data-parallel devices, the processes and the microbatches."""
  t = config.train
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  sizes = [("train.batch_size", t.batch_size)]
  if config.eval.batch_size:  # 0: the eval config's, which eval checks against the mesh
    sizes.append(("eval.batch_size", config.eval.batch_size))
  for name, size in sizes:
    if not _is_int(size) or size <= 0 or size % dp:
      raise ConfigError(f"{name} ({size}) must be a positive multiple of the data-parallel "
                        f"mesh size data*fsdp = {dp} (mesh {dict(mesh.shape)})")
    if size % jax.process_count():
      raise ConfigError(f"{name} ({size}) must divide over {jax.process_count()} processes")
  if (t.batch_size // dp) % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps ({t.grad_accum_steps}) must divide the "
                      f"per-device batch train.batch_size / (data*fsdp) = {t.batch_size} / {dp}")


def check_model_mesh(model_cfg: CogVLMConfig, mesh, rules) -> None:
  """ConfigError when a model size does not split over the mesh axes its rule shards it on
  (e.g. 4 heads on mesh.tensor = 8): caught here, before anything is built, rather than as
  a sharding error while the parameters are created."""
  v = model_cfg.vision
  sizes = {"heads": ("num_attention_heads", model_cfg.num_attention_heads),
           "kv_heads": ("num_key_value_heads", model_cfg.num_key_value_heads),
           "mlp": ("intermediate_size", model_cfg.intermediate_size),
           "vocab": ("vocab_size", model_cfg.vocab_size),
           "embed": ("hidden_size", model_cfg.hidden_size),
           "vision_heads": ("vision.num_heads", v.num_heads),
           "vision_mlp": ("vision.intermediate_size", v.intermediate_size),
           "vision_embed": ("vision.hidden_size", v.hidden_size)}
  if model_cfg.cross_vision is not None:  # CogAgent's tower (sharding.py: cross_* rules)
    x = model_cfg.cross_vision
    sizes.update({"cross_embed": ("cross_vision.width", x.width),
                  "cross_heads": ("cross_vision heads (width / head_width)", x.num_heads),
                  "cross_mlp": ("cross_vision SwiGLU width", x.mlp_width)})
  for logical, axes in rules:
    if logical not in sizes or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for axis in axes:
      n *= mesh.shape[axis]
    field, size = sizes[logical]
    if size % n:
      raise ConfigError(f"model.{field} ({size}) must be divisible by mesh "
                        f"{'*'.join(axes)} = {n} (sharding_rules.{logical} shards it there); "
                        f"use a smaller mesh.{axes[0]} or change the rule")


def _check_recipe(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig) -> None:
  """Recipe 'cogagent' trains CogAgent's cross module, which only a CogAgent model has."""
  if config.recipe == "cogagent" and not model_cfg.is_cogagent:
    raise ConfigError(f"recipe 'cogagent' needs a CogAgent model (model.variant 'cogagent'), "
                      f"got model.variant {model_cfg.variant!r}")


def _check_data(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig) -> None:
  d = config.data
  if d.max_length < model_cfg.image_span_length + 3:
    raise ConfigError(f"data.max_length ({d.max_length}) cannot hold BOS, the image span "
                      f"({model_cfg.image_span_length} tokens) and any text")
  if d.source == "mixture" and not d.mixture:
    raise ConfigError("data.source='mixture' needs data.mixture ({name: source spec})")
  for name, spec in (d.mixture or {}).items():
    try:
      check_spec(name, dict(spec))
    except MixtureError as e:
      raise ConfigError(str(e)) from e


def check_lora(config: ml_collections.ConfigDict):
  """`train.lora` as a `LoraSpec` (None when off); ConfigError names what is wrong (unknown
  targets list the valid ones)."""
  from cogvlm_jax.modeling.lora import LoraSpec

  spec = config.train.lora
  if spec is None:
    return None
  if not isinstance(spec, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"train.lora must be None or dict(rank=, alpha=, dropout=, targets=), "
                      f"got {spec!r}")
  try:
    spec = LoraSpec.from_dict(dict(spec))
  except ValueError as e:
    raise ConfigError(f"train.lora: {e}") from e
  if config.recipe not in ("full", "sft"):
    raise ConfigError(f"train.lora needs recipe 'full' or 'sft' (the targets choose what "
                      f"adapts), not {config.recipe!r}")
  return spec


# ---- phases: CogVLM stage 2's 224 -> 490 switch ---------------------------------------------


def training_phases(config: ml_collections.ConfigDict, model_cfg: CogVLMConfig,
                    dp: int = 1) -> list[Phase]:
  """The run's phases: one, or two with `train.resolution_switch`; ConfigError if unusable.

  The switch changes only the ViT's input size: the position table is resized, every other
  weight and the optimizer state carry over. So the ViT must be frozen (stage 1 / 2 recipes):
  a trainable table would have Adam moments of the old shape.
  """
  accum = int(config.train.grad_accum_steps)
  phases = [Phase(0, model_cfg, int(config.data.max_length), accum)]
  switch = config.train.resolution_switch
  if not switch or not switch.get("step"):
    return phases
  switch = dict(switch)
  unknown = set(switch) - {"step", "image_size", "max_length", "grad_accum_steps"}
  if unknown:
    raise ConfigError(f"train.resolution_switch: unknown field(s) {sorted(unknown)}")
  step = int(switch["step"])
  if not 0 < step < config.train.steps:
    raise ConfigError(f"train.resolution_switch.step ({step}) must be in 1..train.steps-1 "
                      f"({config.train.steps - 1})")
  if config.recipe in ("full", "sft"):
    raise ConfigError(f"train.resolution_switch needs a frozen ViT (recipe stage1 / stage2), "
                      f"not recipe {config.recipe!r}")
  size = int(switch.get("image_size", model_cfg.vision.image_size))
  if size <= 0 or size % model_cfg.vision.patch_size:
    raise ConfigError(f"train.resolution_switch.image_size ({size}) must be a positive "
                      f"multiple of model.vision.patch_size ({model_cfg.vision.patch_size})")
  new_cfg = dataclasses.replace(model_cfg,
                                vision=dataclasses.replace(model_cfg.vision, image_size=size))
  max_length = int(switch.get("max_length", config.data.max_length))
  if max_length < new_cfg.image_span_length + 3:
    raise ConfigError(f"train.resolution_switch.max_length ({max_length}) cannot hold BOS, "
                      f"the {size} px image span ({new_cfg.image_span_length} tokens) and text")
  new_accum = int(switch.get("grad_accum_steps", accum))
  if new_accum <= 0 or (config.train.batch_size // max(dp, 1)) % new_accum:
    raise ConfigError(f"train.resolution_switch.grad_accum_steps ({new_accum}) must divide "
                      f"the per-device batch {config.train.batch_size} / {dp}")
  return phases + [Phase(step, new_cfg, max_length, new_accum)]


def phase_at(phases, step: int) -> Phase:
  """The phase that trains step `step` + 1 (0-based: the loop's `step`)."""
  return [p for p in phases if p.start <= step][-1]


def phase_of_state(phases, steps_done: int) -> Phase:
  """The phase whose shapes the state after `steps_done` steps has: the phase of the last
  step trained (a checkpoint saved right at the switch still has the old image size)."""
  return phase_at(phases, max(steps_done - 1, 0))
