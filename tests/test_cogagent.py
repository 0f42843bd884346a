"""CogAgent: the Flax model against the PyTorch reference written from the spec (original
parameter names), fp32, tiny config; its config.json both ways, conversion, sharding, prompts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogvlm_jax.config import CogVLMConfig, CrossVisionConfig, preset
from cogvlm_jax.convert.hf import CheckpointMismatch, hf_to_state, state_to_hf
from cogvlm_jax.convert.mapping import tensor_rules
from cogvlm_jax.generate import generate
from cogvlm_jax.modeling.cogagent import CogAgentCache, CogAgentForCausalLM
from cogvlm_jax.modeling.cogvlm import build_position_ids
from cogvlm_jax.modeling.kv_cache import KVCache
from cogvlm_jax.modeling.cross_vision import apply_rope_2d, rope_2d_tables
from cogvlm_jax.pretrained import abstract_model, create_model, from_pretrained
from cogvlm_jax.sharding import activation_sharding, make_mesh, state_shardings
from cogvlm_jax.tokenization import (build_conversation_input_ids, collate,
                                     cogagent_history_to_prompt, load_tokenizer)
from tests.helpers import (TOL, cogagent_reference_pair, cogagent_torch_forward, max_diff,
                           write_hf_folder)
from tests.reference import modeling_cogagent_ref as ref


@pytest.fixture(scope="module")
def pair():
  return cogagent_reference_pair()


def _picture(seed, size=40):
  return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def _batch(sp_dir, cfg, prompts):
  """Collated (left-padded) model inputs of [(query, history, template, image seed)]."""
  tok = load_tokenizer(sp_dir)
  samples = [build_conversation_input_ids(tok, cfg, query=q, history=h, template_version=t,
                                          image=_picture(seed)) for q, h, t, seed in prompts]
  return collate(samples)


CASES = {
    "chat_single_image": [("Describe the image.", None, "chat", 0)],
    "left_padded_history": [
        ("What is on the mat?", [("Describe the image.", "A cat sat on the mat."),
                                 ("Is it red?", "No, it is blue.")], "chat", 1),
        ("How many dogs?", None, "chat", 2)],
    "vqa": [("What is in this image?", None, "vqa", 3),
            ("Two dogs?", [("ignored", "by vqa")], "vqa", 4)],
}


# ---- the model against the reference ----------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_hidden_states_match_reference(pair, sp_dir, case):
  cfg, torch_model, model, _ = pair
  batch = _batch(sp_dir, cfg, CASES[case])
  if case == "left_padded_history":
    assert batch["attention_mask"][1, 0] == 0  # the second row really is left-padded
  want, want_hidden = cogagent_torch_forward(torch_model, batch)
  out = model.forward(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
                      jnp.asarray(batch["images"]), jnp.asarray(batch["attention_mask"]),
                      cross_images=jnp.asarray(batch["cross_images"]),
                      output_hidden_states=True)
  attention = batch["attention_mask"]
  assert out.logits.dtype == jnp.float32
  assert max_diff(out.logits, want, attention) <= TOL
  assert len(out.hidden_states) == cfg.num_hidden_layers + 1 == len(want_hidden)
  for i, (got_h, want_h) in enumerate(zip(out.hidden_states, want_hidden)):
    assert max_diff(got_h, want_h, attention) <= TOL, f"hidden state {i}"


def test_towers_match_reference(pair):
  cfg, torch_model, model, _ = pair
  rng = np.random.default_rng(5)
  c = cfg.cross_vision
  low = rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  high = rng.normal(size=(2, c.image_size, c.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want_cross = torch_model.model.cross_vision(torch.from_numpy(high.transpose(0, 3, 1, 2)))
    want_low = torch_model.model.vision(torch.from_numpy(low.transpose(0, 3, 1, 2)))
  got_cross = model.encode_cross_images(jnp.asarray(high))
  assert got_cross.shape == (2, c.num_tokens, c.width)
  np.testing.assert_allclose(got_cross, want_cross.numpy(), atol=TOL, rtol=0)
  got_low = model.encode_images(jnp.asarray(low))
  assert got_low.shape == (2, cfg.image_span_length, cfg.hidden_size)
  np.testing.assert_allclose(got_low, want_low.numpy(), atol=TOL, rtol=0)


def test_rope_tables_follow_the_spec():
  """Interpolated positions t = k * pt / G, row dims first, adjacent pairs share a frequency,
  and the rotation turns pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); CLS untouched."""
  c = CrossVisionConfig(layers=2, width=32, head_width=8, patch_size=4, image_size=24,
                        compute_hidden_size=32)
  cos, _ = rope_2d_tables(c)
  angles = np.arccos(np.clip(np.asarray(cos), -1, 1))
  g, freqs = 6, 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
  r, col = 2, 5
  t = np.arange(g) / g * 16
  want = np.concatenate([np.repeat(t[r] * freqs, 2), np.repeat(t[col] * freqs, 2)])
  np.testing.assert_allclose(angles[r * g + col], np.abs(np.angle(np.exp(1j * want))),
                             atol=1e-5)
  x = np.random.default_rng(0).normal(size=(1, 1 + g * g, 1, 8)).astype(np.float32)
  cos_t, sin_t = rope_2d_tables(c)
  out = np.asarray(apply_rope_2d(jnp.asarray(x), cos_t, sin_t))
  np.testing.assert_array_equal(out[:, 0], x[:, 0])
  a = t[r] * freqs[0]
  p = 1 + r * g + col
  np.testing.assert_allclose(out[0, p, 0, :2], [x[0, p, 0, 0] * np.cos(a) - x[0, p, 0, 1] * np.sin(a),
                                                x[0, p, 0, 1] * np.cos(a) + x[0, p, 0, 0] * np.sin(a)],
                             atol=1e-5)


@pytest.mark.slow
def test_cross_module_matters_and_last_block_is_not_run(pair):
  """The parity tests could not fail on a cross path that changed nothing: it changes the
  logits; the stored last tower block does not (it is never run), the first one does."""
  cfg, _, model, tensors = pair
  rng = np.random.default_rng(6)
  span, c = cfg.image_span_length, cfg.cross_vision
  ids = jnp.asarray([[1] + [0] * span + list(rng.integers(3, 100, 6))], jnp.int32)
  types = jnp.asarray([[0] + [1] * span + [0] * 6], jnp.int32)
  low = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
  high = jnp.asarray(rng.normal(size=(1, c.image_size, c.image_size, 3)), jnp.float32)
  base = model(ids, types, images=low, cross_images=high)
  assert float(jnp.max(jnp.abs(model(ids, types, images=low, cross_images=-high) - base))) > 1e-2

  def perturbed(block):
    changed = dict(tensors)
    name = f"model.cross_vision.vit.model.blocks.{block}.attn.q_proj.weight"
    changed[name] = tensors[name] + 0.5
    graphdef, abstract = abstract_model(cfg)
    return nnx.merge(graphdef, hf_to_state(cfg, changed, abstract))

  np.testing.assert_array_equal(perturbed(c.layers - 1)(ids, types, images=low,
                                                        cross_images=high), base)
  assert float(jnp.max(jnp.abs(perturbed(0)(ids, types, images=low, cross_images=high)
                               - base))) > 1e-3


@pytest.mark.slow
def test_gradients_match_reference(pair, sp_dir):
  cfg, torch_model, model, _ = pair
  batch = _batch(sp_dir, cfg, CASES["left_padded_history"])
  attention = batch["attention_mask"]
  weights = np.random.default_rng(11).normal(
      size=attention.shape + (cfg.vocab_size,)).astype(np.float32) * attention[..., None]
  torch_model.zero_grad()
  logits = torch_model(*(torch.from_numpy(batch[k].astype(np.int64)) for k in
                         ("input_ids", "token_type_ids", "attention_mask")),
                       torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()),
                       torch.from_numpy(batch["cross_images"].transpose(0, 3, 1, 2).copy())).logits
  (logits * torch.from_numpy(weights)).sum().backward()
  torch_grads = {k: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
                 for k, p in torch_model.named_parameters()}
  for k, b in torch_model.named_buffers():  # RoPE tables and inv_freq are not trained
    torch_grads[k] = np.zeros(b.shape, np.float32)
  graphdef, abstract = abstract_model(cfg)
  want = {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(hf_to_state(cfg, torch_grads, abstract))}

  def loss_fn(m):
    out = m(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
            jnp.asarray(batch["images"]), jnp.asarray(attention),
            cross_images=jnp.asarray(batch["cross_images"]))
    return jnp.sum(out * weights)

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
  got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  buffers = {"layers/self_attn/inv_freq", "cross_vision/rope/freqs_cos",
             "cross_vision/rope/freqs_sin"}
  assert set(got) == set(want) - buffers
  for path, g in got.items():
    scale = max(1.0, float(np.abs(want[path]).max()))
    np.testing.assert_allclose(g, want[path], atol=2e-4 * scale, rtol=0, err_msg=path)
  for path in ("layers/cross_attn/key", "layers/cross_attn/query", "cross_vision/pos_embed",
               "cross_vision/blocks/attn/q_proj", "cross_vision/blocks/mlp/w3",
               "adapter/pos_embed", "layers/post_cross_attention_layernorm/weight"):
    assert np.abs(got[path]).max() > 0, path
  # The stored last block is never run: no gradient reaches it.
  assert np.abs(got["cross_vision/blocks/attn/q_proj"][-1]).max() == 0


@pytest.mark.slow
def test_jit_and_unscanned_match_eager(pair):
  cfg, _, model, tensors = pair
  rng = np.random.default_rng(7)
  span, c = cfg.image_span_length, cfg.cross_vision
  ids = jnp.asarray(np.concatenate([[[1] + [0] * span]] * 2, 0).tolist(), jnp.int32)
  ids = jnp.concatenate([ids, jnp.asarray(rng.integers(3, 100, (2, 5)), jnp.int32)], 1)
  types = jnp.zeros_like(ids).at[:, 1:1 + span].set(1)
  low = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  high = jnp.asarray(rng.normal(size=(2, c.image_size, c.image_size, 3)), jnp.float32)
  eager = model(ids, types, images=low, cross_images=high)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(a[0], a[1], images=a[2],
                                                        cross_images=a[3]))
  np.testing.assert_allclose(jitted(state, ids, types, low, high), eager, atol=1e-5)
  ucfg = cfg.replace(scan_layers=False)
  unscanned = nnx.merge(abstract_model(ucfg)[0], state)
  np.testing.assert_allclose(unscanned(ids, types, images=low, cross_images=high), eager,
                             atol=1e-5)


def test_refuses_what_the_original_cannot_run(pair):
  cfg, _, model, _ = pair
  from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM
  with pytest.raises(ValueError, match="builds CogAgentForCausalLM"):
    nnx.eval_shape(lambda: CogVLMForCausalLM(cfg, rngs=nnx.Rngs(0)))
  span, c = cfg.image_span_length, cfg.cross_vision
  ids = jnp.asarray([[1] + [0] * span + [5, 6]], jnp.int32)
  types = jnp.asarray([[0] + [1] * span + [0, 0]], jnp.int32)
  low = jnp.zeros((1, 16, 16, 3))
  high = jnp.zeros((1, c.image_size, c.image_size, 3))
  with pytest.raises(ValueError, match="cross_images"):
    model(ids, types, images=low)
  with pytest.raises(ValueError, match="no text-only mode"):
    model(ids[:, -2:], jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"cross_images must be \[batch, 24, 24, 3\]"):
    model(ids, types, images=low, cross_images=jnp.zeros((1, 28, 28, 3)))
  two_ids = jnp.concatenate([ids, jnp.asarray([[1] + [7] * (span + 2)], jnp.int32)])
  two_types = jnp.concatenate([types, jnp.zeros((1, span + 3), jnp.int32)])
  with pytest.raises(ValueError, match=r"rows \[1\] have none"):
    model(two_ids, two_types, images=jnp.zeros((2, 16, 16, 3)),
          cross_images=jnp.zeros((2, c.image_size, c.image_size, 3)))


# ---- decoding --------------------------------------------------------------------------


@pytest.mark.slow
def test_cached_steps_equal_the_full_forward(pair, sp_dir):
  """Prefill fills the self cache and every layer's cross K/V; a step then runs no tower."""
  cfg, _, model, _ = pair
  batch = {k: jnp.asarray(v) for k, v in _batch(sp_dir, cfg, CASES["vqa"]).items()}
  ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
  full = model(ids, types, batch["images"], mask, cross_images=batch["cross_images"])
  positions = build_position_ids(types, mask)
  prompt = ids.shape[1] - 1
  out = model.forward(ids[:, :prompt], types[:, :prompt], batch["images"], mask[:, :prompt],
                      positions[:, :prompt], cross_images=batch["cross_images"],
                      cache=KVCache.init(cfg, 2, prompt + 4), kv_len=prompt)
  c = cfg.cross_vision
  assert isinstance(out.cache, CogAgentCache)
  assert out.cache.cross_key.shape == (cfg.num_hidden_layers, 2, c.num_tokens,
                                       cfg.num_attention_heads, cfg.cross_head_dim)
  # The stored K/V are each layer's projection of the cross features.
  cross = model.encode_cross_images(batch["cross_images"])
  layer1_key = jnp.einsum("bnc,chd->bnhd", cross, model.layers.cross_attn.key[...][1])
  np.testing.assert_allclose(out.cache.cross_key[1], layer1_key, atol=1e-5)
  step = model.forward(ids[:, prompt:], jnp.zeros((2, 1), jnp.int32), None, mask[:, prompt:],
                       positions[:, prompt:], cache=out.cache, kv_len=prompt + 1)
  valid = np.asarray(mask[:, :prompt])
  assert max_diff(out.logits, full[:, :prompt], valid) <= TOL
  assert float(jnp.max(jnp.abs(step.logits[:, 0] - full[:, prompt]))) <= TOL
  np.testing.assert_array_equal(step.cache.cross_key, out.cache.cross_key)


@pytest.mark.slow
def test_greedy_generation_cache_equals_full_recompute_and_reference(pair, sp_dir):
  cfg, torch_model, model, _ = pair
  batch = _batch(sp_dir, cfg, CASES["left_padded_history"])
  new = 6
  got = generate(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                 batch["images"], cross_images=batch["cross_images"], max_new_tokens=new)
  # Without a cache: the whole sequence, both images, every step (the original's path too).
  ids, types, mask = (batch[k] for k in ("input_ids", "token_type_ids", "attention_mask"))
  done = np.zeros(len(ids), bool)
  forward = jax.jit(lambda s, i, t, m: nnx.merge(graphdef, s)(
      i, t, jnp.asarray(batch["images"]), m, cross_images=jnp.asarray(batch["cross_images"])))
  graphdef, state = nnx.split(model)
  for _ in range(new):
    nxt = np.asarray(jnp.argmax(forward(state, ids, types, mask)[:, -1], -1)).astype(np.int32)
    nxt = np.where(done, cfg.eos_token_id, nxt)
    done |= nxt == cfg.eos_token_id
    ids = np.concatenate([ids, nxt[:, None]], 1)
    types = np.concatenate([types, np.zeros_like(nxt[:, None])], 1)
    mask = np.concatenate([mask, np.ones_like(nxt[:, None])], 1)
  np.testing.assert_array_equal(got, ids)
  generated = got[:, -new:]
  assert (generated != cfg.eos_token_id).sum() >= new  # real tokens, not eos from the start
  want = ref.generate_greedy(
      torch_model, *(torch.from_numpy(batch[k].astype(np.int64)) for k in
                     ("input_ids", "token_type_ids", "attention_mask")),
      torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()),
      torch.from_numpy(batch["cross_images"].transpose(0, 3, 1, 2).copy()),
      max_new_tokens=new, eos_token_id=cfg.eos_token_id).numpy()
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)  # it may stop early
  assert (got[:, want.shape[1]:] == cfg.eos_token_id).all()
  with pytest.raises(ValueError, match="CogAgent generates with cross_images"):
    generate(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
             batch["images"], max_new_tokens=2)
  no_image = np.zeros_like(batch["token_type_ids"])  # row 1's span gone: refused, not run
  no_image[0] = batch["token_type_ids"][0]
  with pytest.raises(ValueError, match="every row needs an image span"):
    generate(model, batch["input_ids"], no_image, batch["attention_mask"], batch["images"],
             cross_images=batch["cross_images"], max_new_tokens=2)


# ---- conversion -----------------------------------------------------------------------


def test_round_trip_hf_jax_hf_is_bit_exact(pair):
  cfg, _, model, tensors = pair
  back = state_to_hf(cfg, nnx.state(model))
  assert list(back) == [r.hf_name for r in tensor_rules(cfg)]
  assert set(back) == set(tensors)
  for name, t in tensors.items():
    assert back[name].dtype == t.dtype and np.array_equal(back[name], t), name
  # Stored but never computed: written back all the same; exactly one copy of the RoPE tables.
  vit = "model.cross_vision.vit.model."
  for name in (f"{vit}blocks.{cfg.cross_vision.layers - 1}.mlp.w3.weight", f"{vit}norm.weight",
               f"{vit}head.weight", f"{vit}rope.freqs_cos"):
    assert name in back
  assert not any(".attn.rope." in name for name in back)


@pytest.mark.parametrize("name", [
    "model.layers.1.cross_attn.key_value.weight",
    "model.layers.0.post_cross_attention_layernorm.weight",
    "model.cross_vision.vit.model.rope.freqs_sin",
    "model.cross_vision.vit.model.head.weight",  # unused, but part of the original model
    "model.vision.pos_embed",
])
def test_missing_cross_tensor_is_refused_by_name(pair, name):
  cfg, _, _, tensors = pair
  bad = {k: v for k, v in tensors.items() if k != name}
  with pytest.raises(CheckpointMismatch, match="missing 1 tensors") as e:
    hf_to_state(cfg, bad, abstract_model(cfg)[1])
  assert name in str(e.value)


def test_misshaped_cross_tensors_are_refused_by_name(pair):
  cfg, _, _, tensors = pair
  for name in ("model.cross_vision.pos_embed", "model.layers.0.cross_attn.key_value.weight",
               "model.cross_vision.vit.model.blocks.2.mlp.w1.weight"):
    bad = dict(tensors)
    bad[name] = np.zeros(tensors[name].shape[:-1] + (tensors[name].shape[-1] + 1,), np.float32)
    with pytest.raises(CheckpointMismatch, match="expected") as e:
      hf_to_state(cfg, bad, abstract_model(cfg)[1])
    assert name in str(e.value)
  # A CogVLM checkpoint is not a CogAgent one (its cross tensors are missing, by name).
  cogvlm_like = {k: v for k, v in tensors.items()
                 if "cross" not in k and k != "model.vision.pos_embed"}
  with pytest.raises(CheckpointMismatch, match=r"missing \d+ tensors \['model.cross_vision"):
    hf_to_state(cfg, cogvlm_like, abstract_model(cfg)[1])


def test_from_pretrained_hf_folder(pair, tmp_path):
  cfg, torch_model, model, tensors = pair
  write_hf_folder(str(tmp_path / "hf"), cfg.to_hf_dict(torch_dtype="float32"), tensors,
                  shards=2)
  loaded = from_pretrained(str(tmp_path / "hf"))
  assert isinstance(loaded, CogAgentForCausalLM)
  assert loaded.config.cross_vision == cfg.cross_vision
  got = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(loaded))}
  want = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_convert_cli_both_ways_bf16(pair, tmp_path):
  """Streamed conversion (python -m cogvlm_jax.convert) of a bf16 CogAgent folder and back:
  the same tensors, bytes and config.json; the cogvlm_jax checkpoint loads as CogAgent."""
  import ml_dtypes

  from cogvlm_jax.convert.__main__ import main
  from cogvlm_jax.convert.safetensors_io import SafetensorsCheckpoint

  cfg, _, _, tensors = pair
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  hf = cfg.to_hf_dict(torch_dtype="bfloat16")
  write_hf_folder(str(tmp_path / "hf"), hf, tensors, shards=3)
  assert main(["to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax"),
               "--quiet"]) == 0
  assert main(["to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"),
               "--quiet"]) == 0
  back = SafetensorsCheckpoint(str(tmp_path / "back"))
  try:
    assert sorted(back.names()) == sorted(tensors)
    for name, t in tensors.items():
      got = back.get(name)
      assert got.dtype == t.dtype and got.shape == t.shape, name
      assert got.tobytes() == t.tobytes(), name
  finally:
    back.close()
  assert json.loads((tmp_path / "back" / "config.json").read_text()) == hf
  loaded = from_pretrained(str(tmp_path / "jax"))
  assert isinstance(loaded, CogAgentForCausalLM) and loaded.config.param_dtype == "bfloat16"


# ---- config ---------------------------------------------------------------------------


def test_released_config_json_gets_the_hard_coded_tower():
  hf = preset("cogagent-chat-18b").to_hf_dict()
  assert "cross_vision_config" not in hf  # released configs carry none
  assert (hf["cross_hidden_size"], hf["cross_compute_hidden_size"], hf["cross_image_size"]) == (
      1024, 1024, 1120)
  del hf["model_type"]  # detected from CogAgentConfig's own keys too
  cfg = CogVLMConfig.from_hf_dict(hf)
  c = cfg.cross_vision
  assert cfg.variant == "cogagent" and cfg.vision.image_size == 224
  assert (c.layers, c.width, c.head_width, c.num_heads, c.mlp_width) == (24, 1024, 64, 16, 2730)
  assert (c.grid_size, c.num_tokens, cfg.cross_head_dim, cfg.image_span_length) == (
      80, 6400, 32, 258)
  rules = tensor_rules(cfg)
  buffers = [r for r in rules if "rope" in r.hf_name or "inv_freq" in r.hf_name]
  assert len(rules) == 1831
  assert sum(int(np.prod(r.hf_shape)) for r in rules if r not in buffers) == 18_291_033_280
  assert preset("cogagent-vqa-18b").template_version == "chat_old"
  _, state = abstract_model(cfg)  # shapes only; buffers (RoPE tables) are not nnx.Params
  assert sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.filter_state(state, nnx.Param))) == 18_291_033_280


def test_small_tower_config_json_round_trip(tmp_path):
  cfg = preset("tiny-cogagent")
  hf = cfg.to_hf_dict()
  assert hf["cross_vision_config"] == dict(layers=3, width=32, head_width=8, mlp_ratio=2.6667,
                                           patch_size=4, pt_hw_seq_len=16)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert CogVLMConfig.from_hf_json(str(tmp_path)) == cfg
  assert CogVLMConfig.from_dict(cfg.to_dict()) == cfg
  # A partial cross_vision_config takes the hard-coded values for the keys it lacks.
  partial = dict(hf, cross_vision_config={"layers": 2, "width": 32, "head_width": 8},
                 cross_hidden_size=32, cross_compute_hidden_size=32, cross_image_size=28)
  c = CogVLMConfig.from_hf_dict(partial).cross_vision
  assert (c.layers, c.patch_size, c.mlp_ratio, c.pt_hw_seq_len) == (2, 14, 2.6667, 16)
  assert "cross_vision" not in preset("tiny-cogvlm").to_dict()  # CogVLM dicts unchanged


def test_bad_cogagent_configs_are_refused():
  hf = preset("tiny-cogagent").to_hf_dict()
  with pytest.raises(ValueError, match="cross_hidden_size 64 must equal"):
    CogVLMConfig.from_hf_dict(dict(hf, cross_hidden_size=64))
  with pytest.raises(ValueError, match="cross_compute_hidden_size 64 must equal"):
    CogVLMConfig.from_hf_dict(dict(hf, cross_compute_hidden_size=64))
  with pytest.raises(ValueError, match="unknown keys"):
    CogVLMConfig.from_hf_dict(dict(hf, cross_vision_config={"depth": 3}))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    CogVLMConfig.from_hf_dict(dict(hf, cross_image_size=26))
  with pytest.raises(ValueError, match="set exactly for variant 'cogagent'"):
    preset("tiny-cogvlm", cross_vision=dict(width=32))
  with pytest.raises(ValueError, match="set exactly for variant 'cogagent'"):
    preset("tiny-cogagent").replace(cross_vision=None)


# ---- sharding -------------------------------------------------------------------------


_MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def _normalized(spec):
  """A PartitionSpec as a tuple without trailing Nones (JAX may drop them)."""
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def _rule_specs(cfg, mesh):
  """path -> normalised spec of every parameter, from its logical axes and DEFAULT_RULES."""
  shardings = state_shardings(abstract_model(cfg)[1], mesh)
  return {"/".join(str(getattr(k, "key", k)) for k in path): _normalized(v.spec)
          for path, v in jax.tree_util.tree_leaves_with_path(shardings)}
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8,
                                     reason="needs 8 (simulated) devices")


@needs_8_devices
def test_cross_parameters_are_sharded_as_the_rules_say():
  """The shardings create_model places parameters with (sharding.state_shardings of the
  abstract model; the slow test below checks the placed arrays)."""
  cfg = preset("tiny-cogagent")
  specs = _rule_specs(cfg, make_mesh(_MESH))

  expected = {
      "layers/cross_attn/query": P(None, "fsdp", "tensor"),
      "layers/cross_attn/key": P(None, "fsdp", "tensor"),
      "layers/cross_attn/value": P(None, "fsdp", "tensor"),
      "layers/cross_attn/dense": P(None, "tensor", None, "fsdp"),
      "cross_vision/blocks/attn/q_proj": P(None, "fsdp", "tensor"),
      "cross_vision/blocks/attn/proj": P(None, "tensor", None, "fsdp"),
      "cross_vision/blocks/mlp/w1": P(None, "fsdp"),  # 85 (released 2730) wide: not tensor
      "cross_vision/blocks/mlp/w3": P(None, None, "fsdp"),
      "cross_vision/pos_embed": P(None, "fsdp"),
      "cross_vision/vit_pos_embed": P(None, "fsdp"),
      "cross_vision/patch_proj": P(None, None, None, "fsdp"),
      "adapter/pos_embed": P(None, "fsdp"),
  }
  for path, spec in expected.items():
    assert specs[path] == _normalized(spec), path


@pytest.mark.slow
@needs_8_devices
def test_sharded_forward_equals_single_device():
  cfg = preset("tiny-cogagent")
  mesh = make_mesh(_MESH)
  graphdef, state = nnx.split(create_model(cfg, mesh=mesh, seed=1))
  placed = {"/".join(map(str, p)): _normalized(v.get_value().sharding.spec)
            for p, v in nnx.to_flat_state(state)}
  assert placed == _rule_specs(cfg, mesh)
  single = nnx.merge(graphdef, jax.device_get(state))
  span, c = cfg.image_span_length, cfg.cross_vision
  rng = np.random.default_rng(8)
  ids = jnp.asarray(rng.integers(3, 100, (4, span + 6)), jnp.int32)
  types = jnp.zeros_like(ids).at[:, 1:1 + span].set(1)
  low = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  high = jnp.asarray(rng.normal(size=(4, c.image_size, c.image_size, 3)), jnp.float32)

  @jax.jit
  def forward(state, ids, types, low, high):
    with activation_sharding(mesh):
      return nnx.merge(graphdef, state)(ids, types, images=low, cross_images=high)

  np.testing.assert_allclose(forward(state, ids, types, low, high),
                             single(ids, types, images=low, cross_images=high), atol=1e-5)


# ---- prompts --------------------------------------------------------------------------


def test_templates_are_cogagents():
  history = [("Hi", "Hello.")]
  assert (cogagent_history_to_prompt("chat", history, "Color?")
          == " [INST] Hi [/INST] Hello. [INST] Color? [/INST] ")
  assert (cogagent_history_to_prompt("chat_old", history, "Color?")
          == "<EOI>Question: Hi Answer: Hello.\nQuestion: Color? Answer:")
  assert cogagent_history_to_prompt("vqa", history, "Color?") == (
      "<EOI>Question: Color? Short answer:")
  assert cogagent_history_to_prompt("base", history, "Color?") == "Color?"
  for template in ("chat", "chat_old", "vqa", "base"):  # the reference agrees
    assert cogagent_history_to_prompt(template, history, "Q?") == ref.history_to_prompt(
        template, history, "Q?")


def test_builder_gives_both_images_and_the_layout(sp_dir):
  cfg = preset("tiny-cogagent")
  tok = load_tokenizer(sp_dir)
  picture = _picture(9)
  sample = build_conversation_input_ids(tok, cfg, query="What is this?", image=picture,
                                        template_version="vqa")
  span = cfg.image_span_length
  assert sample["input_ids"][0] == tok.bos_token_id
  assert list(sample["token_type_ids"][1:1 + span]) == [1] * span
  assert list(sample["input_ids"][1 + span:]) == tok.encode(
      "<EOI>Question: What is this? Short answer:")
  assert sample["images"].shape == (16, 16, 3)
  assert sample["cross_images"].shape == (24, 24, 3)
  from cogvlm_jax.image_processing import preprocess_image
  np.testing.assert_array_equal(sample["cross_images"], preprocess_image(picture, 24))
  batch = collate([sample, sample])
  assert batch["cross_images"].shape == (2, 24, 24, 3)
  with pytest.raises(ValueError, match="CogAgent needs an image"):
    build_conversation_input_ids(tok, cfg, query="Hi")
