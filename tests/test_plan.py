"""`python -m cogvlm_jax.plan`: the real train step compiled abstractly for a simulated mesh
(here the tiny preset on the 8 simulated CPU devices of the test session)."""

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
