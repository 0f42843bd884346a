"""training/run_config.py: a run config is checked once, before anything is built, and every
refusal is one line naming the field."""

import pytest

from cogvlm_jax.sharding import DEFAULT_RULES
from cogvlm_jax.training import run_config
from configs import base, demo


def _demo():
  return demo.get_config()


def test_the_demo_config_resolves_with_the_default_rules():
  run = run_config.resolve_config(_demo())
  assert run.rules == DEFAULT_RULES
  assert len(run.phases) == 1 and run.model_config.hidden_size == 128


def test_every_field_of_the_demo_is_a_field_of_the_base():
  base_keys = set(base.get_config().train) | set(base.get_config().data)
  assert set(_demo().train) | set(_demo().data) == base_keys


@pytest.mark.parametrize("field, value, message", [
    ("train.max_checkpoints", 0, r"train\.max_checkpoints must be an integer >= 1, got 0"),
    ("train.max_checkpoints", -1, r"train\.max_checkpoints must be an integer >= 1"),
    ("train.steps", 0, r"train\.steps must be an integer >= 1"),
    ("data.num_threads", -2, r"data\.num_threads must be an integer >= 1, got -2"),
    ("data.num_workers", -1, r"data\.num_workers must be an integer >= 0"),
    ("optim.lr", -1e-3, r"optim\.lr must be a number > 0"),
    ("optim.warmup_steps", 5000, r"optim\.warmup_steps must be <= train\.steps \(\d+\)"),
    ("optim.b2", 1.5, r"optim\.b2 must be in \[0, 1\)"),
    ("data.max_bad_ratio", 2.0, r"data\.max_bad_ratio must be in \[0, 1\]"),
    ("train.host_data", "columns", r"train\.host_data must be 'records' or 'rows'"),
    ("data.source", "web", r"data\.source must be 'demo' or 'mixture'"),
    ("train.batch_size", 0, r"train\.batch_size \(0\) must be a positive multiple"),
    ("model.vision.patch_size", 0, r"model\.vision\.patch_size must be >= 1, got 0"),
    ("model.vision.image_size", 0, r"model\.vision\.image_size must be >= 1, got 0"),
    ("model.hidden_size", 0, r"model\.hidden_size must be >= 1, got 0"),
    ("model.num_hidden_layers", 0, r"model\.num_hidden_layers must be >= 1, got 0"),
])
def test_bad_numbers_are_refused_naming_the_field(field, value, message):
  config = _demo()
  section, _, name = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(run_config.ConfigError, match=message) as info:
    run_config.resolve_config(config)
  assert "\n" not in str(info.value)


def test_unknown_and_missing_fields_are_refused():
  config = _demo()
  config.train.unlock()  # as a config file could add it
  config.train.stpes = 10
  with pytest.raises(run_config.ConfigError, match=r"unknown setting 'train\.stpes'"):
    run_config.resolve_config(config)
  config = _demo()
  del config.train["z_loss"]
  with pytest.raises(run_config.ConfigError, match=r"lacks 'train\.z_loss'.*configs/base\.py"):
    run_config.resolve_config(config)


def test_sharding_rules_come_from_the_config():
  config = _demo()
  config.sharding_rules.mlp = None
  config.sharding_rules.embed = ("fsdp", "tensor")
  rules = dict(run_config.resolve_config(config).rules)
  assert rules["mlp"] is None and rules["embed"] == ("fsdp", "tensor")
  assert rules["heads"] == dict(DEFAULT_RULES)["heads"]
  config.sharding_rules.vocab = "pipeline"
  with pytest.raises(run_config.ConfigError, match=r"sharding_rules\.vocab: 'pipeline' is not"):
    run_config.resolve_config(config)


def test_a_mesh_larger_than_the_devices_is_refused():
  config = _demo()
  config.mesh.tensor = 64
  with pytest.raises(run_config.ConfigError, match=r"^mesh: "):
    run_config.resolve_config(config)


def test_a_tensor_axis_larger_than_the_heads_is_refused_before_building():
  config = _demo()  # 4 heads
  config.mesh.update(dict(data=1, fsdp=1, tensor=8))
  with pytest.raises(run_config.ConfigError,
                     match=r"model\.num_attention_heads \(4\) must be divisible by mesh "
                           r"tensor = 8 \(sharding_rules\.heads"):
    run_config.resolve_config(config)
