"""The config files in configs/ and the presets they name: valid, round-trippable, the right size.

Parameter counts come from the abstract model (`nnx.eval_shape`: shapes only, no memory), so
the full-size checks run in well under a second each.
"""

import glob
import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cogvlm_jax.config import PRESETS, CogVLMConfig, preset
from cogvlm_jax.pretrained import abstract_model

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not os.path.basename(p).startswith("_"))
# One config file per preset, named after it with underscores.
PRESET_FILES = {name: os.path.join(CONFIG_DIR, name.replace("-", "_") + ".py") for name in PRESETS}
FULL_SIZE = [name for name in PRESETS if not name.startswith("tiny-")]
V1_FULL = [name for name in FULL_SIZE if preset(name).variant == "cogvlm"]
V2_FULL = [name for name in FULL_SIZE if preset(name).variant == "cogvlm2"]


def load_config(path: str) -> ml_collections.ConfigDict:
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def num_params(cfg: CogVLMConfig) -> int:
  _, state = abstract_model(cfg)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.filter_state(state, nnx.Param)))


def test_every_preset_has_a_config_file():
  missing = [path for path in PRESET_FILES.values() if not os.path.exists(path)]
  assert not missing, f"presets without a config file: {missing}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_builds_a_model_config(path):
  config = load_config(path)
  assert isinstance(config, ml_collections.ConfigDict)
  cfg = CogVLMConfig.from_dict(config.model)
  assert isinstance(cfg, CogVLMConfig)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_config_file_matches_preset(name):
  config = load_config(PRESET_FILES[name])
  cfg = CogVLMConfig.from_dict(config.model)
  dtype = "float32" if name.startswith("tiny-") else "bfloat16"
  assert cfg == preset(name, dtype=dtype, param_dtype=dtype)
  assert config.mesh.to_dict() == dict(data=1, fsdp=-1, tensor=1)
  assert config.seed == 0


@pytest.mark.parametrize("name", V1_FULL)
def test_v1_parameter_count(name):
  n = num_params(CogVLMConfig.from_dict(load_config(PRESET_FILES[name]).model))
  assert 17.6e9 < n < 17.7e9, n


@pytest.mark.parametrize("name", V2_FULL)
def test_v2_parameter_count(name):
  n = num_params(CogVLMConfig.from_dict(load_config(PRESET_FILES[name]).model))
  assert abs(n - 19.503e9) < 0.01e9, n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
  cfg = preset(name)
  assert CogVLMConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  # Runtime fields are not part of config.json; they come back through `runtime`.
  bf16 = preset(name, dtype="bfloat16", param_dtype="bfloat16")
  assert CogVLMConfig.from_hf_dict(bf16.to_hf_dict(), dtype="bfloat16",
                                   param_dtype="bfloat16") == bf16


@pytest.mark.parametrize("name", V2_FULL + ["tiny-cogvlm2"])
def test_cogvlm2_hf_dict_has_grouped_kv_heads(name):
  hf = preset(name).to_hf_dict()
  assert hf["num_multi_query_heads"] == preset(name).num_key_value_heads
  if name in V2_FULL:
    assert hf["num_multi_query_heads"] == 8
    assert hf["vision_config"]["num_positions"] == 9217


def test_released_vision_positions_and_image_spans():
  assert "num_multi_query_heads" not in preset("cogvlm-chat-17b").to_hf_dict()
  assert preset("cogvlm-chat-17b").to_hf_dict()["vision_config"]["num_positions"] == 1226
  assert preset("cogvlm-base-224").to_hf_dict()["vision_config"]["num_positions"] == 257
  assert preset("cogvlm2-llama3-chat-19b").to_hf_dict()["vision_config"]["num_positions"] == 9217
  assert preset("cogvlm-chat-17b").image_span_length == 1227  # 490 px: 35^2 + boi + eoi
  assert preset("cogvlm-base-490").image_span_length == 1227
  assert preset("cogvlm2-llama3-chat-19b").image_span_length == 2306  # 1344 px: 48^2 + 2
