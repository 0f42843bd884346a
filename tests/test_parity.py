"""The Flax model against the PyTorch reference (Hugging Face names), fp32, tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cogvlm_jax.config import preset
from cogvlm_jax.convert.hf import hf_to_state
from cogvlm_jax.modeling.cogvlm import build_position_ids
from cogvlm_jax.pretrained import abstract_model
from tests.reference import modeling_cogvlm_ref as ref

TOL = 1e-4
VARIANTS = ["tiny-cogvlm", "tiny-cogvlm2"]


def _pair(name, seed=0, **overrides):
  cfg = preset(name, **overrides)
  torch.manual_seed(seed)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_(torch_model, seed)
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  graphdef, abstract = abstract_model(cfg)
  model = nnx.merge(graphdef, hf_to_state(cfg, tensors, abstract))
  return cfg, torch_model, model


def _batch(cfg, rng, batch=2, text_len=7, image_rows=None, left_pad=()):
  """Prompts [BOS, span, text]; rows in `left_pad` get that many pads on the left."""
  span = cfg.image_span_length
  image_rows = list(range(batch)) if image_rows is None else image_rows
  rows = []
  for b in range(batch):
    has = b in image_rows
    ids = [cfg.bos_token_id] + [cfg.image_placeholder_id] * (span if has else 0)
    ids += list(rng.integers(3, 100, size=text_len + (0 if has else span)))
    types = [0] + [1] * (span if has else 0) + [0] * (len(ids) - 1 - (span if has else 0))
    rows.append((ids, types))
  pads = [dict(left_pad).get(b, 0) for b in range(batch)]
  length = max(len(r[0]) + p for r, p in zip(rows, pads))
  input_ids = np.zeros((batch, length), np.int64)
  token_types = np.zeros((batch, length), np.int64)
  attention = np.zeros((batch, length), np.int64)
  for b, ((ids, types), p) in enumerate(zip(rows, pads)):
    start = length - len(ids)
    input_ids[b, start:] = ids
    token_types[b, start:] = types
    attention[b, start:] = 1
  size = cfg.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  return input_ids, token_types, attention, images, image_rows


def _torch_logits(torch_model, input_ids, token_types, attention, images, image_rows):
  torch_images = torch.from_numpy(images[image_rows].transpose(0, 3, 1, 2)) if image_rows else None
  with torch.no_grad():
    out = torch_model(torch.from_numpy(input_ids), torch.from_numpy(token_types),
                      attention_mask=torch.from_numpy(attention), images=torch_images,
                      output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _max_diff(a, b, attention):
  valid = attention.astype(bool)
  return float(np.max(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid])))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case", ["image", "text_only", "left_padded", "mixed"])
def test_logits_match_reference(name, case):
  cfg, torch_model, model = _pair(name)
  rng = np.random.default_rng(1)
  kwargs = {"image": {}, "text_only": dict(image_rows=[]),
            "left_padded": dict(left_pad={0: 3}), "mixed": dict(image_rows=[1], batch=3)}[case]
  ids, types, attention, images, rows = _batch(cfg, rng, **kwargs)
  want, want_hidden = _torch_logits(torch_model, ids, types, attention, images, rows)
  out = model.forward(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images) if rows else None,
                      jnp.asarray(attention), output_hidden_states=True)
  assert out.logits.dtype == jnp.float32
  assert _max_diff(out.logits, want, attention) <= TOL
  assert len(out.hidden_states) == cfg.num_hidden_layers + 1
  for got_h, want_h in zip(out.hidden_states, want_hidden):
    assert _max_diff(got_h, want_h, attention) <= TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_vision_tower_and_adapter_match_reference(name):
  cfg, torch_model, model = _pair(name)
  images = np.random.default_rng(2).normal(
      size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2))
    want_tower = torch_model.encode_vision_tower(t_images).numpy()
    want_features = torch_model.model.vision(t_images).numpy()
  got_tower = model.vision(jnp.asarray(images))
  np.testing.assert_allclose(got_tower, want_tower, atol=TOL, rtol=0)
  np.testing.assert_allclose(model.encode_images(jnp.asarray(images)), want_features, atol=TOL,
                             rtol=0)
  assert want_features.shape[1] == cfg.image_span_length


@pytest.mark.parametrize("name", VARIANTS)
def test_history_prompt_matches_reference(name):
  """A longer chat-with-history style prompt: image then many text tokens."""
  cfg, torch_model, model = _pair(name)
  ids, types, attention, images, rows = _batch(cfg, np.random.default_rng(3), batch=1,
                                               text_len=40)
  want, _ = _torch_logits(torch_model, ids, types, attention, images, rows)
  got = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  assert _max_diff(got, want, attention) <= TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_jit_matches_eager_and_unscanned(name):
  cfg, _, model = _pair(name)
  ids, types, attention, images, _ = _batch(cfg, np.random.default_rng(4))
  eager = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, ids, types, images,
                                                             attention)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  unscanned = nnx.merge(nnx.split(_pair(name, scan_layers=False)[2])[0], state)
  np.testing.assert_allclose(unscanned(ids, types, images, attention), eager, atol=1e-5)


def test_position_ids_match_reference_rule():
  rng = np.random.default_rng(5)
  for _ in range(20):
    types = rng.integers(0, 2, size=(3, 12))
    attention = (rng.random((3, 12)) > 0.2).astype(np.int64)
    want = ref.build_position_ids(torch.from_numpy(types), torch.from_numpy(attention)).numpy()
    np.testing.assert_array_equal(build_position_ids(jnp.asarray(types), jnp.asarray(attention)),
                                  want)
