"""Decoding: greedy output equals the PyTorch reference's generate, token for token."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cogvlm_jax.generate import SamplingConfig, generate, sample_token
from tests.reference import modeling_cogvlm_ref as ref
from tests.helpers import prompt_batch, reference_pair


def _reference_generate(torch_model, ids, types, attention, images, rows, new, eos):
  torch_images = torch.from_numpy(images[rows].transpose(0, 3, 1, 2)) if rows else None
  with torch.no_grad():
    out = ref.generate_greedy(torch_model, torch.from_numpy(ids), torch.from_numpy(types),
                              torch.from_numpy(attention), torch_images, new, eos)
  return out.numpy()


@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
@pytest.mark.parametrize("case", ["image_left_padded", "mixed", "text_only"])
def test_greedy_matches_reference(name, case):
  cfg, torch_model, model = reference_pair(name)
  kwargs = {"image_left_padded": dict(left_pad={1: 2}), "mixed": dict(image_rows=[0]),
            "text_only": dict(image_rows=[], left_pad={0: 1})}[case]
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(7), **kwargs)
  new = 12
  # First run without a reachable stop token, then stop on a token the model emits, so the
  # stop-and-pad path is exercised on both sides.
  unstopped = _reference_generate(torch_model, ids, types, attention, images, rows, new, eos=-1)
  eos = int(unstopped[0, ids.shape[1] + 3])
  want = _reference_generate(torch_model, ids, types, attention, images, rows, new, eos)
  got = generate(model, ids, types, attention, images if rows else None, max_new_tokens=new,
                 stop_token_ids=[eos])
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  # After every row stopped, the remainder is padding.
  assert (got[:, want.shape[1]:] == eos).all()


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  draws = lambda s: {int(sample_token(logits, jax_key(i), s)[0]) for i in range(200)}
  assert draws(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
  assert draws(SamplingConfig(temperature=1.0, top_p=0.7)) == {0, 1}
  assert draws(SamplingConfig(temperature=1.0, top_p=0.85)) == {0, 1, 2}
  assert draws(SamplingConfig(temperature=0.0)) == {0}
  assert len(draws(SamplingConfig(temperature=1.0))) == 4


def jax_key(i):
  import jax
  return jax.random.key(i)


def test_sampling_is_seeded_and_validated():
  cfg, _, model = reference_pair("tiny-cogvlm")
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(8))
  a = generate(model, ids, types, attention, images, max_new_tokens=5, temperature=1.0, seed=3,
               stop_token_ids=[-1])
  b = generate(model, ids, types, attention, images, max_new_tokens=5, temperature=1.0, seed=3,
               stop_token_ids=[-1])
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, ids, types, attention, images, max_new_tokens=2, top_p=0.0)
  right_padded = attention.copy()
  right_padded[0, -1] = 0
  with pytest.raises(ValueError, match="LEFT-padded"):
    generate(model, ids, types, right_padded, images, max_new_tokens=2)


def test_stream_yields_the_same_tokens_as_generate():
  from cogvlm_jax.generate import generate_stream
  cfg, _, model = reference_pair("tiny-cogvlm2")
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(9), left_pad={0: 1})
  for temperature in (0.0, 1.0):
    full = generate(model, ids, types, attention, images, max_new_tokens=6, stop_token_ids=[-1],
                    temperature=temperature, seed=5)
    streamed = np.stack(list(generate_stream(model, ids, types, attention, images,
                                             max_new_tokens=6, stop_token_ids=[-1],
                                             temperature=temperature, seed=5)), axis=1)
    np.testing.assert_array_equal(streamed, full[:, ids.shape[1]:])
