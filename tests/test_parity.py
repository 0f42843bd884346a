"""The Flax model against the PyTorch reference (Hugging Face names), fp32, tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cogvlm_jax.modeling.cogvlm import build_position_ids
from tests.helpers import TOL, max_diff, prompt_batch, reference_pair, torch_logits
from tests.reference import modeling_cogvlm_ref as ref

VARIANTS = ["tiny-cogvlm", "tiny-cogvlm2"]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case", ["image", "text_only", "left_padded", "mixed"])
def test_logits_match_reference(name, case):
  cfg, torch_model, model = reference_pair(name)
  rng = np.random.default_rng(1)
  kwargs = {"image": {}, "text_only": dict(image_rows=[]),
            "left_padded": dict(left_pad={0: 3}), "mixed": dict(image_rows=[1], batch=3)}[case]
  ids, types, attention, images, rows = prompt_batch(cfg, rng, **kwargs)
  want, want_hidden = torch_logits(torch_model, ids, types, attention, images, rows)
  out = model.forward(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images) if rows else None,
                      jnp.asarray(attention), output_hidden_states=True)
  assert out.logits.dtype == jnp.float32
  assert max_diff(out.logits, want, attention) <= TOL
  assert len(out.hidden_states) == cfg.num_hidden_layers + 1
  for got_h, want_h in zip(out.hidden_states, want_hidden):
    assert max_diff(got_h, want_h, attention) <= TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_vision_tower_and_adapter_match_reference(name):
  cfg, torch_model, model = reference_pair(name)
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
  cfg, torch_model, model = reference_pair(name)
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(3), batch=1,
                                                     text_len=40)
  want, _ = torch_logits(torch_model, ids, types, attention, images, rows)
  got = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  assert max_diff(got, want, attention) <= TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_jit_matches_eager_and_unscanned(name):
  cfg, _, model = reference_pair(name)
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(4))
  eager = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, ids, types, images,
                                                             attention)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  unscanned = nnx.merge(nnx.split(reference_pair(name, scan_layers=False)[2])[0], state)
  np.testing.assert_allclose(unscanned(ids, types, images, attention), eager, atol=1e-5)


def test_position_ids_match_reference_rule():
  rng = np.random.default_rng(5)
  for _ in range(20):
    types = rng.integers(0, 2, size=(3, 12))
    attention = (rng.random((3, 12)) > 0.2).astype(np.int64)
    want = ref.build_position_ids(torch.from_numpy(types), torch.from_numpy(attention)).numpy()
    np.testing.assert_array_equal(build_position_ids(jnp.asarray(types), jnp.asarray(attention)),
                                  want)
