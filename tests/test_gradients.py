"""Both variants train: gradients equal the PyTorch reference's, and remat does not change them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cogvlm_jax.convert.hf import hf_to_state
from cogvlm_jax.pretrained import abstract_model
from tests.helpers import prompt_batch, reference_pair


def _loss_weights(shape, attention):
  """A fixed random projection of the logits, zero on padded rows (undefined there)."""
  w = np.random.default_rng(11).normal(size=shape).astype(np.float32)
  return w * attention[..., None]


def _our_grads(model, ids, types, images, attention, weights):
  def loss_fn(m):
    logits = m(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
    return jnp.sum(logits * weights) / weights.shape[0]

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
def test_gradients_match_reference(name):
  cfg, torch_model, model = reference_pair(name)
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(12),
                                                     left_pad={1: 2})
  weights = _loss_weights(ids.shape + (cfg.vocab_size,), attention)
  out = torch_model(torch.from_numpy(ids), torch.from_numpy(types),
                    attention_mask=torch.from_numpy(attention),
                    images=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  (out.logits * torch.from_numpy(weights)).sum().div(ids.shape[0]).backward()
  torch_grads = {k: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
                 for k, p in torch_model.named_parameters()}
  for k, b in torch_model.named_buffers():  # inv_freq is not trained
    torch_grads[k] = np.zeros(b.shape, np.float32)
  graphdef, abstract = abstract_model(cfg)
  want = {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(hf_to_state(cfg, torch_grads, abstract))}
  got = _our_grads(model, ids, types, images, attention, weights)
  assert set(got) == set(want) - {"layers/self_attn/inv_freq"}
  for path, g in got.items():
    scale = max(1.0, float(np.abs(want[path]).max()))
    np.testing.assert_allclose(g, want[path], atol=2e-4 * scale, rtol=0, err_msg=path)
  # The experts and the vision tower really are trained by this loss.
  for path in ("layers/mlp/vision_mlp/gate_proj", "vision/layers/mlp/fc1_kernel",
               "adapter/linear_proj/gate_proj"):
    assert np.abs(got[path]).max() > 0, path


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_keep_gradients(policy):
  cfg, _, model = reference_pair("tiny-cogvlm2")
  _, _, remat_model = reference_pair("tiny-cogvlm2", remat_policy=policy)
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(13))
  weights = _loss_weights(ids.shape + (cfg.vocab_size,), attention)
  base = _our_grads(model, ids, types, images, attention, weights)
  remat = _our_grads(remat_model, ids, types, images, attention, weights)
  for path in base:
    scale = max(1.0, float(np.abs(base[path]).max()))  # fp32 recompute reorders sums
    np.testing.assert_allclose(remat[path], base[path], atol=1e-5 * scale, rtol=0, err_msg=path)


def test_bf16_compute_is_close_to_fp32():
  cfg, _, model = reference_pair("tiny-cogvlm")
  _, _, bf16_model = reference_pair("tiny-cogvlm", dtype="bfloat16")
  ids, types, attention, images, _ = prompt_batch(cfg, np.random.default_rng(14))
  full = model(ids, types, images, attention)
  half = bf16_model(ids, types, images, attention)
  assert half.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert float(jnp.max(jnp.abs(half - full))) < 0.05 * float(jnp.max(jnp.abs(full)))
