"""Loss and the compiled train / eval steps.

The loss is next-token cross-entropy: logits at position t predict input_ids[t + 1], counted
only where the TARGET token has loss_mask 1 (answer tokens and the EOS), averaged over those
tokens in the whole batch. Image, prompt and pad positions never contribute.

The train step is a plain `jax.jit` over (TrainState, batch) with explicit in/out shardings,
the state donated, and compiled ahead of time (`.lower(...).compile()`) before the first
batch arrives; `nnx.merge` rebuilds the model inside it from the state's dicts.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cogvlm_jax.image_processing import normalize_image
from cogvlm_jax.modeling.lora import dropout_rng as lora_dropout_rng
from cogvlm_jax.batch_layout import VISION_TOKEN_TYPE
from cogvlm_jax.sharding import activation_sharding
from cogvlm_jax.training.state import TrainSetup, TrainState

BATCH_AXES = ("data", "fsdp")


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    example_weight: jax.Array | None = None):
  """Masked next-token cross-entropy.

  Args:
    logits: float [B, T, V]; input_ids, loss_mask: int [B, T]; example_weight: optional
      float/bool [B] (0 drops a row, e.g. batch padding during evaluation).
  Returns:
    (mean loss over counted tokens, (sum of token losses, number of counted tokens)).
  """
  targets = input_ids[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  if example_weight is not None:
    weights = weights * example_weight.astype(jnp.float32)[:, None]
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), targets)
  total = jnp.sum(nll * weights)
  count = jnp.sum(weights)
  return total / jnp.maximum(count, 1.0), (total, count)


def model_inputs(batch: Mapping[str, jax.Array], dtype) -> dict:
  """Batch (uint8 images) -> model kwargs: images (and CogAgent's cross_images) normalised on
  device, and the image span of rows whose image could not be read masked out of attention."""
  images = normalize_image(batch["images"]).astype(dtype)
  attention_mask = batch["attention_mask"]
  if "image_valid" in batch:
    bad_image = (batch["token_type_ids"] == VISION_TOKEN_TYPE) & ~batch["image_valid"][:, None]
    attention_mask = jnp.where(bad_image, 0, attention_mask)
  out = dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
             images=images, attention_mask=attention_mask)
  if "cross_images" in batch:  # CogAgent: uint8 [B, Sx, Sx, 3]
    out["cross_images"] = normalize_image(batch["cross_images"]).astype(dtype)
  return out


METRIC_NAMES = ("loss", "grad_norm", "lr", "loss_tokens", "tokens", "nonfinite", "z_loss")


def z_loss_terms(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Sum over counted positions of logsumexp(logits)^2 (PaLM's z-loss), float32 scalar."""
  lse = jax.nn.logsumexp(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse) * loss_mask[:, 1:].astype(jnp.float32))


def split_microbatches(batch: Mapping[str, jax.Array], num: int, mesh=None) -> dict:
  """[B, ...] -> [num, B / num, ...], microbatch m = rows m, m + num, m + 2 num, ...

  Interleaved (not contiguous) so that every microbatch keeps its rows spread over all the
  data-parallel devices: each device's contiguous block of rows holds B / (num * dp) rows of
  every microbatch, and the split needs no communication.
  """
  def one(x):
    b = x.shape[0]
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if b % (num * dp):
      raise ValueError(f"batch {b} does not split into {num} microbatches over {dp} "
                       f"data-parallel devices (each device needs a multiple of {num} rows)")
    y = x.reshape(b // num, num, *x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if mesh is None:
      return y
    return jax.lax.with_sharding_constraint(
        y, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 1)))))
  return {k: one(v) for k, v in batch.items()}


def make_train_step(setup: TrainSetup, *, microbatches: int = 1,
                    z_loss: float = 0.0) -> Callable:
  """(state, batch) -> (new state, metrics); metrics are float32 scalars.

  * The loss is the mean next-token cross-entropy over all counted tokens of the batch
    (plus `z_loss` * mean logsumexp^2 when `z_loss` > 0).
  * `microbatches` > 1: gradient accumulation. The batch is split into that many
    microbatches, run one after another in a `lax.scan` (activations of one microbatch live
    at a time); each contributes (its token-loss sum) / (the whole batch's token count), so
    the summed gradients equal the full-batch gradient.
  * Non-finite loss or gradient norm: the update is skipped inside the step (params and
    optimizer state kept by a `where`), the step counter still advances (the data moved on),
    and metrics["nonfinite"] is 1; the loop counts these and stops after
    `train.max_nan_steps`.
  """
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  dtype = setup.model_config.dtype

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    # A per-step key for stochastic layers (LoRA dropout): deterministic on resume.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    count = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)

    def loss_fn(params, mb, key):
      model = nnx.merge(graphdef, params, state.frozen)
      with lora_dropout_rng(key):
        logits = model(**model_inputs(mb, dtype))
      _, (total, _) = next_token_loss(logits, mb["input_ids"], mb["loss_mask"])
      ce = total / denom
      z = z_loss_terms(logits, mb["loss_mask"]) / denom if z_loss else jnp.zeros(())
      return ce + z_loss * z, (ce, z)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (_, (ce, z)), grads = grad_fn(state.params, batch, step_key)
    else:
      def body(carry, mb_and_index):
        g_acc, ce_acc, z_acc = carry
        mb, index = mb_and_index  # each microbatch its own dropout key
        (_, (ce, z)), g = grad_fn(state.params, mb, jax.random.fold_in(step_key, index))
        return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, ce, z), _ = jax.lax.scan(
          body, (zeros, jnp.zeros(()), jnp.zeros(())),
          (split_microbatches(batch, microbatches, setup.mesh), jnp.arange(microbatches)))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(ce) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = {
        "loss": ce,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "loss_tokens": count,
        "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "z_loss": z,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def batch_sharding(setup: TrainSetup, ndim: int) -> NamedSharding:
  """Batch dim over the data-parallel axes, the rest replicated."""
  return NamedSharding(setup.mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def abstract_batch(setup: TrainSetup, example: Mapping[str, Any]) -> dict:
  """ShapeDtypeStructs (with shardings) of a batch shaped like `example` (numpy arrays)."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(setup, v.ndim))
          for k, v in example.items()}


def lower_train_step(setup: TrainSetup, batch_spec: Mapping[str, jax.ShapeDtypeStruct], *,
                     microbatches: int = 1, z_loss: float = 0.0):
  """The train step lowered (not compiled) for batches shaped like `batch_spec`."""
  replicated = setup.replicated
  batch_shardings = {k: v.sharding for k, v in batch_spec.items()}
  jitted = jax.jit(make_train_step(setup, microbatches=microbatches, z_loss=z_loss),
                   in_shardings=(setup.shardings, batch_shardings),
                   out_shardings=(setup.shardings, {k: replicated for k in METRIC_NAMES}),
                   donate_argnums=(0,))
  with activation_sharding(setup.mesh, setup.rules):
    return jitted.lower(setup.abstract, dict(batch_spec))


def compile_train_step(setup: TrainSetup, batch_spec: Mapping[str, jax.ShapeDtypeStruct], *,
                       microbatches: int = 1, z_loss: float = 0.0):
  """The AOT-compiled train step for batches shaped like `batch_spec`."""
  return lower_train_step(setup, batch_spec, microbatches=microbatches,
                          z_loss=z_loss).compile()


def compile_eval_step(setup: TrainSetup, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
  """(state, batch) -> (sum of token losses, token count) over rows with example_valid."""
  graphdef, dtype = setup.graphdef, setup.model_config.dtype

  def eval_step(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params, state.frozen)
    logits = model(**model_inputs(batch, dtype))
    _, (total, count) = next_token_loss(logits, batch["input_ids"], batch["loss_mask"],
                                        batch.get("example_valid"))
    return total, count

  batch_shardings = {k: v.sharding for k, v in batch_spec.items()}
  jitted = jax.jit(eval_step, in_shardings=(setup.shardings, batch_shardings),
                   out_shardings=(setup.replicated, setup.replicated))
  with activation_sharding(setup.mesh, setup.rules):
    return jitted.lower(setup.abstract, dict(batch_spec)).compile()


def put_batch(batch: Mapping[str, Any], batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
  """Host numpy batch (this process's rows) -> global sharded device arrays."""
  return {k: jax.make_array_from_process_local_data(spec.sharding, batch[k], spec.shape)
          for k, spec in batch_spec.items()}
