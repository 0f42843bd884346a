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
from cogvlm_jax.modeling.routing import VISION_TOKEN_TYPE
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
  """Batch (uint8 images) -> model kwargs: images normalised on device, and the image span
  of rows whose image could not be read masked out of attention."""
  images = normalize_image(batch["images"]).astype(dtype)
  attention_mask = batch["attention_mask"]
  if "image_valid" in batch:
    bad_image = (batch["token_type_ids"] == VISION_TOKEN_TYPE) & ~batch["image_valid"][:, None]
    attention_mask = jnp.where(bad_image, 0, attention_mask)
  return dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
              images=images, attention_mask=attention_mask)


def make_train_step(setup: TrainSetup) -> Callable:
  """(state, batch) -> (new state, metrics); metrics are float32 scalars."""
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  dtype = setup.model_config.dtype

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    # A per-step key for stochastic layers (none yet): deterministic on resume.
    _ = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.frozen)
      logits = model(**model_inputs(batch, dtype))
      loss, (_, count) = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
      return loss, count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "loss_tokens": count,
        "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
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


def compile_train_step(setup: TrainSetup, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
  """The AOT-compiled train step for batches shaped like `batch_spec`."""
  replicated = setup.replicated
  batch_shardings = {k: v.sharding for k, v in batch_spec.items()}
  metric_names = ("loss", "grad_norm", "lr", "loss_tokens", "tokens")
  jitted = jax.jit(make_train_step(setup),
                   in_shardings=(setup.shardings, batch_shardings),
                   out_shardings=(setup.shardings, {k: replicated for k in metric_names}),
                   donate_argnums=(0,))
  with activation_sharding(setup.mesh, setup.rules):
    return jitted.lower(setup.abstract, dict(batch_spec)).compile()


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
