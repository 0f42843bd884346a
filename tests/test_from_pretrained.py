"""`from_pretrained` on Hugging Face folders (config.json + safetensors, sharded or not)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import cogvlm_jax
from cogvlm_jax.convert.hf import CheckpointMismatch, state_to_hf
from cogvlm_jax.sharding import make_mesh
from tests.helpers import (TOL, max_diff, prompt_batch, seeded_reference, torch_logits,
                           write_hf_folder)

from flax import nnx


@pytest.mark.parametrize("name,shards", [("tiny-cogvlm", 1), ("tiny-cogvlm2", 3)])
def test_from_pretrained_matches_reference(tmp_path, name, shards):
  cfg, torch_model, tensors = seeded_reference(name)
  write_hf_folder(tmp_path, cfg.to_hf_dict(torch_dtype="float32"), tensors, shards)
  model = cogvlm_jax.from_pretrained(str(tmp_path))
  assert model.config.variant == cfg.variant
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(0), left_pad={0: 2})
  want, _ = torch_logits(torch_model, ids, types, attention, images, rows)
  got = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  assert max_diff(got, want, attention) <= TOL
  # Export gives back exactly the tensors that were read.
  exported = state_to_hf(model.config, nnx.state(model))
  assert sorted(exported) == sorted(tensors)
  for k in tensors:
    np.testing.assert_array_equal(exported[k], tensors[k])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_from_pretrained_with_mesh_keeps_bf16_and_shards(tmp_path):
  cfg, _, tensors = seeded_reference("tiny-cogvlm")
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  write_hf_folder(tmp_path, cfg.to_hf_dict(), bf16, shards=2)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = cogvlm_jax.from_pretrained(str(tmp_path), mesh=mesh)
  gate = model.layers.mlp.vision_mlp.gate_proj.get_value()
  assert gate.dtype == jnp.bfloat16
  assert tuple(gate.sharding.spec)[:3] == (None, "fsdp", "tensor")
  exported = state_to_hf(model.config, nnx.state(model))
  for k in bf16:
    assert exported[k].dtype == bf16[k].dtype
    np.testing.assert_array_equal(exported[k].view(np.uint16), bf16[k].view(np.uint16))


def test_from_pretrained_bad_inputs(tmp_path):
  cfg, _, tensors = seeded_reference("tiny-cogvlm")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cogvlm_jax.from_pretrained(str(tmp_path / "nope"))
  missing = dict(tensors)
  del missing["model.layers.1.mlp.vision_mlp.up_proj.weight"]
  write_hf_folder(tmp_path / "missing", cfg.to_hf_dict(), missing)
  with pytest.raises(CheckpointMismatch, match="missing 1 tensors.*vision_mlp.up_proj"):
    cogvlm_jax.from_pretrained(str(tmp_path / "missing"))
  wrong = dict(tensors)
  wrong["model.norm.weight"] = np.ones(3, np.float32)
  write_hf_folder(tmp_path / "wrong", cfg.to_hf_dict(), wrong)
  with pytest.raises(CheckpointMismatch, match=r"model.norm.weight has shape \(3,\)"):
    cogvlm_jax.from_pretrained(str(tmp_path / "wrong"))
  write_hf_folder(tmp_path / "truncated", cfg.to_hf_dict(), tensors)
  path = tmp_path / "truncated" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated shard"):
    cogvlm_jax.from_pretrained(str(tmp_path / "truncated"))
