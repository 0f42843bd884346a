"""LoRA (`train.lora`, modeling/lora.py, convert/lora.py): PEFT parity on the PyTorch
reference both ways, merge equals unmerged, only adapters train (sharded like their base),
deterministic dropout, and a LoRA run from a checkpoint through merge-lora / to-peft."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from cogvlm_jax import checkpoint
from cogvlm_jax.convert import lora as lora_cli
from cogvlm_jax.convert.__main__ import main as convert_main
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.hf import state_to_hf
from cogvlm_jax.modeling import lora
from cogvlm_jax.pretrained import abstract_model
from cogvlm_jax.training import loop, run_config
from cogvlm_jax.training.state import build_setup, make_model
from tests.helpers import (TOL, max_diff, prompt_batch, reference_pair, save_random_base,
                           tiny_config, torch_logits)
from tests.reference import modeling_cogvlm_ref as ref

VARIANTS = ["tiny-cogvlm", "tiny-cogvlm2"]
ALL = list(lora.TARGETS)


def _logits(model, cfg, seed=1):
  ids, types, att, images, rows = prompt_batch(cfg, np.random.default_rng(seed))
  out = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(att))
  return np.asarray(out), (ids, types, att, images, rows)


def _peft_model(torch_model, modules, rank=4, alpha=8.0):
  """PEFT LoRA on the reference with random A and B (init_lora_weights=False), eval mode."""
  torch.manual_seed(3)
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules,
                           init_lora_weights=False)
  return peft.get_peft_model(torch_model, config).eval()


def _random_adapters(model, seed=0):
  """Every adapter of a LoRA model set to N(0, 0.2) (b starts at 0: no effect to test)."""
  rng = np.random.default_rng(seed)
  flat = {p: rng.normal(0, 0.2, v.shape).astype(np.float32)
          for p, v in lora.adapters_flat(model).items()}
  lora.set_adapters(model, flat)
  return flat


def _plain_model(cfg, flat):
  """The model without LoRA holding `flat` weights (e.g. merged ones)."""
  graphdef, abstract = abstract_model(cfg)
  nnx.replace_by_pure_dict(abstract, checkpoint.unflatten(flat))
  return nnx.merge(graphdef, abstract)


def _write_peft_folder(folder, spec, units, flat):
  os.makedirs(folder)
  from cogvlm_jax.convert.safetensors_io import write_safetensors
  write_safetensors(os.path.join(folder, lora.ADAPTER_WEIGHTS), lora.to_peft_tensors(units, flat),
                    metadata={"format": "pt"})
  with open(os.path.join(folder, lora.ADAPTER_CONFIG), "w") as f:
    json.dump(lora.peft_config(spec, units), f)


def _load_peft(torch_model, folder):
  # The original HF model is a transformers PreTrainedModel (GenerationMixin), which
  # PeftModelForCausalLM (task_type CAUSAL_LM) reads this attribute of; the reference is not.
  torch_model.prepare_inputs_for_generation = lambda *a, **k: None
  return peft.PeftModel.from_pretrained(torch_model, folder).eval()


@pytest.mark.slow  # ~15-35 s each on 2 cores: the reference, PEFT and two compiles
@pytest.mark.parametrize("name", VARIANTS)
def test_peft_on_the_reference_imports_into_ours(name, tmp_path):
  cfg, torch_model, model = reference_pair(name)
  modules = sorted(m for u in lora.lora_units(cfg, ALL) for m in u.hf_modules)
  peft_model = _peft_model(torch_model, modules)
  peft_model.save_pretrained(str(tmp_path / "adapter"))  # PEFT's own files
  spec, flat = lora_cli.read_peft_adapter(str(tmp_path / "adapter"), cfg)
  assert spec.targets == tuple(ALL) and spec.rank == 4 and spec.scale == 2.0
  lora.apply_lora(model, spec)
  lora.set_adapters(model, flat)
  got, (ids, types, att, images, rows) = _logits(model, cfg)
  want, _ = torch_logits(peft_model, ids, types, att, images, rows)
  with peft_model.disable_adapter():
    base, _ = torch_logits(peft_model, ids, types, att, images, rows)
  assert max_diff(base, want, att) > 0.1  # the adapters matter
  assert max_diff(got, want, att) <= TOL


@pytest.mark.slow  # ~15-35 s each on 2 cores: the reference, PEFT and two compiles
@pytest.mark.parametrize("name", VARIANTS)
def test_our_adapters_load_in_peft_on_the_reference(name, tmp_path):
  cfg, torch_model, model = reference_pair(name)
  spec = lora.LoraSpec.from_dict(dict(rank=3, alpha=6.0, dropout=0.1, targets=ALL))
  lora.apply_lora(model, spec)
  _random_adapters(model)
  units = lora.lora_units(cfg, ALL)
  _write_peft_folder(str(tmp_path / "adapter"), spec, units, lora.adapters_flat(model))
  peft_model = _load_peft(torch_model, str(tmp_path / "adapter"))
  got, (ids, types, att, images, rows) = _logits(model, cfg)
  # PeftModelForCausalLM.forward takes (input_ids, attention_mask, ...) positionally; the
  # wrapped model (LoRA layers injected in place) takes the reference's arguments.
  want, _ = torch_logits(peft_model.get_base_model(), ids, types, att, images, rows)
  assert max_diff(got, want, att) <= TOL
  # PEFT's merge agrees with ours: the merged reference vs our merged weights.
  merged = lora.merge_flat(cfg, spec, checkpoint.flatten(nnx.to_pure_dict(nnx.state(model))))
  plain = _plain_model(cfg, merged)
  plain_logits, _ = _logits(plain, cfg)
  assert max_diff(plain_logits, got, att) <= TOL
  merged_ref, _ = torch_logits(peft_model.merge_and_unload(), ids, types, att, images, rows)
  assert max_diff(plain_logits, merged_ref, att) <= TOL


@pytest.mark.slow  # ~20-40 s on 2 shared cores (eager forwards)
@pytest.mark.parametrize("name", VARIANTS)
def test_merged_weights_equal_the_unmerged_model(name):
  cfg, _, model = reference_pair(name)
  base_logits, _ = _logits(model, cfg)
  spec = lora.LoraSpec.from_dict(dict(rank=2, alpha=4.0, targets=["vision_expert_dense",
                                                                  "language_mlp", "vit_mlp"]))
  lora.apply_lora(model, spec)
  zero, _ = _logits(model, cfg)
  # b = 0 at init: the base model (XLA may fuse the extra zero term differently: ~1e-7)
  np.testing.assert_allclose(zero, base_logits, atol=1e-6, rtol=0)
  _random_adapters(model)
  unmerged, (_, _, att, _, _) = _logits(model, cfg)
  assert max_diff(unmerged, base_logits, att) > 0.1
  merged = lora.merge_flat(cfg, spec, checkpoint.flatten(nnx.to_pure_dict(nnx.state(model))))
  assert not any(lora.is_lora_path(p) for p in merged)
  plain = _plain_model(cfg, merged)
  assert max_diff(_logits(plain, cfg)[0], unmerged, att) <= 1e-5


def test_bad_lora_settings_are_refused_by_name(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  for lora_cfg, words in [
      (dict(rank=4, targets=["vision_expert_qkv"]), ["unknown targets ['vision_expert_qkv']",
                                                     "valid:", "vit_mlp"]),
      (dict(rank=0, targets=["vit_mlp"]), ["rank must be an integer >= 1"]),
      (dict(rank=2, dropout=1.0, targets=["vit_mlp"]), ["dropout must be in [0, 1)"]),
      (dict(rank=2, targets=[]), ["targets must be a non-empty list"]),
      (dict(rank=2, size=3, targets=["vit_mlp"]), ["unknown keys ['size']"]),
  ]:
    config.train.lora = lora_cfg
    with pytest.raises(run_config.ConfigError) as e:
      run_config.resolve_config(config)
    assert all(w in str(e.value) for w in words), str(e.value)
  config.train.lora = dict(rank=2, targets=["vit_mlp"])
  config.recipe = "stage1"
  with pytest.raises(run_config.ConfigError, match="train.lora needs recipe"):
    run_config.resolve_config(config)


def test_only_adapters_train_sharded_like_their_base(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  config.train.lora = dict(rank=4, alpha=8, targets=ALL)
  run = run_config.resolve_config(config)
  assert run.mesh.shape["fsdp"] == 8
  setup = build_setup(run.model_config, "full", config.optim, 10, run.mesh,
                      lora=config.train.lora)
  params = checkpoint.flatten(setup.abstract.params)
  frozen = checkpoint.flatten(setup.abstract.frozen)
  assert params and all(lora.is_lora_path(p) for p in params)
  assert not any(lora.is_lora_path(p) and p[-1] != "layer_index" for p in frozen)
  # AdamW moments only for the adapters: the optimizer state is 2x their size (+ counts).
  opt_size = sum(x.size for x in jax.tree.leaves(setup.abstract.opt_state))
  adapter_size = sum(x.size for x in params.values())
  assert 2 * adapter_size <= opt_size <= 2 * adapter_size + 8
  shard = checkpoint.flatten(setup.shardings.params)
  base = checkpoint.flatten(setup.shardings.frozen)
  qkv = ("layers", "self_attn", "vision_expert_query_key_value")
  assert shard[qkv + ("lora", "a")].spec[:2] == base[qkv + ("query",)].spec[:2] == (None, "fsdp")
  dense = ("layers", "self_attn", "vision_expert_dense")
  assert tuple(shard[dense + ("lora", "b_kernel")].spec)[-1] == "fsdp"
  assert tuple(base[dense + ("kernel",)].spec)[-1] == "fsdp"


@pytest.mark.slow  # ~25 s on 2 shared cores (five eager forwards)
def test_dropout_is_deterministic_under_its_key():
  cfg, _, model = reference_pair("tiny-cogvlm")
  spec = lora.LoraSpec.from_dict(dict(rank=2, dropout=0.5, targets=["language_mlp",
                                                                    "vit_query_key_value"]))
  lora.apply_lora(model, spec)
  _random_adapters(model)
  plain, _ = _logits(model, cfg)
  runs = []
  for seed in (0, 0, 1):
    with lora.dropout_rng(jax.random.key(seed)):
      runs.append(_logits(model, cfg)[0])
  np.testing.assert_array_equal(runs[0], runs[1])
  assert np.abs(runs[0] - runs[2]).max() > 1e-3
  assert np.abs(runs[0] - plain).max() > 1e-3
  np.testing.assert_array_equal(_logits(model, cfg)[0], plain)  # no key: no dropout


# ---- a LoRA run end to end -----------------------------------------------------------------


def _run_model(workdir):
  """(model config, spec, the LoRA model of a run's latest step, its flat weights)."""
  step = checkpoint.resolve_step_dir(workdir)
  cfg = checkpoint.read_model_config(step)
  spec = lora.LoraSpec.from_dict(checkpoint.read_checkpoint_config(step)["train"]["lora"])
  flat = checkpoint.restore_numpy(step, list(checkpoint.params_metadata(step)))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_model(cfg, 0, spec)))
  nnx.replace_by_pure_dict(state, checkpoint.unflatten(flat))
  model = nnx.merge(graphdef, state)
  return cfg, spec, model, flat


@pytest.mark.slow
def test_lora_run_from_a_checkpoint_resumes_exactly_and_exports(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=4, log_every=1)
  base = save_random_base(config, str(tmp_path / "base"))  # another seed than the run's
  config.train.init_from = str(tmp_path / "base")
  config.train.lora = dict(rank=4, alpha=8.0, dropout=0.1, targets=ALL)

  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), evaluate_at_end=False)
  loop.train_and_evaluate(config, str(tmp_path / "split"), stop_after_steps=2,
                          evaluate_at_end=False)
  resumed = loop.train_and_evaluate(config, str(tmp_path / "split"), evaluate_at_end=False)
  assert sorted(resumed["losses"]) == [3, 4]
  for step in (3, 4):
    assert resumed["losses"][step] == straight["losses"][step]
  cfg, spec, model, flat = _run_model(str(tmp_path / "straight"))
  _, _, _, flat_split = _run_model(str(tmp_path / "split"))
  for p, v in flat.items():
    np.testing.assert_array_equal(flat_split[p], v, err_msg=str(p))
    if not lora.is_lora_path(p):  # the base is frozen: exactly the starting weights
      np.testing.assert_array_equal(v, base[p], err_msg=str(p))
  b = flat[("layers", "mlp", "language_mlp", "lora_gate_proj", "b_gate_proj")]
  assert np.abs(b).max() > 0  # the adapters trained (b starts at 0)
  config.train.lora.alpha = 4.0  # resuming with other LoRA settings is another run
  with pytest.raises(run_config.ConfigError, match=r"train\.lora .*'alpha': 8\.0"):
    loop.train_and_evaluate(config, str(tmp_path / "split"), evaluate_at_end=False)

  # merge-lora -> a plain checkpoint computing what the LoRA model computes.
  assert convert_main(["merge-lora", "--src", str(tmp_path / "straight"), "--dst",
                       str(tmp_path / "merged"), "--quiet"]) == 0
  got, (ids, types, att, images, rows) = _logits(model, cfg)
  merged = _plain_model(cfg, checkpoint.flatten(checkpoint.load_params(str(tmp_path / "merged"))))
  assert max_diff(_logits(merged, cfg)[0], got, att) <= 1e-5

  # to-peft -> PEFT loads it on the reference holding the run's base weights.
  assert convert_main(["to-peft", "--src", str(tmp_path / "straight"), "--dst",
                       str(tmp_path / "peft"), "--quiet"]) == 0
  base_state = nnx.state(_plain_model(cfg, {p: v for p, v in flat.items()
                                            if not lora.is_lora_path(p)}))
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  torch_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                               state_to_hf(cfg, base_state).items()})
  peft_model = _load_peft(torch_model, str(tmp_path / "peft"))
  want, _ = torch_logits(peft_model.get_base_model(), ids, types, att, images, rows)
  assert max_diff(got, want, att) <= TOL
  # A LoRA run's checkpoint is refused by to-hf (merge it first), by parameter name.
  assert convert_main(["to-hf", "--src", str(tmp_path / "straight"), "--dst",
                       str(tmp_path / "hf"), "--quiet"]) == 1


@pytest.mark.parametrize("name,total_min", [("cogvlm_lora_sft.py", 17e9),
                                            ("cogvlm2_lora_sft.py", 19e9)])
def test_lora_recipe_configs_are_real_size_and_valid(name, total_min):
  import importlib.util

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("cfg_" + name[:-3],
                                                os.path.join(root, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for source in config.data.mixture.values():
    source.update({k: f"/data/{k}" for k in ("json", "images") if k in source})
  model_cfg = CogVLMConfig.from_dict(config.model)
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
  run_config.validate_config(config, model_cfg, mesh)
  setup = build_setup(model_cfg, config.recipe, config.optim, config.train.steps, mesh,
                      frozen_dtype=config.train.frozen_dtype, lora=config.train.lora)
  trainable, total = setup.num_params()
  assert total > total_min and 1e7 < trainable < 2e8, (trainable, total)  # adapters only
  assert {x.dtype for p, x in checkpoint.flatten(setup.abstract.frozen).items()
          if p[-1] not in ("inv_freq", "layer_index")} == {jnp.dtype(jnp.bfloat16)}
