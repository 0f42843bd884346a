"""`python -m cogvlm_jax.convert`: HF <-> cogvlm_jax, both ways, and every bad input.

The CLI entry point `main(argv)` runs in-process (fast); one test runs it as a real process to
check the exit status and that errors are one line without a traceback.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

import cogvlm_jax
from cogvlm_jax import checkpoint as ckpt
from cogvlm_jax.convert.__main__ import main
from cogvlm_jax.convert.hf import state_to_hf
from cogvlm_jax.convert.safetensors_io import (SafetensorsCheckpoint, SafetensorsFile,
                                               parse_size, write_safetensors)
from cogvlm_jax.sharding import make_mesh
from tests.reference import modeling_cogvlm_ref as ref
from tests.helpers import (TOL, max_diff, prompt_batch, seeded_reference, torch_logits,
                           write_hf_folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["tiny-cogvlm", "tiny-cogvlm2"]


def _cast(tensors, dtype):
  return {k: v.astype(dtype) for k, v in tensors.items()}


def _hf_folder(path, name="tiny-cogvlm", dtype=np.float32, shards=3, extra=True):
  """A Hugging Face folder of the seeded reference model; returns (cfg, torch model, tensors)."""
  cfg, torch_model, tensors = seeded_reference(name)
  tensors = _cast(tensors, dtype)
  torch_dtype = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
  write_hf_folder(str(path), cfg.to_hf_dict(torch_dtype=torch_dtype), tensors, shards)
  if extra:  # non-weight files travel through the conversion
    (path / "modeling_cogvlm.py").write_text("# the original modeling code\n")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 2048}\n')
  return cfg, torch_model, tensors


def _run(*argv):
  return main([*argv, "--quiet"])


def _assert_same_tensors(folder, tensors):
  """Names, shapes, dtypes and bytes of a Hugging Face folder equal `tensors`."""
  got = SafetensorsCheckpoint(str(folder))
  try:
    assert sorted(got.names()) == sorted(tensors)
    for name, want in tensors.items():
      value = got.get(name)
      assert value.dtype == want.dtype, name
      assert value.shape == want.shape, name
      assert value.tobytes() == np.ascontiguousarray(want).tobytes(), name
  finally:
    got.close()


def _no_leftovers(dst):
  parent, base = os.path.split(str(dst))
  assert not os.path.exists(dst)
  assert not [n for n in os.listdir(parent) if n.startswith(base + ".tmp-")]


def _load_into_reference(folder, hf_config):
  """The exported folder loaded by the reference PyTorch model with strict=True."""
  model = ref.CogVLMForCausalLM(hf_config).eval()
  state = {}
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    index = json.load(f)
  for file in sorted(set(index["weight_map"].values())):
    state.update(safetensors.torch.load_file(os.path.join(folder, file)))
  assert set(index["weight_map"]) == set(state)
  model.load_state_dict(state, strict=True)
  return model


# ---- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_exact(tmp_path, name, dtype):
  _, _, tensors = _hf_folder(tmp_path / "hf", name, dtype)
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax")) == 0
  assert _run("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"),
              "--max-shard-size", "100KB") == 0
  _assert_same_tensors(tmp_path / "back", tensors)
  # Same config.json (auto_map, template_version, vision_config, torch_dtype, ...).
  with open(tmp_path / "hf" / "config.json") as f, open(tmp_path / "back" / "config.json") as g:
    assert json.load(g) == json.load(f)
  # Several shards, each within the limit unless one tensor alone is larger.
  with open(tmp_path / "back" / "model.safetensors.index.json") as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2
  total = 0
  for file in files:
    shard = SafetensorsFile(str(tmp_path / "back" / file))
    size = sum(shard.nbytes(n) for n in shard.names())
    assert size <= 100_000 or len(shard.names()) == 1
    assert shard.metadata == {"format": "pt"}
    total += size
    shard.close()
  assert index["metadata"]["total_size"] == total
  # Non-weight files come back too.
  assert (tmp_path / "back" / "modeling_cogvlm.py").read_text() == "# the original modeling code\n"
  assert (tmp_path / "back" / "tokenizer_config.json").exists()
  # The cogvlm_jax checkpoint keeps bf16 as bf16.
  stored = ckpt.params_metadata(str(tmp_path / "jax"))
  assert {d for _, d in stored.values()} == {np.dtype(dtype)}
  assert ckpt.read_model_config(str(tmp_path / "jax")).param_dtype == np.dtype(dtype).name


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_model_matches_reference(tmp_path, name):
  cfg, torch_model, _ = _hf_folder(tmp_path / "hf", name)
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax")) == 0
  model = cogvlm_jax.from_pretrained(str(tmp_path / "jax"))
  assert model.config.variant == cfg.variant
  ids, types, attention, images, rows = prompt_batch(cfg, np.random.default_rng(0), left_pad={0: 2})
  want, _ = torch_logits(torch_model, ids, types, attention, images, rows)
  got = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(images), jnp.asarray(attention))
  assert max_diff(got, want, attention) <= TOL

  # Exported again, the original PyTorch code loads it strictly and computes the same logits.
  assert _run("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back")) == 0
  with open(tmp_path / "back" / "config.json") as f:
    reloaded = _load_into_reference(tmp_path / "back", json.load(f))
  again, _ = torch_logits(reloaded, ids, types, attention, images, rows)
  np.testing.assert_array_equal(again, want)


def test_dtype_cast_both_ways(tmp_path):
  _, _, tensors = _hf_folder(tmp_path / "hf", "tiny-cogvlm", np.float32, extra=False)
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax"),
              "--dtype", "bfloat16") == 0
  assert {d.name for _, d in ckpt.params_metadata(str(tmp_path / "jax")).values()} == {
      "bfloat16"}
  assert _run("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"),
              "--dtype", "float32") == 0
  with open(tmp_path / "back" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "float32"
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
  _assert_same_tensors(tmp_path / "back", rounded)


# ---- PyTorch .bin input ----------------------------------------------------------------


def _write_bin_folder(folder, hf_config, tensors, shards):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f)
  as_torch = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
              if v.dtype == ml_dtypes.bfloat16 else torch.from_numpy(v)
              for k, v in tensors.items()}
  if shards == 1:
    torch.save(as_torch, os.path.join(folder, "pytorch_model.bin"))
    return
  names = list(tensors)
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
    file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
    torch.save({names[j]: as_torch[names[j]] for j in chunk}, os.path.join(folder, file))
    weight_map.update({names[j]: file for j in chunk})
  with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("name,dtype,shards", [("tiny-cogvlm", np.float32, 1),
                                               ("tiny-cogvlm2", ml_dtypes.bfloat16, 3)])
def test_bin_input(tmp_path, name, dtype, shards):
  cfg, _, tensors = seeded_reference(name)
  tensors = _cast(tensors, dtype)
  _write_bin_folder(str(tmp_path / "bin"), cfg.to_hf_dict(), tensors, shards)
  assert _run("to-jax", "--src", str(tmp_path / "bin"), "--dst", str(tmp_path / "jax")) == 0
  assert _run("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back")) == 0
  _assert_same_tensors(tmp_path / "back", tensors)
  # from_pretrained reads .bin folders directly too.
  model = cogvlm_jax.from_pretrained(str(tmp_path / "bin"))
  exported = state_to_hf(model.config, nnx.state(model))
  for k in tensors:
    assert exported[k].tobytes() == tensors[k].tobytes(), k


def test_bin_refuses_arbitrary_pickles(tmp_path, capsys):
  cfg, _, _ = seeded_reference("tiny-cogvlm")
  folder = tmp_path / "bin"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  torch.save({"model.norm.weight": torch.ones(3), "evil": _Evil()},
             str(folder / "pytorch_model.bin"))
  _fails(tmp_path, capsys, ["to-jax", "--src", str(folder)],
         r"pytorch_model.bin: refusing to load: the safe \(weights_only\) unpickler rejected "
         r"it.*GLOBAL posix.system")
  assert not os.path.exists("pwned")


class _Evil:
  """Unpickling this would call os.system; weights_only=True must refuse it."""

  def __reduce__(self):
    return (os.system, ("echo pwned",))


# ---- training checkpoints --------------------------------------------------------------


def _training_run(workdir, model_cfg, recipe="stage1", step=3):
  """A checkpoint written by the training loop's own `save_checkpoint` (real layout)."""
  import grain

  from cogvlm_jax.training import checkpointing, input_pipeline
  from cogvlm_jax.training.state import build_setup, init_train_state
  from configs.demo import get_config

  config = get_config()
  config.model = model_cfg.to_dict()
  config.recipe = recipe
  config.train.async_checkpoint = False
  mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  setup = build_setup(model_cfg, recipe, config.optim, 10, mesh)
  state = init_train_state(setup, seed=0)
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  manager = checkpointing.checkpoint_manager(str(workdir), config)
  checkpointing.save_checkpoint(manager, state, data_iter,
                                checkpointing.stored_run_config(config, model_cfg),
                                input_pipeline.DataCounts().counts)
  manager.wait_until_finished()
  manager.close()
  return setup, state


def test_export_training_checkpoint(tmp_path):
  from cogvlm_jax.training.state import model_from_state

  model_cfg = cogvlm_jax.preset("tiny-cogvlm2")
  setup, state = _training_run(tmp_path / "run", model_cfg)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3" / "opt_state")
  model = model_from_state(setup, state)
  want = state_to_hf(model_cfg, nnx.state(model))
  # From the workdir (latest step) and from the step directory itself.
  for src in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "3"):
    dst = tmp_path / f"hf-{src.name}"
    assert _run("to-hf", "--src", str(src), "--dst", str(dst)) == 0
    _assert_same_tensors(dst, want)
    with open(dst / "config.json") as f:
      hf_config = json.load(f)
    for key in ("auto_map", "template_version", "vision_config", "num_multi_query_heads"):
      assert key in hf_config
    _load_into_reference(dst, hf_config)  # complete: strict=True passes
  # from_pretrained reads the training run too.
  loaded = cogvlm_jax.from_pretrained(str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded)),
               nnx.to_pure_dict(nnx.state(model)))


# ---- from_pretrained on our checkpoints ------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_from_pretrained_checkpoint_with_mesh_keeps_bf16(tmp_path):
  _, _, tensors = _hf_folder(tmp_path / "hf", "tiny-cogvlm", ml_dtypes.bfloat16)
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax")) == 0
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = cogvlm_jax.from_pretrained(str(tmp_path / "jax"), mesh=mesh)
  gate = model.layers.mlp.vision_mlp.gate_proj.get_value()
  assert gate.dtype == jnp.bfloat16
  assert tuple(gate.sharding.spec)[:3] == (None, "fsdp", "tensor")
  exported = state_to_hf(model.config, nnx.state(model))
  for k in tensors:
    assert exported[k].tobytes() == tensors[k].tobytes(), k
  upcast = cogvlm_jax.from_pretrained(str(tmp_path / "jax"), param_dtype=jnp.float32)
  assert upcast.layers.mlp.vision_mlp.gate_proj.get_value().dtype == jnp.float32


def test_save_params_then_load(tmp_path):
  cfg = cogvlm_jax.preset("tiny-cogvlm")
  model = cogvlm_jax.create_model(cfg, seed=3)
  ckpt.save_params(str(tmp_path / "w"), nnx.state(model), cfg)
  params = ckpt.load_params(str(tmp_path / "w"))
  jax.tree.map(np.testing.assert_array_equal, params, nnx.to_pure_dict(nnx.state(model)))


# ---- bad input -------------------------------------------------------------------------


def _fails(tmp_path, capsys, argv, pattern, dst=None):
  """The conversion exits 1 with a message matching `pattern`, leaving nothing behind."""
  dst = dst or str(tmp_path / "out")
  capsys.readouterr()
  assert _run(*argv, "--dst", dst) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  import re

  assert re.search(pattern, err), err
  _no_leftovers(dst)
  return err


@pytest.fixture
def tiny(tmp_path):
  cfg, _, tensors = seeded_reference("tiny-cogvlm")
  return cfg, tensors


def test_missing_unexpected_and_misshaped_tensors(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  missing = dict(tensors)
  del missing["model.layers.1.mlp.vision_mlp.up_proj.weight"]
  write_hf_folder(str(tmp_path / "missing"), cfg.to_hf_dict(), missing)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "missing")],
         r"missing 1 tensors \['model.layers.1.mlp.vision_mlp.up_proj.weight'\]")

  extra = dict(tensors, **{"model.extra.weight": np.zeros(2, np.float32)})
  write_hf_folder(str(tmp_path / "extra"), cfg.to_hf_dict(), extra, shards=2)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "extra")],
         r"unexpected 1 tensors \['model.extra.weight'\].*model-00002-of-00002.safetensors")

  wrong = dict(tensors)
  wrong["model.norm.weight"] = np.ones(3, np.float32)
  write_hf_folder(str(tmp_path / "wrong"), cfg.to_hf_dict(), wrong)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "wrong")],
         r"model.norm.weight has shape \(3,\), expected \(64,\).*model.safetensors")


def test_config_does_not_match_weights(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  hf = cfg.to_hf_dict()
  write_hf_folder(str(tmp_path / "wide"), dict(hf, hidden_size=128), tensors)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "wide")],
         r"tensors do not fit the config \(does config.json belong to these weights\?\): "
         r"model.embed_tokens.weight has shape \(128, 64\), expected \(128, 128\)")
  write_hf_folder(str(tmp_path / "deep"), dict(hf, num_hidden_layers=3), tensors)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "deep")],
         r"missing 13 tensors \['model.layers.2.*num_hidden_layers=3")
  write_hf_folder(str(tmp_path / "novision"), {k: v for k, v in hf.items()
                                               if k != "vision_config"}, tensors)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "novision")],
         r"config.json has no 'vision_config'")
  os.makedirs(tmp_path / "noconfig")
  write_safetensors(str(tmp_path / "noconfig" / "model.safetensors"), tensors)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "noconfig")],
         r"no config.json in .*noconfig")
  # to-hf: a checkpoint whose stored config disagrees with its weights.
  write_hf_folder(str(tmp_path / "ok"), hf, tensors)
  assert _run("to-jax", "--src", str(tmp_path / "ok"), "--dst", str(tmp_path / "jax")) == 0
  meta = tmp_path / "jax" / "config" / "metadata"
  stored = json.loads(meta.read_text())
  stored["model"]["intermediate_size"] = 128
  meta.write_text(json.dumps(stored))
  _fails(tmp_path, capsys, ["to-hf", "--src", str(tmp_path / "jax")],
         r"parameters do not fit its config: adapter/linear_proj/dense_4h_to_h has shape "
         r"\(96, 64\), expected \(128, 64\)")


def test_truncated_and_missing_shards(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  write_hf_folder(str(tmp_path / "cut"), cfg.to_hf_dict(), tensors, shards=3)
  shard = tmp_path / "cut" / "model-00002-of-00003.safetensors"
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) - 100])
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "cut")],
         r"model-00002-of-00003.safetensors: tensor '.*' ends at byte \d+ but the file has "
         r"\d+ bytes \(truncated shard\?\)")
  shard.unlink()
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "cut")],
         r"names shards that do not exist: \['model-00002-of-00003.safetensors'\]")

  _write_bin_folder(str(tmp_path / "bincut"), cfg.to_hf_dict(), tensors, shards=2)
  shard = tmp_path / "bincut" / "pytorch_model-00001-of-00002.bin"
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "bincut")],
         r"pytorch_model-00001-of-00002.bin: cannot read PyTorch checkpoint \(truncated or "
         r"corrupt shard\?\)")


def test_dtypes_it_cannot_handle(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  ints = dict(tensors, **{"model.norm.weight": np.ones(64, np.int32)})
  write_hf_folder(str(tmp_path / "ints"), cfg.to_hf_dict(), ints)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "ints")],
         r"tensor model.norm.weight \(model.safetensors\) has dtype int32; weights must be "
         r"floating point")
  doubles = dict(tensors, **{"model.norm.weight": np.ones(64, np.float64)})
  write_hf_folder(str(tmp_path / "doubles"), cfg.to_hf_dict(), doubles)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "doubles")],
         r"model.norm.weight \(model.safetensors\) has dtype float64.*with --dtype")
  assert _run("to-jax", "--src", str(tmp_path / "doubles"), "--dst", str(tmp_path / "cast"),
              "--dtype", "float32") == 0
  # A dtype the safetensors reader does not know (fp8), named with its file.
  folder = tmp_path / "fp8"
  write_hf_folder(str(folder), cfg.to_hf_dict(), tensors)
  path = folder / "model.safetensors"
  data = bytearray(path.read_bytes())
  header = data[8:8 + int.from_bytes(data[:8], "little")]
  patched = header.replace(b'"dtype":"F32"', b'"dtype":"F8E"', 1)  # same length
  data[8:8 + len(header)] = patched
  path.write_bytes(bytes(data))
  _fails(tmp_path, capsys, ["to-jax", "--src", str(folder)],
         r"model.safetensors: tensor '.*' has unsupported dtype F8E")


def test_bad_paths_and_options(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "nope")],
         r"source folder .*nope does not exist")
  os.makedirs(tmp_path / "empty")
  _fails(tmp_path, capsys, ["to-hf", "--src", str(tmp_path / "empty")],
         r"is not a cogvlm_jax checkpoint")
  write_hf_folder(str(tmp_path / "hf"), cfg.to_hf_dict(), tensors)
  _fails(tmp_path, capsys, ["to-hf", "--src", str(tmp_path / "hf")],
         r"is not a cogvlm_jax checkpoint")
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax")) == 0
  _fails(tmp_path, capsys, ["to-hf", "--src", str(tmp_path / "jax"), "--max-shard-size",
                            "lots"], r"cannot parse size 'lots'")
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "hf")],
         r"must not be, contain, or be inside the source", dst=str(tmp_path / "hf" / "sub"))
  assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
  assert parse_size("1.5MB") == 1_500_000 and parse_size("1000") == 1000


def test_overwrite(tmp_path, capsys, tiny):
  cfg, tensors = tiny
  write_hf_folder(str(tmp_path / "hf"), cfg.to_hf_dict(), tensors)
  dst = tmp_path / "jax"
  dst.mkdir()
  (dst / "keep.txt").write_text("old")
  capsys.readouterr()
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(dst)) == 1
  assert "already exists; pass --overwrite" in capsys.readouterr().err
  assert (dst / "keep.txt").read_text() == "old"
  # A failing conversion with --overwrite leaves the old destination as it was.
  bad = dict(tensors)
  del bad["lm_head.weight"]
  write_hf_folder(str(tmp_path / "bad"), cfg.to_hf_dict(), bad)
  assert _run("to-jax", "--src", str(tmp_path / "bad"), "--dst", str(dst), "--overwrite") == 1
  assert (dst / "keep.txt").read_text() == "old"
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(dst), "--overwrite") == 0
  assert not (dst / "keep.txt").exists()
  assert ckpt.is_jax_checkpoint(str(dst))
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_failure_midway_leaves_nothing(tmp_path, capsys, monkeypatch, tiny):
  """An error after some tensors were written (a read error in the last shard)."""
  cfg, tensors = tiny
  write_hf_folder(str(tmp_path / "hf"), cfg.to_hf_dict(), tensors, shards=3)
  original = SafetensorsFile.get

  def flaky(self, name, out=None):
    if name == "lm_head.weight":
      raise ValueError(f"{self.path}: unexpected end of file reading tensor {name!r}")
    return original(self, name, out)

  monkeypatch.setattr(SafetensorsFile, "get", flaky)
  _fails(tmp_path, capsys, ["to-jax", "--src", str(tmp_path / "hf")],
         r"unexpected end of file reading tensor 'lm_head.weight'")
  monkeypatch.setattr(SafetensorsFile, "get", original)
  assert _run("to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax")) == 0

  def broken(*args, **kwargs):
    raise ValueError("disk full (simulated)")

  import cogvlm_jax.convert.safetensors_io as sio

  calls = {"n": 0}
  original_write = sio.ShardedSafetensorsWriter.write

  def write_then_fail(self, name, tensor):
    calls["n"] += 1
    if calls["n"] == 20:
      broken()
    return original_write(self, name, tensor)

  monkeypatch.setattr(sio.ShardedSafetensorsWriter, "write", write_then_fail)
  _fails(tmp_path, capsys, ["to-hf", "--src", str(tmp_path / "jax"), "--max-shard-size",
                            "10KB"], r"disk full \(simulated\)")


def test_cli_process_exit_status_and_progress(tmp_path, tiny):
  cfg, tensors = tiny
  write_hf_folder(str(tmp_path / "hf"), cfg.to_hf_dict(), tensors)
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "cogvlm_jax.convert"]
  bad = subprocess.run(cmd + ["to-jax", "--src", str(tmp_path / "nope"), "--dst",
                              str(tmp_path / "x")], capture_output=True, text=True, env=env)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: source folder")
  assert "Traceback" not in bad.stderr
  ok = subprocess.run(cmd + ["to-jax", "--src", str(tmp_path / "hf"), "--dst",
                             str(tmp_path / "jax")], capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  assert "65/65 tensors" in ok.stderr  # the progress bar
  assert ok.stdout.startswith("to-jax: 65 tensors, ") and "MB/s" in ok.stdout


def test_benchmark_script_runs():
  """benchmarks/convert_memory.py end to end on a tiny model (keeps the script working)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "convert_memory.py"),
                         "--tiny"], capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "round trip bit-exact: 65 tensors" in proc.stdout
  assert "peak RSS / checkpoint size:" in proc.stdout
