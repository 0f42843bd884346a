"""Parameter shardings on a simulated 8-device mesh (conftest sets 8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogvlm_jax.config import preset
from cogvlm_jax.pretrained import create_model
from cogvlm_jax.sharding import activation_sharding, make_mesh, spec_for_shape

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

EXPECTED = {
    "embed_tokens": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "layers/self_attn/language_expert_query_key_value/query": P(None, "fsdp", "tensor", None),
    "layers/self_attn/vision_expert_query_key_value/key": P(None, "fsdp", "tensor", None),
    "layers/self_attn/vision_expert_dense/kernel": P(None, "tensor", None, "fsdp"),
    "layers/mlp/vision_mlp/gate_proj": P(None, "fsdp", "tensor"),
    "layers/mlp/language_mlp/down_proj": P(None, "tensor", "fsdp"),
    "vision/layers/mlp/fc1_kernel": P(None, "fsdp", "tensor"),
    "vision/layers/attention/query_kernel": P(None, "fsdp", "tensor", None),
    "adapter/linear_proj/linear_proj": P("fsdp", None),  # both dims are fsdp-like
    "adapter/linear_proj/dense_4h_to_h": P("tensor", "fsdp"),
}
# 1-D norm scales and RoPE frequencies are replicated on purpose; everything else is sharded.
REPLICATED_OK = ("layernorm", "norm/weight", "norm1", "inv_freq")


def _normalized(spec):
  """PartitionSpec as a tuple without trailing Nones (JAX may drop them)."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def _flat_shardings(model):
  return {"/".join(map(str, path)): v.get_value().sharding
          for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("name", ["tiny-cogvlm", "tiny-cogvlm2"])
def test_parameters_are_sharded_as_the_rules_say(name):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = create_model(preset(name), mesh=mesh)
  shardings = _flat_shardings(model)
  for path, spec in EXPECTED.items():
    assert _normalized(shardings[path].spec) == _normalized(spec), path
  for path, sharding in shardings.items():
    if any(tag in path for tag in REPLICATED_OK):
      continue
    assert sharding.mesh.shape == mesh.shape
    assert any(axis is not None for axis in sharding.spec), f"{path} is replicated"


def test_sharded_forward_equals_single_device():
  cfg = preset("tiny-cogvlm2")
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = create_model(cfg, mesh=mesh, seed=1)
  single = create_model(cfg, seed=1)
  span = cfg.image_span_length
  batch, seq = 4, span + 10
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 1000, (batch, seq)), jnp.int32)
  types = jnp.zeros((batch, seq), jnp.int32).at[:, 1:1 + span].set(1)
  images = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def forward(state, ids, types, images):
    with activation_sharding(mesh):
      return nnx.merge(graphdef, state)(ids, types, images)

  got = forward(state, ids, types, images)
  np.testing.assert_allclose(got, single(ids, types, images), atol=1e-5)


def test_impossible_meshes_are_clear_errors():
  with pytest.raises(ValueError, match="needs 12 devices"):
    make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="cannot fill"):
    make_mesh({"data": 3, "fsdp": -1})
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(ValueError, match=r"size \d+\) is not divisible by mesh axes tensor"):
    create_model(preset("tiny-cogvlm2"), mesh=mesh)
  with pytest.raises(KeyError, match="no sharding rule"):
    spec_for_shape("x", (4,), ("nonsense",), mesh)
