"""Tests of the PyTorch reference (tests/reference/modeling_cogvlm_ref.py) itself."""

import pytest
import torch

from cogvlm_jax.config import preset
from tests.reference import modeling_cogvlm_ref as ref

PRESETS = {"cogvlm": "tiny-cogvlm", "cogvlm2": "tiny-cogvlm2"}
VARIANTS = list(PRESETS)


def _cfg(variant):
  return preset(PRESETS[variant])


def _model(variant, seed=0):
  torch.manual_seed(seed)
  model = ref.CogVLMForCausalLM(_cfg(variant).to_hf_dict())
  ref.init_random_(model, seed=seed)
  return model.eval()


def _text_ids(cfg, n, gen):
  """Random text token ids that are neither special tokens nor the placeholder."""
  lo = 3 if cfg.variant == "cogvlm" else 1000
  hi = cfg.vocab_size if cfg.variant == "cogvlm" else 3000
  return torch.randint(lo, hi, (n,), generator=gen).tolist()


def _row(cfg, n_text, with_image, gen):
  """[BOS] + image span (placeholders, type 1) + text, as (ids, token types)."""
  ids, tti = [cfg.bos_token_id], [0]
  if with_image:
    ids += [cfg.image_placeholder_id] * cfg.image_span_length
    tti += [1] * cfg.image_span_length
  ids += _text_ids(cfg, n_text, gen)
  tti += [0] * n_text
  return ids, tti


def _left_pad(rows, pad_id):
  length = max(len(ids) for ids, _ in rows)
  ids_b, tti_b, mask_b = [], [], []
  for ids, tti in rows:
    p = length - len(ids)
    ids_b.append([pad_id] * p + ids)
    tti_b.append([0] * p + tti)
    mask_b.append([0] * p + [1] * len(ids))
  return torch.tensor(ids_b), torch.tensor(tti_b), torch.tensor(mask_b)


def _images(cfg, n, gen):
  s = cfg.vision.image_size
  return torch.randn(n, 3, s, s, generator=gen)


# ---- structure ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_names_and_shapes(variant):
  cfg = _cfg(variant)
  model = ref.CogVLMForCausalLM(cfg.to_hf_dict())
  sd = model.state_dict()
  assert len(sd) == (65 if variant == "cogvlm" else 69)
  d, f, v, cv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.vision.hidden_size
  hd, kv = cfg.head_dim, cfg.num_key_value_heads
  q = d + 2 * kv * hd
  expected = {
      "model.embed_tokens.weight": (v, d),
      "lm_head.weight": (v, d),
      "model.norm.weight": (d,),
      "model.layers.0.input_layernorm.weight": (d,),
      "model.layers.1.post_attention_layernorm.weight": (d,),
      "model.layers.0.self_attn.rotary_emb.inv_freq": (hd // 2,),
      "model.layers.0.self_attn.vision_expert_query_key_value.weight": (q, d),
      "model.layers.1.self_attn.language_expert_query_key_value.weight": (q, d),
      "model.layers.0.self_attn.vision_expert_dense.weight": (d, d),
      "model.layers.0.self_attn.language_expert_dense.weight": (d, d),
      "model.layers.0.mlp.vision_mlp.gate_proj.weight": (f, d),
      "model.layers.0.mlp.language_mlp.up_proj.weight": (f, d),
      "model.layers.1.mlp.language_mlp.down_proj.weight": (d, f),
      "model.vision.boi": (1, 1, d),
      "model.vision.eoi": (1, 1, d),
      "model.vision.patch_embedding.cls_embedding": (1, cv),
      "model.vision.patch_embedding.proj.weight": (cv, 3, 4, 4),
      "model.vision.patch_embedding.proj.bias": (cv,),
      "model.vision.patch_embedding.position_embedding.weight": (17, cv),
      "model.vision.transformer.layers.0.attention.query_key_value.weight": (3 * cv, cv),
      "model.vision.transformer.layers.0.attention.query_key_value.bias": (3 * cv,),
      "model.vision.transformer.layers.1.attention.dense.bias": (cv,),
      "model.vision.transformer.layers.1.mlp.fc1.weight": (cfg.vision.intermediate_size, cv),
      "model.vision.transformer.layers.1.mlp.fc2.weight": (cv, cfg.vision.intermediate_size),
      "model.vision.transformer.layers.0.input_layernorm.bias": (cv,),
      "model.vision.transformer.layers.0.post_attention_layernorm.weight": (cv,),
      "model.vision.linear_proj.linear_proj.weight": (d, cv),
      "model.vision.linear_proj.norm1.weight": (d,),
      "model.vision.linear_proj.norm1.bias": (d,),
      "model.vision.linear_proj.gate_proj.weight": (f, d),
      "model.vision.linear_proj.dense_h_to_4h.weight": (f, d),
      "model.vision.linear_proj.dense_4h_to_h.weight": (d, f),
  }
  v2_only = {
      "model.vision.conv.weight": (cv, cv, 2, 2),
      "model.vision.conv.bias": (cv,),
      "model.layers.0.self_attn.vision_expert_query_key_value.bias": (q,),
  }
  if variant == "cogvlm2":
    expected.update(v2_only)
    assert q == 64 + 2 * 2 * 16
  else:
    assert not set(v2_only) & set(sd)
    assert "model.layers.0.self_attn.language_expert_query_key_value.bias" not in sd
  for name, shape in expected.items():
    assert tuple(sd[name].shape) == shape, name
  base = 10000.0 if variant == "cogvlm" else 500000.0
  want = 1.0 / base**(torch.arange(0, hd, 2, dtype=torch.float32) / hd)
  torch.testing.assert_close(sd["model.layers.1.self_attn.rotary_emb.inv_freq"], want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_random_keeps_inv_freq_and_is_seeded(variant):
  cfg = _cfg(variant)
  a = ref.init_random_(ref.CogVLMForCausalLM(cfg.to_hf_dict()), seed=3)
  b = ref.init_random_(ref.CogVLMForCausalLM(cfg.to_hf_dict()), seed=3)
  for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
    assert torch.equal(x, y), name
  fresh = ref.CogVLMForCausalLM(cfg.to_hf_dict()).state_dict()
  sd = a.state_dict()
  assert torch.equal(sd["model.layers.0.self_attn.rotary_emb.inv_freq"],
                     fresh["model.layers.0.self_attn.rotary_emb.inv_freq"])
  norm = sd["model.layers.0.input_layernorm.weight"]
  assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01
  assert sd["model.vision.transformer.layers.0.attention.query_key_value.bias"].abs().sum() > 0
  assert sd["model.vision.boi"].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_shapes(variant):
  cfg = _cfg(variant)
  model = _model(variant)
  images = _images(cfg, 2, torch.Generator().manual_seed(0))
  with torch.no_grad():
    tower = model.encode_vision_tower(images)
    feats = model.model.vision(images)
  assert tower.shape == (2, 16, cfg.vision.hidden_size)
  assert feats.shape == (2, cfg.image_span_length, cfg.hidden_size)
  assert cfg.image_span_length == (18 if variant == "cogvlm" else 6)
  torch.testing.assert_close(feats[:, 0], model.model.vision.boi[0].expand(2, -1))
  torch.testing.assert_close(feats[:, -1], model.model.vision.eoi[0].expand(2, -1))


# ---- position ids and routing --------------------------------------------------------------

def test_position_ids_spec_example():
  tti = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0]])
  assert ref.build_position_ids(tti).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5, 6]]
  # Left padding by 2: index 0 stays 0, pads add nothing -> real tokens shifted by +1.
  tti_p = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]])
  mask_p = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
  assert ref.build_position_ids(tti_p, mask_p).tolist() == [[0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7]]
  # The image costs 3 positions whatever its length.
  for n in (1, 4, 16):
    tti = torch.tensor([[0] + [1] * (n + 2) + [0, 0]])
    assert ref.build_position_ids(tti)[0, -2:].tolist() == [4, 5]


def test_position_ids_tiny_prompts():
  for variant in VARIANTS:
    cfg = _cfg(variant)
    ids, tti = _row(cfg, 3, True, torch.Generator().manual_seed(0))
    pos = ref.build_position_ids(torch.tensor([tti]))[0].tolist()
    n = cfg.num_image_tokens
    assert pos == [0, 1] + [2] * n + [3, 4, 5, 6]


def test_expert_mask():
  tti = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
  vision, language = ref.get_expert_mask(tti)
  assert vision.int().tolist() == [[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0]]
  assert torch.equal(language, ~vision)
  # A single-token step is always language.
  assert not ref.get_expert_mask(torch.tensor([[1], [1]]))[0].any()


# ---- training ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_backward(variant):
  cfg = _cfg(variant)
  model = _model(variant).train()
  gen = torch.Generator().manual_seed(1)
  ids, tti, mask = _left_pad([_row(cfg, 4, True, gen), _row(cfg, 6, True, gen)],
                             cfg.image_placeholder_id)
  images = _images(cfg, 2, gen)
  labels = torch.where(tti.bool() | ~mask.bool(), torch.full_like(ids, -100), ids)
  out = model(ids, tti, mask, images, labels=labels)
  assert torch.isfinite(out.loss)
  # The CE loss alone gives the LAST layer's vision experts no gradient (vision-position
  # logits predict vision/-100 labels); a small term on those logits reaches them too.
  loss = out.loss + 1e-3 * out.logits[tti.bool()].pow(2).mean()
  loss.backward()
  params = dict(model.named_parameters())
  names = [
      "model.layers.0.self_attn.vision_expert_query_key_value.weight",
      "model.layers.1.self_attn.vision_expert_dense.weight",
      "model.layers.0.mlp.vision_mlp.down_proj.weight",
      "model.layers.1.self_attn.language_expert_query_key_value.weight",
      "model.vision.patch_embedding.proj.weight",
      "model.vision.patch_embedding.cls_embedding",
      "model.vision.patch_embedding.position_embedding.weight",
      "model.vision.transformer.layers.0.attention.query_key_value.weight",
      "model.vision.transformer.layers.1.mlp.fc2.bias",
      "model.vision.linear_proj.gate_proj.weight",
      "model.vision.boi",
      "model.vision.eoi",
      "lm_head.weight",
  ]
  if variant == "cogvlm2":
    names += ["model.vision.conv.weight",
              "model.layers.0.self_attn.vision_expert_query_key_value.bias"]
  for name in names:
    g = params[name].grad
    assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all(), name


# ---- forward behaviour ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_and_splicing(variant):
  cfg = _cfg(variant)
  model = _model(variant)
  gen = torch.Generator().manual_seed(2)
  ids, tti = _row(cfg, 3, True, gen)
  ids, tti = torch.tensor([ids]), torch.tensor([tti])
  images = _images(cfg, 1, gen)
  with torch.no_grad():
    out = model(ids, tti, images=images, output_hidden_states=True)
    feats = model.model.vision(images)
  hs = out.hidden_states
  assert len(hs) == cfg.num_hidden_layers + 1
  assert out.logits.dtype == torch.float32
  assert out.logits.shape == (1, ids.shape[1], cfg.vocab_size)
  torch.testing.assert_close(hs[0][0, 1:1 + cfg.image_span_length], feats[0])
  torch.testing.assert_close(hs[0][0, 0], model.model.embed_tokens.weight[cfg.bos_token_id])
  with torch.no_grad():
    torch.testing.assert_close(out.logits, model.lm_head(hs[-1]).float())


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_matches_unpadded(variant):
  cfg = _cfg(variant)
  model = _model(variant)
  gen = torch.Generator().manual_seed(3)
  rows = [_row(cfg, 2, True, gen), _row(cfg, 7, True, gen), _row(cfg, 9, False, gen)]
  images = _images(cfg, 2, gen)  # rows 0 and 1 have an image, row 2 is text-only
  ids, tti, mask = _left_pad(rows, cfg.image_placeholder_id)
  with torch.no_grad():
    batched = model(ids, tti, mask, images).logits
    img_i = 0
    for b, (r_ids, r_tti) in enumerate(rows):
      has_img = 1 in r_tti
      single = model(torch.tensor([r_ids]), torch.tensor([r_tti]), None,
                     images[img_i:img_i + 1] if has_img else None).logits[0]
      img_i += has_img
      n = len(r_ids)
      torch.testing.assert_close(batched[b, -n:], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_logits_match_full_forward(variant):
  cfg = _cfg(variant)
  model = _model(variant)
  gen = torch.Generator().manual_seed(4)
  rows = [_row(cfg, 3, True, gen), _row(cfg, 6, True, gen)]
  ids, tti, mask = _left_pad(rows, cfg.image_placeholder_id)
  images = _images(cfg, 2, gen)
  extra = torch.tensor([_text_ids(cfg, 3, gen), _text_ids(cfg, 3, gen)])
  full_ids = torch.cat([ids, extra], 1)
  full_tti = torch.cat([tti, torch.zeros_like(extra)], 1)
  full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
  with torch.no_grad():
    full = model(full_ids, full_tti, full_mask, images).logits
    pos = ref.build_position_ids(full_tti, full_mask)
    l = ids.shape[1]
    out = model(ids, tti, mask, images, use_cache=True)
    # Fully padded query rows attend uniformly to every finfo.min key (future ones included),
    # so they are meaningless (spec 10.11): compare valid rows only.
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], full[:, :l][valid], atol=1e-5, rtol=0)
    past = out.past_key_values
    k0, v0 = past[0]
    assert k0.shape == (2, cfg.num_key_value_heads, l, cfg.head_dim) == v0.shape
    for t in range(l, full_ids.shape[1]):
      out = model(full_ids[:, t:t + 1], full_tti[:, t:t + 1], full_mask[:, :t + 1], None,
                  pos[:, t:t + 1], past, use_cache=True)
      past = out.past_key_values
      torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert past[1][0].shape[2] == full_ids.shape[1]


# ---- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_cached_equals_uncached(variant):
  cfg = _cfg(variant)
  model = _model(variant)
  gen = torch.Generator().manual_seed(5)
  rows = [_row(cfg, 2, True, gen), _row(cfg, 5, True, gen)]
  ids, tti, mask = _left_pad(rows, cfg.image_placeholder_id)
  images = _images(cfg, 2, gen)
  args = (model, ids, tti, mask, images)
  cached = ref.generate_greedy(*args, max_new_tokens=6, eos_token_id=cfg.eos_token_id)
  uncached = ref.generate_greedy(*args, max_new_tokens=6, eos_token_id=cfg.eos_token_id,
                                 use_cache=False)
  assert cached.shape == (2, ids.shape[1] + 6)
  assert torch.equal(cached[:, :ids.shape[1]], ids)
  assert torch.equal(cached, uncached)

  # Force an early stop: pick row 0's second new token as "eos"; the row then emits eos.
  eos = int(cached[0, ids.shape[1] + 1])
  stopped = ref.generate_greedy(*args, max_new_tokens=6, eos_token_id=eos)
  new = stopped[0, ids.shape[1]:]
  first = int((new == eos).nonzero()[0])
  assert (new[first:] == eos).all()
  assert torch.equal(stopped[0, :ids.shape[1] + first + 1], cached[0, :ids.shape[1] + first + 1])
  if not (stopped[1, ids.shape[1]:] == eos).any():
    assert stopped.shape[1] == ids.shape[1] + 6
