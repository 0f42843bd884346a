"""LoRA checkpoints at the boundaries: `convert from-peft` (a PEFT adapter folder + its base ->
a LoRA checkpoint), and every consumer of plain weights refusing a LoRA checkpoint with one
line pointing at merge-lora (to-hf, load_params / eval.py, train.init_from), while a LoRA
run of the same base and adapters takes it and one of another base or rank is refused by
name."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cogvlm_jax import checkpoint
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert import lora as lora_cli
from cogvlm_jax.convert.__main__ import main as convert_main
from cogvlm_jax.convert.safetensors_io import write_safetensors
from cogvlm_jax.modeling import lora
from cogvlm_jax.pretrained import from_pretrained
from cogvlm_jax.training import init_weights, run_config
from cogvlm_jax.training.run_config import ConfigError
from cogvlm_jax.training.state import build_setup, init_train_state, make_model
from tests.helpers import tiny_config

TARGETS = ["language_expert_query_key_value", "vision_mlp", "vit_dense"]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
  """(folder of `convert from-peft`'s LoRA checkpoint, its base checkpoint, the PEFT
  tensors, the model config): a tiny base and random rank-2 adapters."""
  root = tmp_path_factory.mktemp("lora_cli")
  cfg = CogVLMConfig.from_dict(tiny_config(str(root / "data")).model)
  base = nnx.to_pure_dict(nnx.state(make_model(cfg, 3)))
  checkpoint.save_params(str(root / "base"), base, cfg)
  spec = lora.LoraSpec.from_dict(dict(rank=2, alpha=4.0, targets=TARGETS))
  units = lora.lora_units(cfg, TARGETS)
  rng = np.random.default_rng(0)
  model = make_model(cfg, 3, spec)
  flat = {p: rng.normal(0, 0.2, v.shape).astype(np.float32)
          for p, v in lora.adapters_flat(model).items()}
  os.makedirs(root / "peft")
  tensors = lora.to_peft_tensors(units, flat)
  write_safetensors(str(root / "peft" / lora.ADAPTER_WEIGHTS), tensors, metadata={"format": "pt"})
  with open(root / "peft" / lora.ADAPTER_CONFIG, "w") as f:
    json.dump(lora.peft_config(spec, units), f)
  assert convert_main(["from-peft", "--src", str(root / "peft"), "--base", str(root / "base"),
                       "--dst", str(root / "lora"), "--quiet"]) == 0
  return str(root / "lora"), str(root / "base"), flat, cfg


def test_from_peft_writes_the_base_and_the_adapters(lora_checkpoint, tmp_path):
  folder, base, adapters, cfg = lora_checkpoint
  stored = checkpoint.params_metadata(folder)
  flat = checkpoint.restore_numpy(folder, list(stored))
  base_flat = checkpoint.restore_numpy(base, list(checkpoint.params_metadata(base)))
  for p, v in adapters.items():
    np.testing.assert_array_equal(flat[p], v, err_msg=str(p))
  for p, v in base_flat.items():
    np.testing.assert_array_equal(flat[p], v, err_msg=str(p))
  assert checkpoint.lora_of(folder)["rank"] == 2
  # merge-lora of it: W + alpha/r * A @ B, as merge_flat computes
  assert convert_main(["merge-lora", "--src", folder, "--dst", str(tmp_path / "m"),
                       "--quiet"]) == 0
  merged = checkpoint.flatten(checkpoint.load_params(str(tmp_path / "m")))
  want = lora.merge_flat(cfg, lora.LoraSpec.from_dict(checkpoint.lora_of(folder)), flat)
  for p, v in want.items():
    np.testing.assert_allclose(np.asarray(merged[p]), v, rtol=0, atol=1e-6, err_msg=str(p))
  # to-peft gives the adapter back, tensor for tensor
  assert convert_main(["to-peft", "--src", folder, "--dst", str(tmp_path / "p"),
                       "--quiet"]) == 0
  _, again = lora_cli.read_peft_adapter(str(tmp_path / "p"), cfg)
  for p, v in adapters.items():
    np.testing.assert_array_equal(again[p].reshape(v.shape), v, err_msg=str(p))


def test_plain_weight_consumers_refuse_a_lora_checkpoint(lora_checkpoint, tmp_path, capsys):
  folder = lora_checkpoint[0]
  assert convert_main(["to-hf", "--src", folder, "--dst", str(tmp_path / "hf"),
                       "--quiet"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "merge-lora --src" in err and "LoRA training run" in err
  for load in (checkpoint.load_params, from_pretrained):  # eval.py / chat: from_pretrained
    with pytest.raises(ValueError, match=r"is a LoRA training run .*convert merge-lora"):
      load(folder)


def _setup_state(tmp_path, **lora_kw):
  config = tiny_config(str(tmp_path / "data"))
  config.train.lora = dict(lora_kw) if lora_kw else None
  run = run_config.resolve_config(config)
  setup = build_setup(run.model_config, "full", config.optim, 4, run.mesh,
                      lora=config.train.lora)
  return setup, init_train_state(setup, 0)


@pytest.mark.slow  # ~30-70 s on 2 shared cores: three train states initialised
def test_init_from_a_lora_checkpoint(lora_checkpoint, tmp_path):
  folder, _, adapters, _ = lora_checkpoint
  setup, state = _setup_state(tmp_path)
  with pytest.raises(ConfigError, match=r"train.init_from: .*LoRA training run .*merge-lora"):
    init_weights.load_initial_weights(state, setup, folder)
  setup, state = _setup_state(tmp_path, rank=4, alpha=4.0, targets=TARGETS)
  with pytest.raises(ConfigError, match=r"LoRA run of other adapters: train.lora rank 2 != 4"):
    init_weights.load_initial_weights(state, setup, folder)
  # the same adapters on the same base: taken, adapters included
  setup, state = _setup_state(tmp_path, rank=2, alpha=4.0, targets=TARGETS, base_dtype="int8")
  state = init_weights.load_initial_weights(state, setup, folder)
  params = checkpoint.flatten(jax.device_get(state.params))
  for p, v in adapters.items():
    np.testing.assert_array_equal(params[p], v, err_msg=str(p))


def test_init_from_a_lora_checkpoint_of_another_base_is_refused(lora_checkpoint, tmp_path):
  folder = lora_checkpoint[0]
  config = tiny_config(str(tmp_path / "data"))
  config.model.intermediate_size = 64
  config.train.lora = dict(rank=2, alpha=4.0, targets=TARGETS)
  run = run_config.resolve_config(config)
  setup = build_setup(run.model_config, "full", config.optim, 4, run.mesh,
                      lora=config.train.lora)
  with pytest.raises(ConfigError, match=r"LoRA run of another base model: intermediate_size "
                                        r"128 != 64"):
    init_weights.load_initial_weights(None, setup, folder)  # refused before the state is read
