"""The TPU compiler on a CPU machine: `python -m cogvlm_jax.plan --topology` and the train step
compiled for TPU slices, with the splash and xla attention backends.

libtpu is loaded by path (`.ci/setup` puts libtpu==0.0.42.1 in .venv/libtpu); no TPU is used.
The compiles run in this process: `plan.tpu_devices` sets libtpu's environment itself.
"""

import math

import jax
import numpy as np
import pytest

from cogvlm_jax import plan as plan_lib

# A parameter this large (elements) must be sharded on a mesh with fsdp and tensor > 1.
LARGE = 4096


def test_topology_names_follow_cloud_tpu_accelerator_types():
  assert plan_lib.parse_topology("v5p-128")["chips"] == 64  # TensorCores, 2 per chip
  assert plan_lib.parse_topology("v5p-128")["topology"] == "v5p:4x4x4"
  assert plan_lib.parse_topology("v4-8")["topology"] == "v4:2x2x1"
  assert plan_lib.parse_topology("v5litepod-256")["topology"] == "v5e:16x16"
  assert plan_lib.parse_topology("v5e-8")["chips"] == 8  # chips
  assert plan_lib.parse_topology("v6e-8")["hbm_gib"] == 32


def test_unknown_topology_lists_the_valid_names():
  with pytest.raises(ValueError, match=r"unknown --topology 'v5p-3'.*v5p-128.*v6e-256"):
    plan_lib.parse_topology("v5p-3")


def test_mesh_size_must_equal_the_chip_count(capsys):
  status = plan_lib.main(["--config", "configs/tiny_cogvlm.py", "--topology", "v5e-8",
                          "--mesh", "fsdp=4"])
  err = capsys.readouterr().err
  assert status != 0 and "4 devices" in err and "8 chips" in err


def test_missing_libtpu_says_how_to_install(monkeypatch, tmp_path):
  import importlib.util
  import os

  monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "none.so"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(os.path, "abspath", lambda p: str(tmp_path / "a" / "b" / "plan.py"))
  with pytest.raises(ValueError, match=r"bash \.ci/setup.*libtpu==0\.0\.42\.1"):
    plan_lib.libtpu_path()


def _compile(config_file, topology, mesh, backend):
  """plan() of a tiny config's train step for `topology` (batch 8, one microbatch)."""
  config = plan_lib.load_config(config_file, [f"--config.model.attention_backend={backend}"])
  devices = plan_lib.tpu_devices(topology)
  return plan_lib.plan(config, mesh, batch_size=8, devices=devices)


def _replicated_large_params(compiled) -> list:
  """Shapes of the state's arguments with >= LARGE elements whose sharding is replicated."""
  infos = jax.tree.leaves(compiled.args_info[0][0])  # (args, kwargs) -> args -> state
  shardings = jax.tree.leaves(compiled.input_shardings[0][0])
  assert len(infos) == len(shardings)
  return [i.shape for i, s in zip(infos, shardings)
          if math.prod(i.shape) >= LARGE and s.is_fully_replicated]


# The fewest compiles (~30 s each on 2 cores) covering each claim: every topology, both
# variants, both backends, meshes with data, fsdp and tensor > 1 where the slice has 8 chips
# (v5p-8 is 4 chips: fsdp and tensor).
@pytest.mark.slow
@pytest.mark.parametrize("config_file,topology,mesh,backend", [
    ("configs/tiny_cogvlm.py", "v5e-8", dict(data=2, fsdp=2, tensor=2), "auto"),
    ("configs/tiny_cogvlm2.py", "v6e-8", dict(data=2, fsdp=2, tensor=2), "splash"),
    ("configs/tiny_cogvlm2.py", "v5p-8", dict(data=1, fsdp=2, tensor=2), "xla"),
])
def test_train_step_compiles_for_tpu(config_file, topology, mesh, backend):
  result = _compile(config_file, topology, mesh, backend)
  compiled = result["compiled"]
  assert result["platform"] == "tpu"
  memory = result["memory_per_device"]
  assert 0 < memory["total"] < plan_lib.parse_topology(topology)["hbm_gib"] * 2**30
  assert not _replicated_large_params(compiled)
  # `auto` on TPU devices is splash: its Pallas kernel is a Mosaic custom call.
  kernels = compiled.as_text().count("tpu_custom_call")
  assert (kernels > 0) == (backend != "xla")


@pytest.mark.slow
def test_plan_eval_compiles_the_generate_program_for_tpu(capsys):
  """`--eval`: the train step, then eval's prefill + cached decode, both by the TPU compiler,
  each with its per-chip memory, verdict and compile time (tiny model, short prompt)."""
  status = plan_lib.main([
      "--config", "configs/tiny_cogvlm.py", "--topology", "v5e-8",
      "--mesh", "data=2,fsdp=2,tensor=2", "--batch_size", "8", "--seq_len", "24",
      "--eval", "--eval_batch_size", "8", "--eval_prompt_len", "24",
      "--eval_max_new_tokens", "4"])
  out = capsys.readouterr().out
  assert status == 0, out
  assert "v5e-8 train step:" in out
  assert "eval / generate: batch 8 x prompt 24 + 4 new tokens" in out
  eval_part = out.split("eval / generate: batch")[1]
  assert "memory per device (XLA)" in eval_part and "compiled in" in eval_part
  assert "v5e-8 eval / generate:" in eval_part and "of 16 GiB HBM: fits" in eval_part
