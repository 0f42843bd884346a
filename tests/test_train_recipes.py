"""Recipes: SFT's ViT learning-rate multiplier, frozen weights in bf16, starting weights
(`train.init_from`, with the 224 -> 490 position-table resize) and the real-size recipe
configs (abstract only: nothing of real size is allocated)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax import checkpoint
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.training import loop
from cogvlm_jax.training import init_weights
from cogvlm_jax.training import run_config
from cogvlm_jax.training.state import (all_weights, build_setup, init_train_state, is_adapter,
                                       is_visual_expert, is_vit)
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_FILES = ["cogvlm_stage1.py", "cogvlm_stage2.py", "cogvlm_sft.py", "cogvlm2_sft.py",
                "cogvlm_grounding_sft.py", "cogvlm_full_ft.py"]


def _config(tmp_path):
  return tiny_config(str(tmp_path / "unused-data"))


def _paths(tree):
  return [tuple(str(getattr(k, "key", k)) for k in p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_sft_scales_the_vit_step(tmp_path):
  config = _config(tmp_path)
  _run = run_config.resolve_config(config)
  model_cfg, mesh = _run.model_config, _run.mesh
  config.optim.warmup_steps = 0
  full = build_setup(model_cfg, "full", config.optim, 10, mesh)
  sft = build_setup(model_cfg, "sft", config.optim, 10, mesh)
  state = init_train_state(full, seed=0)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), state.params)
  u_full, _ = jax.jit(full.tx.update)(grads, full.tx.init(state.params), state.params)
  u_sft, _ = jax.jit(sft.tx.update)(grads, sft.tx.init(state.params), state.params)
  flat_full = dict(zip(_paths(u_full), jax.tree.leaves(u_full)))
  flat_sft = dict(zip(_paths(u_sft), jax.tree.leaves(u_sft)))
  assert any(is_vit(p) for p in flat_sft)
  for p, u in flat_sft.items():
    want = flat_full[p] * (0.1 if is_vit(p) else 1.0)
    np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=str(p))


@pytest.mark.slow
def test_frozen_weights_in_bf16_and_init_from(tmp_path):
  config = _config(tmp_path)
  _run = run_config.resolve_config(config)
  model_cfg, mesh = _run.model_config, _run.mesh
  # A "pretrained" checkpoint: the full model at another seed, saved as cogvlm_jax weights.
  source = init_train_state(build_setup(model_cfg, "full", config.optim, 10, mesh), seed=7)
  weights = jax.device_get(all_weights(source))
  checkpoint.save_params(str(tmp_path / "pretrained"), weights, model_cfg)

  setup = build_setup(model_cfg, "stage1", config.optim, 10, mesh, frozen_dtype="bfloat16")
  state = init_train_state(setup, seed=0)
  for p, x in zip(_paths(state.frozen), jax.tree.leaves(state.frozen)):
    assert x.dtype == (jnp.float32 if p[-1] == "inv_freq" else jnp.bfloat16), p
  for x in jax.tree.leaves(state.params):
    assert x.dtype == jnp.float32  # fp32 master weights of the trainable ones
  assert all(is_visual_expert(p) or is_adapter(p) for p in _paths(state.params))

  loaded = init_weights.load_initial_weights(state, setup, str(tmp_path / "pretrained"))
  want = checkpoint.flatten(weights)
  for tree in (loaded.params, loaded.frozen):
    for p, x in zip(_paths(tree), jax.tree.leaves(tree)):
      if p[-1] != "inv_freq":
        np.testing.assert_array_equal(np.asarray(x), want[p].astype(x.dtype), err_msg=str(p))

  # The 224 -> 490 switch in small: a model with 4x4 instead of 2x2 patches loads the same
  # weights with its ViT position table resized (CLS row kept), everything else unchanged.
  config.model.vision.image_size = 32
  _run = run_config.resolve_config(config)
  big_cfg, _ = _run.model_config, _run.mesh
  big = build_setup(big_cfg, "stage1", config.optim, 10, mesh, frozen_dtype="bfloat16")
  big_state = init_weights.load_initial_weights(init_train_state(big, seed=0), big,
                                        str(tmp_path / "pretrained"))
  table = np.asarray(big_state.frozen["vision"]["patch_embedding"]["position_embedding"],
                     np.float32)
  old = want[("vision", "patch_embedding", "position_embedding")]
  assert table.shape == (17, old.shape[1])
  np.testing.assert_allclose(table[0], old[0], atol=1e-2)  # bf16
  np.testing.assert_allclose(table[1:].mean(0), old[1:].mean(0), atol=0.02)
  np.testing.assert_array_equal(np.asarray(big_state.params["adapter"]["boi"]),
                                want[("adapter", "boi")])


def _load(name):
  spec = importlib.util.spec_from_file_location("cfg_" + name[:-3],
                                                os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_recipe_configs_are_real_size_and_valid(name):
  config = _load(name)()
  model_cfg = CogVLMConfig.from_dict(config.model)
  assert model_cfg.dtype == "bfloat16" and model_cfg.param_dtype == "float32"
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
  # The dataset locations are the user's: unset, the check names what to set.
  with pytest.raises(run_config.ConfigError, match=r"data\.mixture\.\w+ \(kind '\w+'\) needs"):
    run_config.validate_config(config, model_cfg, mesh)
  for spec in config.data.mixture.values():
    for field in ("paths", "json", "images"):
      if field in spec:
        spec[field] = f"/data/{field}"
  run_config.validate_config(config, model_cfg, mesh)
  setup = build_setup(model_cfg, config.recipe, config.optim, config.train.steps, mesh,
                      frozen_dtype=config.train.frozen_dtype)
  trainable, total = setup.num_params()
  assert total > 17e9
  if config.recipe in ("stage1", "stage2"):
    assert 5e9 < trainable < 8e9, trainable  # visual experts + adapter (paper: ~6.5B)
    frozen = setup.abstract.frozen
    assert {x.dtype for p, x in zip(_paths(frozen), jax.tree.leaves(frozen))
            if p[-1] != "inv_freq"} == {jnp.dtype(jnp.bfloat16)}
  else:
    assert trainable == total


def test_stage2_switches_to_490_mid_run():
  config = _load("cogvlm_stage2.py")()
  assert config.model.vision.image_size == 224 and config.train.steps == 60_000
  model_cfg = CogVLMConfig.from_dict(config.model)
  first, late = run_config.training_phases(config, model_cfg, dp=64)
  assert (first.start, first.model_config.vision.image_size) == (0, 224)
  assert (late.start, late.model_config.vision.image_size) == (30_000, 490)
  assert late.model_config.image_span_length == 1227 < late.max_length
  assert run_config.phase_at([first, late], 29_999) is first
  assert run_config.phase_at([first, late], 30_000) is late


def _position_table(tree):
  (table,) = [v for k, v in checkpoint.flatten(tree).items()
              if k[0] == "vision" and k[-1] == "position_embedding"]
  return np.asarray(jax.device_get(table))


@pytest.mark.slow
def test_resolution_switch_mid_run(tmp_path):
  from tests.helpers import SMALL_SPEC
  from cogvlm_jax.data import demo

  data = demo.ensure_demo_data(str(tmp_path / "data"), demo.DemoSpec(**SMALL_SPEC),
                               verbose=False)
  config = tiny_config(data, steps=6, log_every=1, checkpoint_every=2)
  config.recipe = "stage2"
  # 16 px (2x2 patches, 5 position rows) for steps 1..4, then 32 px (4x4, 17 rows).
  config.train.resolution_switch = dict(step=4, image_size=32, max_length=56)
  config.train.max_checkpoints = 10
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  assert sorted(straight["losses"]) == [1, 2, 3, 4, 5, 6]
  assert np.all(np.isfinite(list(straight["losses"].values())))
  assert np.isfinite(straight["eval"]["vqa"]["accuracy"])  # generated at 32 px
  final = checkpoint.load_params(str(tmp_path / "straight"))
  _run = run_config.resolve_config(config)
  model_cfg, mesh = _run.model_config, _run.mesh
  start = init_train_state(build_setup(model_cfg, "stage2", config.optim, 6, mesh), seed=0)
  np.testing.assert_allclose(  # the frozen table, resized once, bicubically
      _position_table(final),
      init_weights.resize_position_embedding(_position_table(start.frozen), 17), rtol=1e-6)
  # Killed after step 5 before its checkpoint: the resume starts from step 4's, saved right
  # at the switch (still 16 px), switches again and gives the same losses.
  workdir = tmp_path / "resumed"
  loop.train_and_evaluate(config, str(workdir), stop_after_steps=5, evaluate_at_end=False)
  import shutil
  shutil.rmtree(workdir / checkpoint.CHECKPOINTS_DIR / "5")
  second = loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  assert second["losses"] == {s: straight["losses"][s] for s in (5, 6)}
  # And from step 2's checkpoint (before the switch), too.
  shutil.rmtree(workdir / checkpoint.CHECKPOINTS_DIR / "6")
  shutil.rmtree(workdir / checkpoint.CHECKPOINTS_DIR / "4")
  assert sorted(os.listdir(workdir / checkpoint.CHECKPOINTS_DIR)) == ["2"]
  third = loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  assert third["losses"] == {s: straight["losses"][s] for s in (3, 4, 5, 6)}
  # The newest step (6, at 32 px) damaged after its save: the fallback restores step 4 at
  # its own 16 px, switches again at step 4 and gives the same losses; 6 is moved aside.
  ckpts = workdir / checkpoint.CHECKPOINTS_DIR
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]
  for path in sorted(p for p in (ckpts / "6" / "params").rglob("*") if p.is_file())[::2]:
    os.truncate(path, path.stat().st_size // 2)
  for path in (ckpts / "6" / "opt_state").rglob("d/*"):
    path.unlink()
  fourth = loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  assert fourth["losses"] == {s: straight["losses"][s] for s in (5, 6)}
  assert [n for n in os.listdir(ckpts) if n.startswith("6.broken-")]
  np.testing.assert_array_equal(_position_table(checkpoint.load_params(str(workdir))),
                                _position_table(final))  # resized again, to 32 px


@pytest.mark.parametrize("switch, recipe, message", [
    (dict(step=6, image_size=32), "stage2", r"must be in 1..train.steps-1"),
    (dict(step=3, image_size=30), "stage2", "multiple of model.vision.patch_size"),
    (dict(step=3, image_size=32, grad_accum_steps=3), "stage2", "must divide"),
    (dict(step=3, image_size=32, max_length=20), "stage2", "cannot hold BOS"),
    (dict(step=3, image_size=32), "sft", "needs a frozen ViT"),
    (dict(step=3, size=32), "stage2", r"unknown field\(s\) \['size'\]"),
])
def test_resolution_switch_settings(tmp_path, switch, recipe, message):
  config = _config(tmp_path)
  config.train.steps = 6
  config.recipe = recipe
  config.train.resolution_switch = switch
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.resolve_config(config)
