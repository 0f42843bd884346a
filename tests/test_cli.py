"""Every command under misuse: one line `error: ...`, a non-zero exit, nothing left behind,
--debug for the traceback (cogvlm_jax/cli.py), and the workdir lock of eval.py.

In-process where the message is the point (fast); one real eval.py process for the exit
status and stderr as a shell sees them."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cogvlm_jax import cli, fileio
from tests.helpers import seeded_reference, write_hf_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(text: str) -> str:
  """The single `error: ...` line of a command's stderr (no traceback)."""
  lines = [line for line in text.splitlines() if line.strip()]
  assert "Traceback" not in text, text
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, text
  return errors[0]


# ---- cli.run_main ----------------------------------------------------------------------------


class _Custom(ValueError):
  pass


@pytest.mark.parametrize("error, codes, status, line", [
    (FileNotFoundError("no config.json at /x"), (), 2, "error: no config.json at /x"),
    (_Custom("bad\nsetting"), ((_Custom, 5),), 5, "error: bad setting"),
    (KeyError("hidden_size"), (), 2, "error: missing 'hidden_size'"),
    (RuntimeError("boom"), (), 1,
     "error: RuntimeError: boom (unexpected; rerun with --debug for the traceback)"),
    (KeyboardInterrupt(), (), 130, "error: interrupted; nothing half-written was kept"),
])
def test_run_main_maps_errors_to_one_line_and_a_status(error, codes, status, line):
  def fail():
    raise error

  err = io.StringIO()
  assert cli.run_main(fail, debug=False, codes=codes, stderr=err) == status
  assert err.getvalue() == line + "\n"
  with pytest.raises(type(error)):  # --debug: the traceback, not the line
    cli.run_main(fail, debug=True, codes=codes, stderr=err)
  assert cli.run_main(lambda: None, debug=False) == 0


# ---- eval.py: bad checkpoints refused, nothing left in OUT -----------------------------------


def _tiny_hf(folder):
  cfg, _, tensors = seeded_reference("tiny-cogvlm")
  write_hf_folder(str(folder), cfg.to_hf_dict(torch_dtype="float32"), tensors)
  return cfg


def _empty(folder):
  folder.mkdir()


def _bad_config_json(folder):
  _tiny_hf(folder)
  (folder / "config.json").write_text('{"hidden_size": 64, "vision_config": ')


def _truncated_weights(folder):
  _tiny_hf(folder)
  path = folder / "model.safetensors"
  os.truncate(path, path.stat().st_size // 2)


def _size_mismatch(folder):
  cfg = _tiny_hf(folder)
  hf = cfg.to_hf_dict(torch_dtype="float32")
  hf["intermediate_size"] *= 2
  (folder / "config.json").write_text(json.dumps(hf))


class _Evil:
  """Unpickling this would call os.system; the weights_only loader must refuse it."""

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def _malicious_pickle(folder):
  cfg = _tiny_hf(folder)
  (folder / "model.safetensors").unlink()
  (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  torch.save({"model.norm.weight": torch.ones(3), "evil": _Evil()},
             str(folder / "pytorch_model.bin"))


@pytest.mark.parametrize("make, message", [
    (_empty, r"not a cogvlm_jax checkpoint|config\.json"),
    (_bad_config_json, r"config\.json: line 1 column \d+: invalid JSON"),
    (_truncated_weights, r"model\.safetensors"),
    (_size_mismatch, r"shape|size"),
    (_malicious_pickle, r"refusing to load: the safe \(weights_only\) unpickler rejected"),
])
def test_eval_refuses_a_bad_checkpoint_in_one_line_leaving_nothing(make, message, data_dir,
                                                                   tmp_path):
  from cogvlm_jax.eval.tasks import run_eval
  from configs.eval import demo

  make(tmp_path / "ckpt")
  config = demo.get_config()
  config.checkpoint, config.data.dir = str(tmp_path / "ckpt"), data_dir
  config.data.max_examples_per_task = 1
  out, err = tmp_path / "out", io.StringIO()
  status = cli.run_main(lambda: run_eval(config, str(out), progress=False), debug=False,
                        stderr=err)
  assert status == 2
  assert __import__("re").search(message, _one_error_line(err.getvalue()))
  assert not out.exists()  # no eval_run.json, no lock file, no folder
  assert not os.path.exists("pwned")


def test_eval_on_a_workdir_in_use_is_refused_at_once(data_dir, tmp_path):
  from cogvlm_jax.eval.tasks import run_eval
  from configs.eval import demo

  config = demo.get_config()
  config.checkpoint, config.data.dir = str(tmp_path / "nowhere"), data_dir
  with fileio.workdir_lock(str(tmp_path / "out"), "train.py"):
    with pytest.raises(fileio.WorkdirBusyError, match=r"in use by train\.py \(host .*pid \d+"):
      run_eval(config, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path / "out") == [fileio.LOCK_FILE]  # the holder's: untouched


@pytest.mark.slow  # a fresh process imports JAX: ~10 s idle, 35 s on 2 busy cores
def test_eval_py_process_exit_status_and_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "eval.py"), "--config",
       os.path.join(ROOT, "configs", "eval", "demo.py"), f"--config.checkpoint={tmp_path}/empty",
       f"--config.data.dir={tmp_path}/no_data", "--workdir", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert _one_error_line(proc.stderr).startswith("error: ")
  assert not (tmp_path / "out").exists()


# ---- chat, convert, plan ---------------------------------------------------------------------


def test_chat_without_a_tokenizer_is_one_line(tmp_path, capsys):
  from cogvlm_jax import chat

  _tiny_hf(tmp_path / "ckpt")
  assert chat.main(["--checkpoint", str(tmp_path / "ckpt"), "--query", "hi"]) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "no tokenizer.model or tokenizer.json in" in line and "--tokenizer" in line


def test_chat_finds_the_tokenizer_of_a_step_dirs_workdir(tmp_path):
  from cogvlm_jax import checkpoint, chat

  step = tmp_path / "run" / checkpoint.CHECKPOINTS_DIR / "20"
  step.mkdir(parents=True)
  (tmp_path / "run" / "tokenizer.model").write_bytes(b"x")
  args = chat.parse_args(["--checkpoint", str(step)])
  assert chat.find_tokenizer(args) == str(tmp_path / "run")


def test_convert_names_a_field_of_the_wrong_type(tmp_path, capsys):
  from cogvlm_jax.convert.__main__ import main

  cfg = _tiny_hf(tmp_path / "hf")
  hf = cfg.to_hf_dict(torch_dtype="float32")
  hf["hidden_size"] = str(hf["hidden_size"])
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
  assert main(["to-jax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "out"),
               "--quiet"]) == 1
  line = _one_error_line(capsys.readouterr().err)
  assert "hidden_size must be an integer, got '64'" in line, line
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no staging folder


def test_plan_bad_mesh_is_one_line(capsys):
  from cogvlm_jax import plan

  assert plan.main(["--config", os.path.join(ROOT, "configs", "tiny_cogvlm.py"),
                    "--mesh", "tensor=0"]) == 2
  assert "bad --mesh entry 'tensor=0'" in _one_error_line(capsys.readouterr().err)


# ---- leftovers of killed runs ----------------------------------------------------------------


def test_staging_folders_of_dead_conversions_are_removed(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  dst = tmp_path / "out"
  stale, live = tmp_path / f"out.tmp-{dead.pid}", tmp_path / f"out.tmp-{os.getppid()}"
  for folder in (stale, live):
    (folder / "out").mkdir(parents=True)
    (folder / "out" / "part").write_bytes(np.zeros(10, np.uint8).tobytes())
  with fileio.atomic_output_dir(str(dst)) as (_, out):
    os.makedirs(out)
  assert not stale.exists() and live.exists() and dst.is_dir()
