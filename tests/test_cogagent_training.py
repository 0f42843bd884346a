"""CogAgent's training recipe ("cogagent"): the LM, the low-res ViT and its adapter frozen; the
high-resolution cross module and the visual experts train. A tiny CogAgent trains on the demo
data (rows with both image sizes). CPU, toy model."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from cogvlm_jax.training import init_weights, loop, run_config
from cogvlm_jax.training.state import (build_setup, init_train_state, is_cross_module,
                                       is_visual_expert)
from cogvlm_jax.training.step import abstract_batch, compile_train_step, put_batch
from tests.helpers import demo_batches, tiny_config, tiny_demo_cogagent


def _cogagent_config(data_dir, **train):
  config = tiny_config(data_dir, **train)
  config.model = tiny_demo_cogagent()
  config.recipe = "cogagent"
  return config


def _flat(tree):
  """{"a/b/c": leaf} of a nested dict of arrays or ShapeDtypeStructs."""
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _size(x):
  return math.prod(x.shape)


def test_recipe_splits_cross_module_and_visual_experts(data_dir):
  config = _cogagent_config(data_dir)
  run = run_config.resolve_config(config)
  setup = build_setup(run.model_config, "cogagent", config.optim, 10, run.mesh)
  trainable, frozen = _flat(setup.abstract.params), _flat(setup.abstract.frozen)
  assert any(p.startswith("cross_vision/blocks/") for p in trainable)
  assert any("/cross_attn/" in p for p in trainable)
  assert "layers/post_cross_attention_layernorm/weight" in trainable
  assert any("vision_expert_query_key_value" in p for p in trainable)
  assert any("vision_mlp" in p for p in trainable)
  for p in trainable:
    assert is_cross_module(p.split("/")) or is_visual_expert(p.split("/")), p
  for p in ("embed_tokens", "lm_head", "norm/weight", "adapter/pos_embed",
            "cross_vision/head", "cross_vision/norm/weight",
            "layers/mlp/language_mlp/up_proj", "layers/input_layernorm/weight"):
    assert p in frozen, p
  assert not any(p.startswith("vision/") for p in trainable)
  # No optimizer state for a frozen parameter: every moment is shaped like a trainable one.
  n_trainable = sum(_size(x) for x in trainable.values())
  n_moments = sum(_size(x) for x in _flat(setup.abstract.opt_state).values() if x.shape)
  assert n_moments == 2 * n_trainable  # Adam's mu and nu


def test_recipe_needs_a_cogagent_model(data_dir):
  config = tiny_config(data_dir)
  config.recipe = "cogagent"
  with pytest.raises(run_config.ConfigError, match="recipe 'cogagent' needs a CogAgent"):
    run_config.resolve_config(config)


def _write_cogagent_folder(cfg, folder):
  """A Hugging Face CogAgent folder (the original names) of a seeded model; the model."""
  from cogvlm_jax.convert.hf import state_to_hf
  from cogvlm_jax.pretrained import create_model
  from tests.helpers import write_hf_folder

  source = create_model(cfg, seed=3)
  write_hf_folder(str(folder), cfg.to_hf_dict(torch_dtype="float32"),
                  state_to_hf(cfg, nnx.state(source)))
  return source


@pytest.mark.slow
def test_tiny_cogagent_trains_from_a_cogagent_folder(data_dir, tmp_path):
  """train.init_from = a Hugging Face CogAgent folder: every weight, trainable and frozen, is
  the folder's (its 2D-RoPE tables are computed buffers, as the LM's inv_freq). Then steps on
  a demo batch (both image sizes): the loss falls, frozen weights stay bit-equal, the cross
  module and the visual experts move."""
  config = _cogagent_config(data_dir)
  config.optim.warmup_steps = 1
  run = run_config.resolve_config(config)
  setup = build_setup(run.model_config, "cogagent", config.optim, 10, run.mesh)
  source = _write_cogagent_folder(run.model_config, tmp_path / "hf")
  state = init_weights.load_initial_weights(init_train_state(setup, seed=0), setup,
                                            str(tmp_path / "hf"))
  want = _flat(nnx.to_pure_dict(nnx.state(source)))
  got = {**_flat(state.params), **_flat(state.frozen)}
  assert set(got) == set(want)
  for p, x in want.items():
    if p.split("/")[-1] in init_weights.COMPUTED_BUFFERS:  # computed: equal to a few ulp
      np.testing.assert_allclose(np.asarray(got[p]), np.asarray(x), rtol=1e-6, err_msg=p)
    else:
      np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(x), err_msg=p)

  (batch,) = demo_batches(config, 1)
  assert batch["cross_images"].shape == (8, 24, 24, 3) and batch["images"].shape[1] == 16
  frozen0, params0 = (jax.tree.map(np.asarray, _flat(t)) for t in (state.frozen, state.params))
  spec = abstract_batch(setup, batch)
  step = compile_train_step(setup, spec)
  losses = []
  for _ in range(5):
    state, metrics = step(state, put_batch(batch, spec))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  frozen1, params1 = (jax.tree.map(np.asarray, _flat(t)) for t in (state.frozen, state.params))
  for p, x in frozen0.items():
    np.testing.assert_array_equal(frozen1[p], x, err_msg=p)
  moved = {p for p in params0 if not np.array_equal(params0[p], params1[p])}
  assert any(p.startswith("cross_vision/blocks/") for p in moved)
  assert any("/cross_attn/key" in p for p in moved)
  assert any("vision_expert_dense" in p for p in moved)


@pytest.mark.slow
def test_train_py_loop_trains_and_evaluates_a_cogagent(data_dir, tmp_path):
  """train.py's loop end to end: a few steps, a checkpoint, and the held-out demo evaluation
  (eval's Generator with cross_images)."""
  config = _cogagent_config(data_dir, steps=4, log_every=2)
  config.optim.warmup_steps = 1
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["steps"] == 4 and len(result["losses"]) == 4
  assert result["eval"] is not None

