"""The lease lock of workdirs flock cannot lock (gs://), forced on a local folder: refusal
naming the holder, takeover of an expired lease, the heartbeat, the acquire race, release.

Tiny TTLs and no settle wait keep every test well under a second; nothing is timed."""

import io
import json
import os
import socket
import time

import pytest

from cogvlm_jax import cli, fileio

FAST = dict(lease=True, ttl_s=30.0, settle_s=0.0)  # the heartbeat never beats in these tests


def _record(folder):
  with open(os.path.join(folder, fileio.LOCK_FILE)) as f:
    return json.load(f)


def test_a_second_holder_is_refused_naming_host_and_pid_and_exits_5(tmp_path):
  workdir = str(tmp_path / "run")
  with fileio.workdir_lock(workdir, "train.py", **FAST) as lease:
    assert isinstance(lease, fileio.WorkdirLease)
    assert _record(workdir)["pid"] == os.getpid() and _record(workdir)["token"] == lease.token
    expected = (rf"in use by train\.py \(host {socket.gethostname()}, pid {os.getpid()}\)"
                rf".*use another workdir")
    with pytest.raises(fileio.WorkdirBusyError, match=expected):
      with fileio.workdir_lock(workdir, "eval.py", **FAST):
        pass
    # As train.py / eval.py report it: one line, exit 5 (the local lock's status).
    err = io.StringIO()

    def second_run():
      with fileio.workdir_lock(workdir, "eval.py", **FAST):
        pass

    assert cli.run_main(second_run, debug=False, codes=((fileio.WorkdirBusyError, 5),),
                        stderr=err) == 5
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")
    assert _record(workdir)["token"] == lease.token  # the holder's lease untouched
  # Released: the file is gone and the next run takes the workdir.
  assert not os.path.exists(os.path.join(workdir, fileio.LOCK_FILE))
  with fileio.workdir_lock(workdir, "eval.py", **FAST):
    assert _record(workdir)["what"] == "eval.py"


def test_an_expired_lease_is_taken_over_with_a_warning_naming_the_old_holder(tmp_path,
                                                                             caplog):
  workdir = str(tmp_path)
  dead = {"what": "train.py", "host": "tpu-host-7", "pid": 4242, "token": "0" * 32,
          "expires": time.time() - 1}  # a killed holder: its heartbeat stopped
  fileio.write_json_atomic(os.path.join(workdir, fileio.LOCK_FILE), dead)
  with caplog.at_level("WARNING", logger=fileio.__name__):
    with fileio.workdir_lock(workdir, "train.py", **FAST) as lease:
      assert _record(workdir)["token"] == lease.token
  assert "taking over the expired lock of train.py (host tpu-host-7, pid 4242)" in caplog.text
  assert not os.path.exists(os.path.join(workdir, fileio.LOCK_FILE))


def test_a_holder_whose_lease_expired_learns_it_lost_the_workdir(tmp_path):
  """A stalled holder (no renewal past the TTL) is taken over; its next renewal finds the
  other token, `check()` then refuses and its release leaves the new holder's file."""
  workdir = str(tmp_path)
  stalled = fileio.WorkdirLease(workdir, "train.py", ttl_s=30.0, settle_s=0.0)
  stalled.acquire()
  aged = dict(_record(workdir), expires=time.time() - 1)
  fileio.write_json_atomic(os.path.join(workdir, fileio.LOCK_FILE), aged)
  with fileio.workdir_lock(workdir, "eval.py", **FAST) as new:
    assert stalled.renew() is False
    with pytest.raises(fileio.WorkdirBusyError, match=r"in use by eval\.py \(host .*took over"):
      stalled.check()
    stalled.release()
    assert _record(workdir)["token"] == new.token
    new.check()  # the new holder is fine


def test_the_heartbeat_renews_the_lease(tmp_path):
  workdir = str(tmp_path)
  with fileio.workdir_lock(workdir, "train.py", lease=True, ttl_s=2.0, heartbeat_s=0.02,
                           settle_s=0.0) as lease:
    first = _record(workdir)["expires"]
    for _ in range(500):  # a few beats (each 20 ms); bounded, in case the thread is dead
      if lease.renewals >= 2:
        break
      time.sleep(0.01)
    assert lease.renewals >= 2
    record = _record(workdir)
    assert record["token"] == lease.token and record["expires"] > first
  assert not os.path.exists(os.path.join(workdir, fileio.LOCK_FILE))  # heartbeat stopped first


def test_of_two_runs_acquiring_together_the_last_writer_wins(tmp_path):
  """The read-back after the settle wait: a contender that wrote during it wins; the first
  run is refused naming it and leaves its lease in place."""
  workdir = str(tmp_path)
  first = fileio.WorkdirLease(workdir, "train.py", ttl_s=30.0, settle_s=0.0)
  other = fileio.WorkdirLease(workdir, "eval.py", ttl_s=30.0, settle_s=0.0)
  other.pid = 777  # stands for another process
  first._sleep = lambda _: other._write()  # its write lands in first's settle window
  with pytest.raises(fileio.WorkdirBusyError, match=r"in use by eval\.py \(host .*, pid 777\)"
                                                    r" \(it took the lock at the same time\)"):
    first.acquire()
  assert _record(workdir)["token"] == other.token


@pytest.mark.parametrize("text", [b"", b"not json", b"train.py (host h, pid 1)\n"])
def test_an_empty_or_foreign_lock_file_does_not_block(tmp_path, text):
  """An empty file (a released flock lock) is free; an unreadable one is taken over."""
  (tmp_path / fileio.LOCK_FILE).write_bytes(text)
  with fileio.workdir_lock(str(tmp_path), "train.py", **FAST) as lease:
    assert _record(str(tmp_path))["token"] == lease.token


def test_remote_paths_take_the_lease_and_bad_settings_are_refused(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(fileio.WorkdirLease, "acquire", lambda self: seen.append(self.path))
  monkeypatch.setattr(fileio.WorkdirLease, "release", lambda self: None)
  with fileio.workdir_lock("gs://bucket/run", "train.py") as lease:
    assert isinstance(lease, fileio.WorkdirLease)
  assert seen == ["gs://bucket/run/.lock"]
  with pytest.raises(ValueError, match="heartbeat_s must be in"):
    fileio.WorkdirLease(str(tmp_path), "train.py", ttl_s=1.0, heartbeat_s=2.0)


def test_the_lease_and_the_local_lock_refuse_each_other(tmp_path):
  """One run with --workdir_lease and one without on the same local folder: whichever
  comes second is refused, naming the first (neither takes the other's file over)."""
  workdir = str(tmp_path)
  with fileio.workdir_lock(workdir, "train.py"):  # flock
    with pytest.raises(fileio.WorkdirBusyError, match=r"in use by train\.py \(host .*pid"):
      with fileio.workdir_lock(workdir, "eval.py", **FAST):
        pass
  with fileio.workdir_lock(workdir, "train.py", **FAST) as lease:
    with pytest.raises(fileio.WorkdirBusyError,
                       match=r"in use by train\.py \(host .*\) \(lease renewed until"):
      with fileio.workdir_lock(workdir, "eval.py"):
        pass
    assert _record(workdir)["token"] == lease.token  # the lease file left whole
  # Both free again: either kind takes the folder.
  with fileio.workdir_lock(workdir, "eval.py"):
    pass
  with fileio.workdir_lock(workdir, "eval.py", **FAST):
    pass


def test_a_lost_lease_stops_every_process_of_a_multi_host_run(monkeypatch):
  """The training loop's check: process 0's verdict is broadcast, so the other processes
  (no lease of their own) stop too instead of waiting for process 0 in a collective."""
  import jax
  from jax.experimental import multihost_utils

  from cogvlm_jax.training import loop

  sent = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: sent.append(int(x)) or process0_lost)
  process0_lost = 0
  loop._check_lease(None)  # a process other than 0, process 0 still holding the lease
  process0_lost = 1
  with pytest.raises(fileio.WorkdirBusyError, match="process 0 lost this run's workdir lease"):
    loop._check_lease(None)

  class Lost:  # process 0's lease, taken over: its own message, and the verdict sent
    def check(self):
      raise fileio.WorkdirBusyError("w is in use by eval.py (host h, pid 1)")

  with pytest.raises(fileio.WorkdirBusyError, match=r"in use by eval\.py"):
    loop._check_lease(Lost())
  assert sent == [0, 0, 1]


def test_ctrl_c_in_the_settle_wait_leaves_no_lease(tmp_path):
  """Interrupted between writing its lease and reading it back, a run removes its lease: a
  rerun is not refused for ttl_s by a run that never started."""
  lease = fileio.WorkdirLease(str(tmp_path), "train.py", ttl_s=30.0, settle_s=5.0)

  def interrupted(_):
    raise KeyboardInterrupt

  lease._sleep = interrupted
  with pytest.raises(KeyboardInterrupt):
    lease.acquire()
  assert not os.path.exists(tmp_path / fileio.LOCK_FILE)
  with fileio.workdir_lock(str(tmp_path), "train.py", **FAST):
    pass
