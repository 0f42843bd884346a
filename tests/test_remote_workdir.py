"""train.py and eval.py on a remote workdir (gs://), without a network.

`fake_gcs` serves gs://BUCKET/... from a local folder at the two places where the remote code
path meets storage: etils.epath's backend (every file fileio, Orbax's directory handling and
Grain's iterator state write) and the TensorStore kvstore Orbax builds for a gs:// array
directory (its GCS driver replaced by the file driver on the same folder). Everything above
them runs as on GCS: our path handling, the lease, the whole-object rewrites of
metrics.jsonl / predictions.jsonl, Orbax's gs:// commit (commit_success.txt). A local folder
named `gs:` appearing anywhere (os.path.abspath of the URL) fails the tests.
"""

import io
import json
import os

import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from cogvlm_jax import cli, fileio, metric_writers
from cogvlm_jax.eval import outputs
from cogvlm_jax.training import checkpointing, loop
from tests.helpers import tiny_config

LEASE = dict(ttl_s=30.0, settle_s=0.0)  # no heartbeat beats, no settle wait: nothing timed
WORKDIR = "gs://bucket/runs/demo"


class FakeGCS:
  """gs://bucket/x is the local file ROOT/bucket/x."""

  def __init__(self, root):
    self.root = str(root)

  def local(self, path) -> str:
    path = os.fspath(path)
    if path.startswith("gs://"):
      return os.path.join(self.root, path[len("gs://"):])
    return path

  def remote(self, path: str) -> str:
    if path.startswith(self.root + os.sep):
      return "gs://" + path[len(self.root) + 1:]
    return path

  def files(self, url: str) -> list[str]:
    """Every file under gs:// `url`, relative to it, sorted."""
    top = self.local(url)
    return sorted(os.path.relpath(os.path.join(d, f), top)
                  for d, _, names in os.walk(top) for f in names)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import gcs_utils

  fake = FakeGCS(tmp_path / "gcs")
  os.makedirs(fake.root)
  monkeypatch.chdir(tmp_path)  # a stray ./gs:/... would land here
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def one(original, path, *args, **kwargs):
    return original(fake.local(path), *args, **kwargs)

  def open_(original, path, mode):  # an object store has no folders: a write makes them
    if "w" in mode or "a" in mode:
      os.makedirs(os.path.dirname(fake.local(path)), exist_ok=True)
    return original(fake.local(path), mode)

  def two(original, path, dst, *args, **kwargs):
    return original(fake.local(path), fake.local(dst), *args, **kwargs)

  def glob(original, pattern):
    return [fake.remote(p) for p in original(fake.local(pattern))]

  def walk(original, top, **kwargs):
    for d, dirs, files in original(fake.local(top), **kwargs):
      yield fake.remote(d), dirs, files

  def kvstore(path):  # TensorStore's GCS driver -> the file driver on the same folder
    return {"driver": "file", "path": fake.local(path)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  # Asked of the bucket through google-cloud-storage (not installed here): a flat bucket.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(checkpointing, "_importable", lambda module: True)
  fns = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove",
                                "rmtree", "stat")}
  with epath_testing.mock_epath(open=open_, copy=two, rename=two, replace=two, glob=glob,
                                walk=walk, **fns):
    yield fake
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was used as a local one"


def _run(config, workdir, **kw):
  return loop.train_and_evaluate(config, workdir, lease_options=LEASE, **kw)


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.resolve_path("gs://bucket/w") == "gs://bucket/w"
  assert fileio.resolve_path("s3://b/w/") == "s3://b/w/"
  assert fileio.resolve_path("runs/x") == str(tmp_path / "runs" / "x")


def test_train_and_eval_never_make_a_gs_workdir_local(data_dir, tmp_path, monkeypatch):
  """Path handling only: the filesystem calls are mocked (no storage at all). The workdir
  string reaches the lock, the checkpoint manager and the run unchanged; the lock is the
  lease."""
  from cogvlm_jax.eval import tasks

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(checkpointing, "_importable", lambda module: True)
  seen = {}
  monkeypatch.setattr(fileio.WorkdirLease, "acquire", lambda self: seen.setdefault(
      "locks", []).append(self.path))
  monkeypatch.setattr(fileio.WorkdirLease, "release", lambda self: None)

  class Manager:
    def wait_until_finished(self):
      pass

    def close(self):
      pass

  def manager(workdir, config):
    seen["manager"] = workdir
    return Manager()

  def run(config, run_, workdir, manager_, *args):
    seen["run"] = workdir
    seen["lease"] = args[-1]
    return {}

  monkeypatch.setattr(checkpointing, "checkpoint_manager", manager)
  monkeypatch.setattr(loop, "_train_and_evaluate", run)
  loop.train_and_evaluate(tiny_config(data_dir), WORKDIR)
  assert seen["manager"] == seen["run"] == WORKDIR
  assert isinstance(seen["lease"], fileio.WorkdirLease)

  monkeypatch.setitem(tasks.TASKS, "demo", lambda config, workdir, **kw: seen.update(
      eval=workdir) or {})
  from configs.eval import demo as demo_eval
  tasks.run_eval(demo_eval.get_config(), "gs://bucket/eval")
  assert seen["eval"] == "gs://bucket/eval"
  assert seen["locks"] == [WORKDIR + "/.lock", "gs://bucket/eval/.lock"]
  assert not os.path.exists(tmp_path / "gs:")


def test_a_gs_workdir_without_its_packages_is_refused_in_one_line(data_dir, tmp_path,
                                                                  monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(checkpointing, "_importable", lambda module: False)
  err = io.StringIO()
  assert cli.run_main(lambda: loop.train_and_evaluate(tiny_config(data_dir), WORKDIR),
                      debug=False, stderr=err) == 2
  assert err.getvalue() == (f"error: workdir {WORKDIR} is on GCS, which needs "
                            "google-cloud-storage and gcsfs: pip install google-cloud-storage "
                            "gcsfs\n")
  assert os.listdir(tmp_path) == []


def test_metrics_jsonl_on_a_gs_workdir(fake_gcs, caplog):
  path = f"{WORKDIR}/{metric_writers.METRICS_FILE}"
  with caplog.at_level("WARNING"):
    writer = metric_writers.create_writer(WORKDIR, is_writer_process=True)
  assert "TensorBoard scalars not written to gs://bucket/runs/demo/tensorboard" in caplog.text
  for step in (1, 2, 3):
    writer.write(step, {"loss": float(step)})
  writer.flush()  # one whole-object write (the loop flushes before each checkpoint)
  assert [r["step"] for r in metric_writers.read_records(path)] == [1, 2, 3]
  writer.write(4, {"loss": 4.0})
  writer.close()
  assert [r["loss"] for r in metric_writers.read_records(path)] == [1.0, 2.0, 3.0, 4.0]
  # A resume from step 2: the later records go, a cut-off last line too.
  with open(fake_gcs.local(path), "ab") as f:
    f.write(b'{"step": 5, "lo')
  assert metric_writers.drop_records_after(WORKDIR, 2) == 2
  assert open(fake_gcs.local(path), "rb").read().endswith(b"\n")
  writer = metric_writers.create_writer(WORKDIR, tensorboard=False, is_writer_process=True)
  writer.write(3, {"loss": 30.0})
  writer.close()
  assert [r["step"] for r in metric_writers.read_records(path)] == [1, 2, 3]
  assert fake_gcs.files(WORKDIR) == [metric_writers.METRICS_FILE]


def test_a_lost_lease_refuses_further_writes_under_its_workdir(fake_gcs):
  with fileio.workdir_lock(WORKDIR, "eval.py", **LEASE) as lease:
    log = fileio.AppendLog(f"{WORKDIR}/predictions.jsonl")
    log.append("{}\n")
    # Another run took the workdir over (ours stalled past the TTL); our next renewal sees it.
    record = json.loads(open(fake_gcs.local(lease.path)).read())
    fileio.write_json_atomic(fake_gcs.local(lease.path), dict(record, token="other"))
    assert lease.renew() is False
    with pytest.raises(fileio.WorkdirBusyError, match=r"gs://bucket/runs/demo is in use"):
      log.append("{}\n")
    with pytest.raises(fileio.WorkdirBusyError):
      fileio.write_json_atomic(f"{WORKDIR}/metrics.json", {})
    fileio.write_json_atomic("gs://bucket/elsewhere/metrics.json", {})  # other folders: fine
    with pytest.raises(fileio.WorkdirBusyError):  # nor deletes: the folder is the new holder's
      fileio.rmtree(f"{WORKDIR}/eval")
  assert fake_gcs.files(WORKDIR) == [fileio.LOCK_FILE]  # the new holder's lease stays


@pytest.mark.slow  # three short runs, each compiling its step
def test_train_resume_fallback_and_eval_on_a_gs_workdir(data_dir, fake_gcs, tmp_path, capsys):
  """A tiny run on gs://, stopped after step 4, its step 4 then damaged: the rerun moves it
  aside (in the bucket), resumes from step 2 and gives the losses of an uninterrupted local
  run; metrics.jsonl holds one record per step; the tokenizer, checkpoints, eval.json and
  eval/ are in the bucket; the lease is taken and released each time."""
  config = tiny_config(data_dir, steps=6, log_every=1, checkpoint_every=2)
  config.train.tensorboard = False
  straight = _run(config, str(tmp_path / "straight"), evaluate_at_end=False)["losses"]
  first = _run(config, WORKDIR, stop_after_steps=4, evaluate_at_end=False)
  assert first["losses"] == {s: straight[s] for s in (1, 2, 3, 4)}
  assert not fileio.exists(f"{WORKDIR}/{fileio.LOCK_FILE}")  # released
  step4 = fake_gcs.local(f"{WORKDIR}/checkpoints/4")
  for name in fake_gcs.files(f"{WORKDIR}/checkpoints/4/opt_state"):
    if "/d/" in "/" + name:
      os.unlink(os.path.join(step4, "opt_state", name))
  second = _run(config, WORKDIR)
  assert second["losses"] == {s: straight[s] for s in (3, 4, 5, 6)}
  out = capsys.readouterr().out
  assert f"resumed from {WORKDIR}/checkpoints at step 2" in out
  assert "checkpoint step 4 could not be restored" in out
  records = metric_writers.read_records(f"{WORKDIR}/{metric_writers.METRICS_FILE}")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # 3-4 replaced, not doubled
  assert [r["loss"] for r in records] == [straight[s] for s in range(1, 7)]
  files = fake_gcs.files(WORKDIR)
  assert fileio.LOCK_FILE not in files
  assert {metric_writers.METRICS_FILE, loop.EVAL_FILE, "tokenizer.model"} <= set(files)
  assert "checkpoints/6/commit_success.txt" in files  # Orbax's gs:// commit marker
  assert any(f.startswith("checkpoints/4.broken-") for f in files)  # moved aside, kept
  assert f"{loop.EVAL_DIR}/{outputs.PREDICTIONS_FILE}" in files
  assert json.loads(fileio.read_bytes(f"{WORKDIR}/{loop.EVAL_FILE}"))["num_samples"] == 12


@pytest.mark.slow  # one short run, but its step compiles (~20 s on 2 busy cores)
def test_a_run_whose_lease_is_taken_over_stops_with_exit_5(data_dir, fake_gcs, monkeypatch):
  """At a log step the run learns (from the heartbeat's renewal) that another run took its
  workdir over: one line, exit 5 (train.py's status), no checkpoint saved after it, and the
  other run's lock file left in place."""
  config = tiny_config(data_dir, steps=4, log_every=1, checkpoint_every=100)
  config.train.tensorboard = False
  real_check = fileio.WorkdirLease.check
  calls = []

  def check(self):
    calls.append(1)
    if len(calls) == 2:  # after step 2: the other run's lease, seen by our next renewal
      record = json.loads(fileio.read_bytes(self.path))
      fileio.write_atomic(self.path, json.dumps(dict(record, token="other", pid=4242,
                                                     what="train.py")).encode())
      assert self.renew() is False
    real_check(self)

  monkeypatch.setattr(fileio.WorkdirLease, "check", check)
  err = io.StringIO()
  code = cli.run_main(lambda: _run(config, WORKDIR), debug=False,
                      codes=((fileio.WorkdirBusyError, 5),), stderr=err)
  assert code == 5
  assert err.getvalue().count("\n") == 1
  assert err.getvalue().startswith(f"error: {WORKDIR} is in use by train.py (host ")
  assert "pid 4242) (it took over this run's expired lease)" in err.getvalue()
  files = fake_gcs.files(WORKDIR)
  assert not [f for f in files if f.startswith("checkpoints/")]
  assert json.loads(fileio.read_bytes(f"{WORKDIR}/{fileio.LOCK_FILE}"))["token"] == "other"


def test_train_py_workdir_lease_refuses_a_leased_workdir_before_building(tmp_path):
  """`--workdir_lease` (a folder NFS shares between hosts): the lease of a live run on
  another host refuses the workdir at once, in one line, exit 5."""
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  workdir.mkdir()
  fileio.write_json_atomic(str(workdir / fileio.LOCK_FILE), {
      "what": "train.py", "host": "tpu-host-3", "pid": 99, "token": "t" * 32,
      "expires": time.time() + 3600})
  out = subprocess.run(
      [sys.executable, os.path.join(root, "train.py"), "--config",
       os.path.join(root, "configs", "demo.py"), "--workdir", str(workdir), "--workdir_lease",
       f"--config.data.dir={tmp_path / 'data'}"], capture_output=True, text=True,
      cwd=tmp_path, timeout=300)
  assert out.returncode == 5, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"error: {workdir} is in use by train.py (host tpu-host-3, pid 99) (lease renewed until")
  assert "Traceback" not in out.stderr
  assert os.listdir(workdir) == [fileio.LOCK_FILE] and not os.path.exists(tmp_path / "data")
