"""QLoRA (`train.lora.base_dtype`, modeling/quantize.py): the int8 / int4 base forward close to
the float model, quantized kernels sharded like the float ones with only the adapters
training, and a QLoRA run from a float checkpoint resuming exactly and merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cogvlm_jax import checkpoint
from cogvlm_jax.config import preset
from cogvlm_jax.convert.__main__ import main as convert_main
from cogvlm_jax.modeling import lora, quantize
from cogvlm_jax.training import loop, run_config
from cogvlm_jax.training.state import build_setup, make_model
from tests.helpers import max_diff, prompt_batch, save_random_base, tiny_config

ALL = list(lora.TARGETS)
# max |logits - fp32 logits| / max |fp32 logits| on the tiny presets (measured: int8 0.013-
# 0.025, int4 0.24-0.44; int4 per channel is coarse, NF4 / small groups would do better).
REL_TOL = {"int8": 0.05, "int4": 0.6}


def _spec(base_dtype="", **kw):
  return lora.LoraSpec.from_dict(dict(rank=2, alpha=4.0, targets=ALL, base_dtype=base_dtype,
                                      **kw))


def _quantized_model(cfg, qtype):
  """The LoRA model of `_spec()` with its base in `qtype` (int4: not a train.lora option)."""
  return lora.quantize_base(make_model(cfg, 0, _spec()), qtype)


@nnx.jit
def _forward(model, ids, types, images, att):
  return model(ids, types, images, att)


def _logits(model, cfg):
  ids, types, att, images, _ = prompt_batch(cfg, np.random.default_rng(1))
  return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images),
                             jnp.asarray(att))), att


def _random_adapters(model):
  rng = np.random.default_rng(0)
  lora.set_adapters(model, {p: rng.normal(0, 0.2, v.shape).astype(np.float32)
                            for p, v in lora.adapters_flat(model).items()})


@pytest.mark.slow  # ~30 s each on 2 shared cores: three models built and compiled
@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
def test_quantized_base_forward_is_close_to_the_float_model(name):
  cfg = preset(name)
  want, att = _logits(make_model(cfg, 0, _spec()), cfg)
  for qtype, tol in REL_TOL.items():
    model = _quantized_model(cfg, qtype)
    layout = quantize.layout_of(model)
    # every adaptable projection, quantized (3 kernels per fused QKV); the rest stays float
    assert len(layout) == sum(len(u.kernels) for u in lora.lora_units(cfg, ALL))
    assert ("lm_head",) not in layout
    got, _ = _logits(model, cfg)
    rel = max_diff(got, want, att) / np.abs(want).max()
    assert 1e-4 < rel <= tol, (qtype, rel)


def test_an_unknown_base_dtype_is_refused_by_name(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  for bad in ("nf4", "int4"):  # int4: see lora.BASE_DTYPES
    config.train.lora = dict(rank=2, targets=["vit_mlp"], base_dtype=bad)
    with pytest.raises(run_config.ConfigError,
                       match=r"train\.lora: base_dtype must be one of \['', 'int8'\]"):
      run_config.resolve_config(config)


def test_lora_on_a_quantized_base_equals_the_merged_dequantized_model():
  cfg = preset("tiny-cogvlm2")
  model = make_model(cfg, 0, _spec("int8"))
  _random_adapters(model)
  got, att = _logits(model, cfg)
  flat = checkpoint.flatten(nnx.to_pure_dict(nnx.state(model)))
  base = quantize.dequantize_flat(flat, quantize.layout_of(model))
  merged = lora.merge_flat(cfg, _spec(), base)
  plain = make_model(cfg, 0)
  nnx.update(plain, checkpoint.unflatten(merged))
  assert max_diff(_logits(plain, cfg)[0], got, att) <= 1e-5


def test_quantized_kernels_keep_their_shardings_and_only_adapters_train(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  run = run_config.resolve_config(config)
  assert run.mesh.shape["fsdp"] == 8
  setups = {q: build_setup(run.model_config, "full", config.optim, 10, run.mesh,
                           frozen_dtype="bfloat16", lora=_spec(q, dropout=0.1))
            for q in ("", "int8")}
  float_sh = checkpoint.flatten(setups[""].shardings.frozen)
  float_axes = {p: s.spec for p, s in float_sh.items()}
  for qtype, dtype in (("int8", jnp.int8),):
    setup = setups[qtype]
    params = checkpoint.flatten(setup.abstract.params)
    frozen = checkpoint.flatten(setup.abstract.frozen)
    shard = checkpoint.flatten(setup.shardings.frozen)
    assert params and all(lora.is_lora_path(p) for p in params)
    assert checkpoint.flatten(setups[""].abstract.params).keys() == params.keys()
    opt_size = sum(x.size for x in jax.tree.leaves(setup.abstract.opt_state))
    assert 2 * sum(x.size for x in params.values()) <= opt_size  # moments: adapters only
    assert opt_size <= 2 * sum(x.size for x in params.values()) + 8
    quantized = [p[:-1] for p in frozen if p[-1] == "qvalue"]
    assert len(quantized) == 24
    for kernel in quantized:
      q, s = frozen[kernel + ("qvalue",)], frozen[kernel + ("qscale",)]
      assert q.dtype == dtype and s.dtype == jnp.float32 and kernel not in frozen
      assert q.shape == checkpoint.flatten(setups[""].abstract.frozen)[kernel].shape
      # the int kernel shards exactly as the float kernel did (the scale: by its own
      # logical axes, the kernel's layer and output axes)
      assert shard[kernel + ("qvalue",)].spec == float_axes[kernel], kernel
      lead = 1 if kernel[0] == "layers" or kernel[:2] == ("vision", "layers") else 0
      assert s.shape[:lead] == q.shape[:lead] and s.shape[lead:] == q.shape[-(s.ndim - lead):]
    qkv = ("layers", "self_attn", "vision_expert_query_key_value", "query")
    assert tuple(shard[qkv + ("qvalue",)].spec)[:2] == (None, "fsdp")
    # other frozen weights as with a float base: embeddings, norms in bf16
    assert frozen[("embed_tokens",)].dtype == jnp.bfloat16
    assert setup.num_params() == setups[""].num_params()


@pytest.mark.slow  # minutes on 2 shared cores: three short runs and their compiles
def test_qlora_run_from_a_float_checkpoint_resumes_exactly_and_merges(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=4, log_every=1)
  run = run_config.resolve_config(config)
  base = save_random_base(config, str(tmp_path / "base"))  # another seed than the run's
  config.train.init_from = str(tmp_path / "base")
  config.train.lora = dict(rank=4, alpha=8.0, dropout=0.1, targets=ALL, base_dtype="int8")

  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), evaluate_at_end=False)
  loop.train_and_evaluate(config, str(tmp_path / "split"), stop_after_steps=2,
                          evaluate_at_end=False)
  resumed = loop.train_and_evaluate(config, str(tmp_path / "split"), evaluate_at_end=False)
  assert sorted(straight["losses"]) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in straight["losses"].values())
  for step in (3, 4):
    assert resumed["losses"][step] == straight["losses"][step]

  step_dir = checkpoint.resolve_step_dir(str(tmp_path / "straight"))
  stored = checkpoint.params_metadata(step_dir)
  flat = checkpoint.restore_numpy(step_dir, list(stored))
  split = checkpoint.restore_numpy(checkpoint.resolve_step_dir(str(tmp_path / "split")),
                                   list(stored))
  for p, v in flat.items():
    np.testing.assert_array_equal(split[p], v, err_msg=str(p))
  # the stored base: int8 kernels = the float checkpoint's, quantized; the rest as loaded
  qkv = ("layers", "self_attn", "language_expert_query_key_value", "key")
  assert flat[qkv + ("qvalue",)].dtype == np.int8 and qkv not in flat
  want_q, want_s = quantize.quantize_array(base[qkv], 1, 1, "int8")
  np.testing.assert_array_equal(flat[qkv + ("qvalue",)], np.asarray(want_q))
  np.testing.assert_array_equal(flat[qkv + ("qscale",)], np.asarray(want_s))
  np.testing.assert_array_equal(flat[("embed_tokens",)], base[("embed_tokens",)])
  assert np.abs(flat[("layers", "mlp", "language_mlp", "lora_gate_proj", "b_gate_proj")]
                ).max() > 0  # the adapters trained

  # merge-lora: the dequantized base + the adapters, a plain float checkpoint
  assert convert_main(["merge-lora", "--src", str(tmp_path / "straight"), "--dst",
                       str(tmp_path / "merged"), "--quiet"]) == 0
  cfg = run.model_config
  spec = lora.LoraSpec.from_dict(config.train.lora)
  model = make_model(cfg, 0, spec)
  nnx.update(model, checkpoint.unflatten(flat))
  got, att = _logits(model, cfg)
  plain = make_model(cfg, 0)
  nnx.update(plain, checkpoint.load_params(str(tmp_path / "merged")))
  assert max_diff(_logits(plain, cfg)[0], got, att) <= 1e-5
