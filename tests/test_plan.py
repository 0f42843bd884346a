"""`python -m cogvlm_jax.plan`: the real train step compiled abstractly for a simulated mesh
(here the tiny preset on the 8 simulated CPU devices of the test session)."""

import math
import os

import jax
import pytest

from cogvlm_jax import plan
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.pretrained import abstract_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_mesh():
  assert plan.parse_mesh("fsdp=64") == {"data": 1, "fsdp": 64, "tensor": 1}
  assert plan.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="bad --mesh entry 'pipe=2'"):
    plan.parse_mesh("pipe=2")


def test_plan_tiny_preset_on_fsdp8(capsys):
  assert jax.device_count() >= 8
  assert plan.main(["--config", os.path.join(ROOT, "configs", "tiny_cogvlm.py"),
                    "--mesh", "fsdp=8", "--chip", "v5p", "--step_time", "0.001"]) == 0
  out = capsys.readouterr().out
  assert "parameters:" in out and "memory per device (XLA)" in out and "FLOPs per step" in out
  assert "v5p" in out and "H100" not in out


def test_plan_numbers_and_stage1_split():
  from configs.tiny_cogvlm import get_config
  config = get_config()
  config.recipe = "stage1"
  result = plan.plan(config, {"data": 1, "fsdp": 8, "tensor": 1}, batch_size=8)
  cfg = CogVLMConfig.from_dict(config.model)
  _, state = abstract_model(cfg)
  from flax import nnx
  import math
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(state, nnx.Param)))
  assert result["params_total"] == n
  assert 0 < result["params_trainable"] < n
  assert result["seq_len"] == cfg.image_span_length + 64 and result["batch_size"] == 8
  mem = result["memory_per_device"]
  assert mem["total"] > 0 and mem["arguments"] > 0
  assert result["flops_per_step"] > 2 * n  # at least one forward over a token
  rows = plan.chip_table(result, ["v4", "H200"], 0.5, None)
  assert rows[0]["step_s_at_100pct"] > rows[1]["step_s_at_100pct"]  # v4 is slower
  assert all(r["fits_hbm"] for r in rows)


@pytest.mark.slow
def test_plan_tiny_cogagent_recipe():
  """CogAgent's step (both image sizes in the batch) with its recipe: the cross module and the
  visual experts are the trainable part."""
  from configs.tiny_cogagent import get_config
  config = get_config()
  config.recipe = "cogagent"
  result = plan.plan(config, {"data": 1, "fsdp": 8, "tensor": 1}, batch_size=8)
  assert 0 < result["params_trainable"] < result["params_total"]
  assert result["memory_per_device"]["total"] > 0 and result["flops_per_step"] > 0


def _tiny_cogvlm2_setup():
  """tiny-cogvlm2 with the recipes' full remat, trained in full on fsdp=8."""
  from configs.tiny_cogvlm2 import get_config
  from cogvlm_jax.sharding import make_mesh
  from cogvlm_jax.training.state import build_setup

  config = get_config()
  config.model.remat_policy = "full"  # as the recipes: no layer's scores saved for backward
  cfg = CogVLMConfig.from_dict(config.model)
  mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices=jax.devices()[:8])
  optim = dict(lr=1e-5, warmup_steps=1, end_lr_ratio=0.0, b1=0.9, b2=0.95, eps=1e-8,
               weight_decay=0.0, clip_norm=1.0)
  return build_setup(cfg, "full", optim, 10, mesh)


def test_vit_attention_keeps_the_batch_sharded():
  """Each device attends over its own images only.

  The ViT weights shard "vision_embed" over fsdp, the axis that also shards the batch; with
  no activation constraints XLA gathered the whole microbatch and sharded the hidden dim
  instead, so every device computed the attention scores of every image (CogVLM2 at fsdp=64:
  ~1160 GiB per device instead of ~25).
  """
  import re

  from cogvlm_jax.training.step import lower_train_step

  setup = _tiny_cogvlm2_setup()
  cfg = setup.model_config
  spec = plan.batch_spec_for(setup, 16, 32)  # 2 microbatches of one row per device
  hlo = lower_train_step(setup, spec, microbatches=2).compile().as_text()
  tokens = cfg.vision.num_positions
  scores = re.findall(rf"f32\[([\d,]+),{tokens},{tokens}\]", hlo)
  assert scores, "no ViT attention scores found in the compiled step"
  leading = {math.prod(int(d) for d in s.split(",")) for s in scores}
  assert leading == {cfg.vision.num_heads}, scores  # [1 image, heads, (1,) T, T] per device


def test_flops_do_not_see_query_blocks(monkeypatch):
  """XLA's cost analysis counts a loop body once, so the FLOP count must run attention whole
  even where the model's layers would loop over query blocks."""
  from cogvlm_jax.modeling import decoder, vision
  from cogvlm_jax.training.flops import train_step_flops

  setup = _tiny_cogvlm2_setup()
  spec = plan.batch_spec_for(setup, 8, 32)
  whole = train_step_flops(setup, spec)
  monkeypatch.setattr(vision, "QUERY_CHUNK", 8)  # ViT 17 tokens, decoder 32: 3 and 4 blocks
  monkeypatch.setattr(decoder, "QUERY_CHUNK", 8)
  assert train_step_flops(setup, spec) == whole


def test_after_switch_plans_stage2_at_490_px():
  config = plan.load_config(os.path.join(ROOT, "configs", "cogvlm_stage2.py"))
  switch = config.train.resolution_switch
  after = plan.after_switch(config)
  assert after.model.vision.image_size == switch.image_size == 490
  assert after.data.max_length == switch.max_length
  assert after.train.grad_accum_steps == switch.grad_accum_steps
  assert after.train.resolution_switch is None
  assert config.model.vision.image_size == 224  # the config itself is unchanged
  with pytest.raises(ValueError, match="no train.resolution_switch"):
    plan.after_switch(plan.load_config(os.path.join(ROOT, "configs", "cogvlm_sft.py")))


def test_tpu_table_rows_keep_the_rows_per_microbatch_on_256_chips():
  import sys
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import tpu_table

  assert tpu_table.settings("cogvlm2_sft", "v5p-128") == []
  assert tpu_table.settings("cogvlm2_sft", "v5e-256") == ["--config.train.grad_accum_steps=1"]
  assert tpu_table.settings("stage1", "v6e-256") == ["--config.train.grad_accum_steps=8"]
  assert tpu_table.settings("stage2_490", "v5e-256") == [
      "--after_switch", "--config.train.resolution_switch.grad_accum_steps=1"]
  for row, (_, config_file, _, accum) in tpu_table.ROWS.items():
    config = plan.load_config(os.path.join(ROOT, config_file))
    if row == "stage2_490":
      config = plan.after_switch(config)
    assert config.train.grad_accum_steps == accum, row  # the table follows the configs


def test_a_step_that_does_not_fit_names_its_largest_buffer(capsys):
  import jax.numpy as jnp

  def f(x):  # the [256, 4096] f32 product (4 MiB) is the largest array it makes
    return jnp.tanh(x[:, None] * jnp.arange(4096, dtype=jnp.float32))

  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((256,), jnp.float32)).compile()
  name, nbytes = plan.largest_buffer(compiled)
  assert "f32[256,4096]" in name and nbytes == 256 * 4096 * 4
  result = {"memory_per_device": {"total": 2 * 2**30}, "compiled": compiled}
  verdict = plan._print_verdict("train step", result, "v5e-8", 1)
  out = capsys.readouterr().out
  assert "v5e-8 train step: 2.00 GiB per chip of 1 GiB HBM: does not fit" in out
  assert "largest buffer: %" in out and "f32[256,4096]" in out
  assert verdict["fits"] is False and verdict["largest_buffer_bytes"] == nbytes
