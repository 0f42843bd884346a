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


def test_decode_phases_cover_every_step_within_the_cache():
  from cogvlm_jax.generate import decode_phases
  assert decode_phases(10, 1, block=4) == [(1, 10)]
  assert decode_phases(10, 4, block=4) == [(4, 13)]
  assert decode_phases(10, 12, block=2) == [(2, 11), (4, 13), (8, 17), (12, 21)]
  for prompt, new, block in [(7, 64, 32), (300, 100, 32), (5, 33, 4)]:
    phases = decode_phases(prompt, new, block)
    assert phases[-1][0] == new and phases[-1][1] <= prompt + new  # never past the cache
    for stop, kv_len in phases:
      assert kv_len >= prompt + stop - 1  # the last step of a phase writes slot kv_len - 1


@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
def test_phased_decoding_matches_reference_and_stream(name, monkeypatch):
  # Blocks of 2 slots: 12 new tokens run in 4 phases of growing attention length.
  import importlib
  gen = importlib.import_module("cogvlm_jax.generate")  # the package's `generate` is the function
  monkeypatch.setattr(gen, "DECODE_BLOCK", 2)
  cfg, torch_model, model = reference_pair(name)
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(11),
                                                     image_rows=[1], left_pad={0: 1})
  want = _reference_generate(torch_model, ids, types, attention, images, rows, 12, eos=-1)
  got = generate(model, ids, types, attention, images, max_new_tokens=12, stop_token_ids=[-1])
  np.testing.assert_array_equal(got, want)
  streamed = np.stack(list(gen.generate_stream(model, ids, types, attention, images,
                                               max_new_tokens=12, stop_token_ids=[-1])), axis=1)
  np.testing.assert_array_equal(streamed, want[:, ids.shape[1]:])


def test_decode_loop_allocates_no_cache_sized_buffer():
  # The cache rides in the loops' carries and is written in place: the only cache-sized
  # zero fill in the compiled program is the cache's own initialisation (K and V share it).
  # Returning per-layer caches from the layer scan made XLA fill and copy a fresh one per
  # decoding step.
  import importlib
  import re

  import jax
  from flax import nnx
  gen = importlib.import_module("cogvlm_jax.generate")
  cfg, _, model = reference_pair("tiny-cogvlm")
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(12), batch=3)
  prepared = gen._prepare(model, ids, types, attention, images, 8, [-1], None, 0.0, 0, 1.0)
  graphdef, state = nnx.split(model)
  hlo = gen._generate.lower(graphdef, state, *prepared[:6], jax.random.key(0),
                            max_new_tokens=8, sampling=prepared[6],
                            mixed_batch=prepared[7]).compile().as_text()
  shape = (f"f32[{cfg.num_hidden_layers},3,{ids.shape[1] + 8},{cfg.num_key_value_heads},"
           f"{cfg.head_dim}]")
  fills = re.findall(re.escape(shape) + r"\{[0-9,]*\} broadcast\(", hlo)
  assert len(fills) <= 1, fills
