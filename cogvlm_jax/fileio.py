"""File access for the whole project: local paths, or remote ones (gs://...) through etils.

The one owner of "write it so that a crash never leaves half a file": `write_atomic` /
`write_json_atomic` for files, `atomic_output_dir` for a folder built in a staging place and
renamed into position. Readers (`read_bytes`, `open_binary`, `RangeReader`, `expand_paths`)
serve the data sources.

Workdirs may be remote (train.py / eval.py on gs://): `resolve_path` keeps a URL as given
(only local paths are made absolute), `makedirs` / `rmtree` / `write_atomic` /
`AppendLog` (metrics.jsonl, predictions.jsonl: object stores have no append) write either
kind, and `workdir_lock` locks either (flock locally, a `WorkdirLease` on remote paths).

Local files are read with `os.pread` (no shared file position, so one descriptor serves every
thread); remote files with seek + read on a handle owned by one thread. Either way handles
are opened lazily, per process and per thread, and never pickled, so a source can be sent to
Grain worker processes and opens its own files there.

Remote access needs `etils.epath` plus a backend for the scheme (gcsfs, or TensorFlow's
tf.io.gfile); a missing piece gives an ImportError that says what to install.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)


def is_remote(path: str) -> bool:
  """True for URLs such as gs://bucket/x (anything with a scheme)."""
  return "://" in path


def _epath(path: str):
  """etils.epath.Path for a remote path, with a clear error when it cannot be had."""
  try:
    from etils import epath
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs the `etils` package with its epath extra and a backend for "
        f"the scheme (for gs://: `pip install etils[epath] gcsfs`, or TensorFlow for "
        f"tf.io.gfile)") from e
  return epath.Path(path)


def _remote_call(path: str, fn):
  """Runs fn(); turns epath's 'install a backend' ImportError into one naming the path."""
  try:
    return fn()
  except ImportError as e:
    raise ImportError(f"cannot access {path!r}: {e} (etils.epath needs gcsfs or TensorFlow "
                      f"for gs:// paths)") from e


def expand_paths(paths: Union[PathLike, Sequence[PathLike]], suffix: str) -> list[str]:
  """Files named by `paths`: files, folders (every `*{suffix}` inside) or glob patterns.

  Each pattern / folder expands to its matches in sorted order; the overall order follows
  `paths`. A pattern or folder that matches nothing is an error (a typo should not silently
  train on nothing).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: list[str] = []
  for p in paths:
    p = os.fspath(p)
    if is_remote(p):
      out.extend(_expand_remote(p, suffix))
      continue
    if any(c in p for c in "*?["):
      matches = sorted(glob.glob(p))
      if not matches:
        raise FileNotFoundError(f"no file matches {p!r}")
      out.extend(matches)
    elif os.path.isdir(p):
      matches = sorted(glob.glob(os.path.join(glob.escape(p), f"*{suffix}")))
      if not matches:
        raise FileNotFoundError(f"no *{suffix} file in folder {p!r}")
      out.extend(matches)
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise FileNotFoundError(f"{p!r} does not exist")
  return out


def _expand_remote(p: str, suffix: str) -> list[str]:
  path = _epath(p)
  if any(c in p for c in "*?["):
    parent, pattern = p.rsplit("/", 1)
    matches = _remote_call(p, lambda: sorted(str(m) for m in _epath(parent).glob(pattern)))
  elif _remote_call(p, path.is_dir):
    matches = _remote_call(p, lambda: sorted(str(m) for m in path.glob(f"*{suffix}")))
  else:
    matches = [p] if _remote_call(p, path.exists) else []
  if not matches:
    raise FileNotFoundError(f"no file matches {p!r}")
  return matches


def stat(path: str) -> tuple[int, int]:
  """(size in bytes, modification time in ns) of a file."""
  if is_remote(path):
    st = _remote_call(path, _epath(path).stat)
    return int(st.length), int(st.mtime * 1e9)
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def exists(path: str) -> bool:
  if is_remote(path):
    return _remote_call(path, _epath(path).exists)
  return os.path.isfile(path)


def read_bytes(path: str) -> bytes:
  """A whole file (small files: images, JSON, parquet)."""
  if is_remote(path):
    return _remote_call(path, _epath(path).read_bytes)
  with open(path, "rb") as f:
    return f.read()


def parse_json(path: str, data: bytes | str) -> Any:
  """`data` (the contents of `path`) as JSON; a ValueError naming the file, line and column
  (json's own message names neither the file nor, for a truncated file, says it ended)."""
  try:
    return json.loads(data)
  except json.JSONDecodeError as e:
    ended = " (the file ends there: truncated?)" if e.pos >= len(e.doc.rstrip()) else ""
    raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: "
                     f"{e.msg}{ended}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_jsonl(path: str, data: bytes) -> list:
  """The objects of JSON Lines `data` (the contents of `path`); blank lines are skipped. A bad
  line raises ValueError naming the file and its true line number (counting from 1)."""
  out = []
  for number, line in enumerate(data.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {number} column {e.colno}: invalid JSON: "
                       f"{e.msg}") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: line {number}: not UTF-8 text ({e.reason})") from None
  return out


def open_binary(path: str):
  """A seekable binary file object (for tarfile and pyarrow)."""
  if is_remote(path):
    return _remote_call(path, lambda: _epath(path).open("rb"))
  return open(path, "rb")


def join(folder: str, name: str) -> str:
  if is_remote(folder):
    return folder.rstrip("/") + "/" + name
  return os.path.join(folder, name)


def resolve_path(path: PathLike) -> str:
  """`path` as a run keeps it (workdirs, checkpoints): a URL (gs://bucket/x, anything with a
  scheme) exactly as given, a local path made absolute. os.path.abspath alone would turn
  gs://bucket/w into the local folder ./gs:/bucket/w."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  """Creates folder `path` and its parents (local or remote); an existing one is fine."""
  if is_remote(path):
    _remote_call(path, lambda: _epath(path).mkdir(parents=True, exist_ok=True))
  else:
    os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
  """Deletes folder `path` with everything in it (local or remote); a missing one is fine.
  Refused (WorkdirBusyError) under a workdir whose lease this process lost, as writes are:
  the folder is then the new holder's."""
  check_held_lease(path)
  if is_remote(path):
    p = _epath(path)
    if _remote_call(path, p.exists):
      _remote_call(path, p.rmtree)
  else:
    shutil.rmtree(path, ignore_errors=True)


class AppendLog:
  """A file that lines are appended to (metrics.jsonl, predictions.jsonl).

  Local: appended in place, flushed and fsynced per `append` (a crash loses at most the
  append in progress; readers drop a last line cut short). Remote (object stores have no
  append): the file's text is kept in memory and the whole object rewritten (`write_atomic`:
  one object write, never half a file) once `rewrite_every_s` has passed since the last
  write, at `flush()` and at `close()`; a crash then loses at most the lines of that window
  (the rerun redoes them). `rewrite=True` forces the remote way on a local path (tests).
  Every write first checks a workdir lease this process holds over the file
  (`check_held_lease`): a run that lost its workdir stops writing to it.
  """

  def __init__(self, path: str, *, rewrite: Optional[bool] = None,
               rewrite_every_s: float = 30.0):
    self.path = path
    self.rewrite = is_remote(path) if rewrite is None else bool(rewrite)
    self.rewrite_every_s = float(rewrite_every_s)
    self._f = None
    if self.rewrite:
      self._data = bytearray(read_bytes(path) if exists(path) else b"")
      self._dirty, self._written_at = False, time.monotonic()
    else:
      self._f = open(path, "ab")

  def append(self, text: str) -> None:
    check_held_lease(self.path)
    data = text.encode("utf-8")
    if self._f is not None:
      self._f.write(data)
      self._f.flush()
      os.fsync(self._f.fileno())
      return
    self._data += data
    self._dirty = True
    if time.monotonic() - self._written_at >= self.rewrite_every_s:
      self.flush()

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()
    elif self._dirty:
      check_held_lease(self.path)
      write_atomic(self.path, bytes(self._data), mode=0o644)
      self._dirty, self._written_at = False, time.monotonic()

  def close(self) -> None:
    try:
      self.flush()
    finally:
      if self._f is not None:
        self._f.close()
        self._f = None


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
  """Writes `data` to `path` so that readers see either the old file or the whole new one.

  Local: a temporary file in the same folder, fsync, then os.replace (atomic on POSIX).
  Remote object stores: one object write, which is atomic there. Raises OSError (e.g.
  PermissionError for a read-only folder) when the folder cannot be written. `mode` sets the
  local file's permissions (e.g. 0o644 for files meant to be shared). Refused
  (WorkdirBusyError) under a workdir whose lease this process lost (`check_held_lease`).
  """
  check_held_lease(path)
  if is_remote(path):
    _remote_call(path, lambda: _epath(path).write_bytes(data))
    return
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    if mode is not None:
      os.chmod(tmp, mode)  # mkstemp makes the file owner-only
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def write_json_atomic(path: str, obj: Any, mode: int | None = 0o644) -> None:
  """`obj` as indented, key-sorted UTF-8 JSON, written with `write_atomic`."""
  data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
  write_atomic(path, data, mode=mode)


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False) -> Iterator[tuple[str, str]]:
  """Yields (staging dir, output path); the output is renamed to `dst` only on success.

  Everything is written under `DST.tmp-<pid>/`; on any error (or Ctrl-C) that folder is
  removed and `dst` is untouched. Such folders of dead processes (kill -9) are removed first. With `overwrite`, an existing `dst` is replaced only after
  the new output is complete.
  """
  dst = os.path.abspath(dst)
  for stale in remove_stale_staging_dirs(dst):
    log.warning("removed %s, left by a killed earlier run", stale)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"destination {dst} already exists; pass --overwrite to replace it")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  stage = f"{dst}.tmp-{os.getpid()}"
  if os.path.lexists(stage):
    shutil.rmtree(stage)
  os.makedirs(stage)
  out = os.path.join(stage, "out")
  try:
    yield stage, out
    if not os.path.isdir(out):
      raise RuntimeError(f"no output was written to {out}")
    if os.path.lexists(dst):
      os.rename(dst, os.path.join(stage, "replaced"))
    os.rename(out, dst)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir (its host and PID are in the message)."""


@contextlib.contextmanager
def workdir_lock(workdir: str, what: str, *, lease: Optional[bool] = None,
                 **lease_options) -> Iterator[Optional["WorkdirLease"]]:
  """Holds an exclusive lock on `workdir` for the block; refuses a second holder.

  Local paths: `flock` on WORKDIR/.lock, which the kernel releases when the holder dies
  (kill -9 included), so a stale lock never blocks a rerun; the file's text names the holder
  ("what (host H, pid P)") for the refusal message. flock is per host (on NFS it depends on
  the server): runs on several hosts take it on process 0 only. Yields None.

  Remote paths (gs://, anything flock cannot lock), or any path with `lease=True`: a
  `WorkdirLease` (a lock file with an expiry, renewed by a heartbeat; see its docstring for
  what it guarantees and what not), yielded so the holder can `check()` it before writing.
  `lease_options` go to WorkdirLease (ttl_s, heartbeat_s, settle_s).

  On a local folder the two kinds also refuse each other: a lease is not taken while another
  process holds the folder's flock, nor the flock while an unexpired lease is in the file.

  Either way a live holder gives WorkdirBusyError "WORKDIR is in use by what (host H,
  pid P); ...", which train.py and eval.py exit with as status 5.
  """
  if lease is None:
    lease = is_remote(workdir)
  if lease:
    holder = WorkdirLease(workdir, what, **lease_options)
    holder.acquire()
    try:
      yield holder
    finally:
      holder.release()
    return
  import fcntl
  import socket

  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    os.close(fd)
    raise _busy(workdir, holder) from None
  leased = _lease_record(os.pread(fd, 4096, 0))  # a --workdir_lease run holds it (no flock)
  if leased and not _lease_expired(leased):
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    raise _busy(workdir, _lease_holder(leased), f" (lease renewed until {_utc(leased)})")
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_text(what, socket.gethostname(), os.getpid()) + "\n").encode(), 0)
    yield None
  finally:
    os.ftruncate(fd, 0)  # no holder named once released
    if created:
      _remove_if_only_lock(workdir, path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _holder_text(what: str, host: str, pid: int) -> str:
  return f"{what} (host {host}, pid {pid})"


def _busy(workdir: str, holder: str, detail: str = "") -> WorkdirBusyError:
  """The one refusal of a workdir in use (flock and lease alike)."""
  return WorkdirBusyError(f"{workdir} is in use by {holder}{detail}; wait for it to finish "
                          f"or use another workdir")


LEASE_TTL_S = 120.0  # a lease not renewed for this long is taken for its holder's death
LEASE_SETTLE_S = 5.0  # wait between writing a new lease and reading it back


class WorkdirLease:
  """A lock on a workdir that flock cannot lock (gs://): WORKDIR/.lock holding a lease.

  The file is JSON: what, host, pid, a random token and `expires` (Unix time). Acquiring:
    1. read the file; a lease of another token that has not expired refuses the workdir
       (WorkdirBusyError naming its host and PID, as the local lock does); an expired or
       unreadable one is taken over with a warning naming the old holder;
    2. write our lease (one object write: atomic on GCS, a rename locally);
    3. wait `settle_s`, read it back and refuse if another token is there: of two runs
       starting together, the last writer wins and the other sees it.
  A daemon thread renews the lease every `heartbeat_s` (default ttl_s / 4), reading it back
  first: if another token is there the lease was lost (we stalled past the TTL and were
  taken over); renewal then stops, an error is logged and `check()` raises. `release()`
  stops the heartbeat and removes the file if it still holds our token.

  What it guarantees: a live, renewing holder is never taken over; a second run started
  while the lease is held is refused at once; of runs racing to acquire, at most one
  proceeds provided each goes from its read (step 1) to its write (step 2) in less than
  `settle_s`; a killed holder blocks the workdir for at most `ttl_s`.
  What not (epath has no create-if-absent, e.g. GCS's if_generation_match=0): a contender
  that stalls more than `settle_s` between its read and its write can overwrite a lease
  that was just taken, and both proceed until the first one's next renewal finds the other
  token (up to `heartbeat_s` later: the loser then stops at its next `check()`); expiry
  compares the writer's clock with the reader's, so hosts' clocks must agree to well within
  `ttl_s - heartbeat_s`; a holder stalled for longer than `ttl_s` (a frozen VM) is taken
  over although it may wake up and write once more before its `check()`.
  """

  def __init__(self, workdir: str, what: str, *, ttl_s: float = LEASE_TTL_S,
               heartbeat_s: Optional[float] = None, settle_s: float = LEASE_SETTLE_S):
    if not ttl_s > 0 or settle_s < 0:
      raise ValueError(f"lease ttl_s must be > 0 and settle_s >= 0, got {ttl_s}, {settle_s}")
    import socket
    import uuid

    self.workdir, self.what = workdir, what
    self.path = join(workdir, LOCK_FILE)
    self.ttl_s, self.settle_s = float(ttl_s), float(settle_s)
    self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.ttl_s / 4
    if not 0 < self.heartbeat_s < self.ttl_s:
      raise ValueError(f"lease heartbeat_s must be in (0, ttl_s), got {self.heartbeat_s}")
    self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex
    self.renewals = 0  # heartbeat renewals so far
    self.lost_to: Optional[str] = None  # the holder that took the lease over, once lost
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._sleep = time.sleep  # the settle wait (a test makes a contender write in it)

  def acquire(self) -> None:
    """Takes the lease (steps 1-3 above) and starts the heartbeat; WorkdirBusyError if
    another holder has it."""
    if not is_remote(self.path):  # a run holding the local lock (flock) of this folder
      flocked = _flock_holder(self.path)
      if flocked is not None:
        raise _busy(self.workdir, flocked)
    current = self._read()
    if current is not None and current.get("token") != self.token:
      holder = _lease_holder(current)
      if not self._expired(current):
        raise _busy(self.workdir, holder, f" (lease renewed until {_utc(current)})")
      log.warning("%s: taking over the expired lock of %s (its lease ran out at %s without "
                  "renewal: that run is dead or stalled)", self.workdir, holder, _utc(current))
    self._write()
    try:
      self._sleep(self.settle_s)  # a racing contender's write lands in this window
      current = self._read()
    except BaseException:  # Ctrl-C in the wait: leave no lease that blocks a rerun for ttl_s
      self._remove_if_ours()
      raise
    if current is None or current.get("token") != self.token:
      raise _busy(self.workdir, _lease_holder(current) if current else "another process",
                  " (it took the lock at the same time)")
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease",
                                    daemon=True)
    self._thread.start()
    _HELD_LEASES[id(self)] = self

  def renew(self) -> bool:
    """Extends the lease by ttl_s if it is still ours; False (and `lost_to` set) if not."""
    current = self._read()
    if current is not None and current.get("token") != self.token:
      self.lost_to = _lease_holder(current)
      log.error("%s: the workdir lock was taken over by %s; this run must stop writing",
                self.workdir, self.lost_to)
      return False
    self._write()
    self.renewals += 1
    return True

  def check(self) -> None:
    """WorkdirBusyError once the lease was lost (call before writing to the workdir)."""
    if self.lost_to is not None:
      raise _busy(self.workdir, self.lost_to, " (it took over this run's expired lease)")

  def release(self) -> None:
    """Stops the heartbeat; removes the lock file if it still holds our lease."""
    self._stop.set()
    _HELD_LEASES.pop(id(self), None)
    if self._thread is not None:
      self._thread.join()
    self._remove_if_ours()

  def _remove_if_ours(self) -> None:
    """Removes the lock file if it holds our lease; a failure is a warning (it expires)."""
    try:
      current = self._read()
      if current is not None and current.get("token") == self.token:
        remove(self.path)
    except Exception as e:  # noqa: BLE001 -- must not hide the block's own error
      log.warning("%s: could not remove the workdir lock (%s); it expires within %.0f s",
                  self.workdir, e, self.ttl_s)

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self.renew():
          return
      except Exception as e:  # noqa: BLE001 -- a network error: retry at the next beat
        log.warning("%s: could not renew the workdir lock (%s); retrying", self.workdir, e)

  def _expired(self, record: dict) -> bool:
    return _lease_expired(record)

  def _read(self) -> Optional[dict]:
    """The lease in the file; None when there is none; {} when unreadable."""
    try:  # exists() first: tf.io.gfile's missing-file error is no FileNotFoundError
      if not exists(self.path):
        return None
      data = read_bytes(self.path)
    except FileNotFoundError:  # released between the two calls
      return None
    return _lease_record(data)

  def _write(self) -> None:
    record = {"what": self.what, "host": self.host, "pid": self.pid, "token": self.token,
              "expires": time.time() + self.ttl_s}
    if not is_remote(self.workdir):
      os.makedirs(self.workdir, exist_ok=True)
    write_atomic(self.path, json.dumps(record).encode("utf-8"), mode=0o644)


def _lease_record(data: bytes) -> Optional[dict]:
  """The lease in a lock file's bytes; None when empty (free: a released local lock); {}
  when unreadable (not a lease: e.g. the text of a local flock holder)."""
  if not data.strip():
    return None
  try:
    record = json.loads(data)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _lease_expired(record: dict) -> bool:
  try:
    return float(record["expires"]) < time.time()
  except (KeyError, TypeError, ValueError):
    return True  # not a lease of ours (unreadable): nobody can be renewing it


def _flock_holder(path: str) -> Optional[str]:
  """The holder text of local lock file `path` while a live process holds its flock
  (workdir_lock without the lease), else None: a lease must not take such a folder over."""
  import fcntl

  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # none (free), or unreadable: the lease's own read says why
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    except OSError:
      return None  # a filesystem without flock (some NFS setups): the lease alone decides
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


# The leases this process holds (acquired, not yet released), for check_held_lease.
_HELD_LEASES: dict[int, WorkdirLease] = {}


def check_held_lease(path: str) -> None:
  """WorkdirBusyError if `path` lies in a workdir whose lease this process held and lost
  (WorkdirLease.check); nothing for other paths. Cheap: reads the heartbeat's flag."""
  for lease in list(_HELD_LEASES.values()):
    root = lease.workdir.rstrip("/")
    if path == root or path.startswith(root + "/"):
      lease.check()


def _lease_holder(record: dict) -> str:
  """'what (host H, pid P)' of a lease record (as the local lock names its holder)."""
  if not record.get("host"):
    return "an unreadable lock file"
  return _holder_text(record.get("what", "a run"), record["host"], record.get("pid", "?"))


def _utc(record: dict) -> str:
  try:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record["expires"])))
  except (KeyError, TypeError, ValueError):
    return "an unknown time"


def remove(path: str) -> None:
  """Deletes a file (local or remote); a file already gone is no error."""
  try:
    if is_remote(path):
      _remote_call(path, _epath(path).unlink)
    else:
      os.unlink(path)
  except FileNotFoundError:
    pass


def _remove_if_only_lock(workdir: str, lock_path: str) -> None:
  """Removes a workdir this lock created when the run left nothing else in it (it failed
  before writing anything), so that refused bad input leaves no folder behind. Done while
  still holding the lock, so no other run is using the folder."""
  try:
    if os.listdir(workdir) == [os.path.basename(lock_path)]:
      os.unlink(lock_path)
      os.rmdir(workdir)
  except OSError:
    pass  # something appeared meanwhile: then the folder is in use and stays


def pid_alive(pid: int) -> bool:
  """True when a process `pid` exists on this host (signal 0 probes without signalling)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # it exists, under another user
  return True


def remove_stale_staging_dirs(dst: str) -> list[str]:
  """Removes `DST.tmp-<pid>` folders (atomic_output_dir's staging) of processes that are
  gone: a conversion killed with kill -9 cannot clean up after itself, and its staging can
  be as large as the whole output. Live processes' folders are kept. Returns what went."""
  dst = os.path.abspath(dst)
  removed = []
  for stage in glob.glob(glob.escape(dst) + ".tmp-*"):
    pid = stage.rsplit(".tmp-", 1)[1]
    if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
      shutil.rmtree(stage, ignore_errors=True)
      removed.append(stage)
  return removed


def user_cache_dir(*parts: str) -> str:
  """$COGVLM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/cogvlm_jax, else ~/.cache/cogvlm_jax."""
  root = os.environ.get("COGVLM_JAX_CACHE_DIR")
  if not root:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(xdg, "cogvlm_jax")
  return os.path.join(root, *parts)


def path_digest(path: str) -> str:
  """A short stable name for a path (the absolute path for local files)."""
  full = path if is_remote(path) else os.path.abspath(path)
  return hashlib.sha1(full.encode("utf-8")).hexdigest()[:16]


class RangeReader:
  """Reads byte ranges of files; picklable, thread-safe, opens files lazily.

  Each thread keeps its own least-recently-used set of at most `max_open_files` open
  handles (per-thread, so that closing an evicted handle can never race a read in another
  thread). After a fork the inherited handles are dropped and files are reopened.
  """

  def __init__(self, max_open_files: int = 32):
    if max_open_files < 1:
      raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
    self.max_open_files = max_open_files
    self._local = threading.local()

  def __getstate__(self):
    return {"max_open_files": self.max_open_files}

  def __setstate__(self, state):
    self.__init__(state["max_open_files"])

  def _handle(self, path: str):
    local = self._local
    if getattr(local, "pid", None) != os.getpid():  # new thread, or a forked child
      local.pid = os.getpid()
      local.files = collections.OrderedDict()
    files = local.files
    f = files.get(path)
    if f is not None:
      files.move_to_end(path)
      return f
    f = open_binary(path) if is_remote(path) else open(path, "rb", buffering=0)
    files[path] = f
    while len(files) > self.max_open_files:
      _, old = files.popitem(last=False)
      old.close()
    return f

  def read(self, path: str, offset: int, size: int) -> bytes:
    """Exactly `size` bytes at `offset`; OSError if the file ends before that."""
    f = self._handle(path)
    if not is_remote(path) and hasattr(os, "pread"):
      chunks, got = [], 0
      while got < size:  # pread may return fewer bytes than asked (signals, network FS)
        b = os.pread(f.fileno(), size - got, offset + got)
        if not b:
          break
        chunks.append(b)
        got += len(b)
      data = b"".join(chunks)
    else:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise OSError(f"{path}: expected {size} bytes at offset {offset}, file ended after "
                    f"{len(data)}")
    return data

  def close(self) -> None:
    """Closes this thread's handles."""
    for f in getattr(self._local, "files", {}).values():
      f.close()
    self._local.files = collections.OrderedDict()

