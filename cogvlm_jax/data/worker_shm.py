"""The shared memory of Grain worker processes (data.num_workers > 0): named by run, and the
entries of dead runs removed at the next start.

Grain 0.2.18's `mp_prefetch` passes each batch from a worker to the main process in a POSIX
shared memory segment (`/dev/shm/psm_<random>`, made in the worker, unlinked by the main
process once read) and synchronises through multiprocessing's named semaphores
(`/dev/shm/sem.mp-<random>`). A main process killed with kill -9 never unlinks the segments
in flight nor the semaphores, and the names say nothing about whose they were, so nobody can
tell later which are garbage; hundreds pile up over a few killed runs.

So the names carry the main process's PID: `psm_cj<PID>_<random>` (set in each worker by
`name_worker_memory`, Grain's worker_init_fn) and `sem.mp-cj<PID>-<n>` (`name_semaphores`,
in the main process). `remove_dead_runs_memory` (called when a pipeline with workers starts)
removes the entries whose PID is no live process on this host.

Untagged entries of Python's multiprocessing (`psm_*`, `sem.mp-*`: left by runs of older
cogvlm_jax versions, by semaphores made outside `name_semaphores`, or by other Python
programs) name no owner, so they are removed only when nothing can still want them: owned
by this user, untouched (mtime) for at least `MIN_UNTAGGED_AGE_S`, and open or mapped by no
live process (every /proc/PID/fd and /proc/PID/maps readable here is checked). Without a
readable /proc nothing untagged is removed. What this cannot see: a segment held by nobody
between its writer closing it and its reader attaching by name (Grain's batches are, for
as long as they wait in the prefetch buffer: seconds, far below the age threshold; a run
whose main process stalls for over an hour with batches buffered could lose them), and
processes of other users (they cannot open this user's 0600 entries, root aside). Other
names are never touched.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time

from cogvlm_jax.fileio import pid_alive

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
TAG = "cj"  # cogvlm_jax
PROC_DIR = "/proc"
_DEAD_RUN_NAME = re.compile(rf"^(?:psm_{TAG}(\d+)_|sem\.mp-{TAG}(\d+)-)")
# Python multiprocessing's own names: shared_memory segments and named semaphores.
_PYTHON_MP_NAME = re.compile(r"^(?:psm_|sem\.mp-)")
# Untagged entries must be this old (mtime) besides being held by no live process. The /proc
# check is what protects a live run (a semaphore's file is never modified after creation, so
# its age is its run's); the age covers the moment between creating an entry and opening it,
# and programs that keep a segment's name only and attach later.
MIN_UNTAGGED_AGE_S = 3600.0


def name_worker_memory(main_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """Grain worker_init_fn (bind main_pid with functools.partial): this worker's shared
  memory segments are named `psm_cj<main_pid>_<random>`.

  multiprocessing.shared_memory builds names from two module constants; the length cap is
  macOS's 31-character limit, far below Linux's 255. Without them (another Python) the
  names stay untagged: never cleaned, never wrongly removed.
  """
  from multiprocessing import shared_memory
  if not hasattr(shared_memory, "_SHM_NAME_PREFIX") or os.name != "posix":
    return
  prefix = f"/psm_{TAG}{main_pid}_"
  shared_memory._SHM_NAME_PREFIX = prefix
  shared_memory._SHM_SAFE_NAME_LENGTH = len(prefix) + 16  # 8 random bytes, as hex


def name_semaphores() -> None:
  """Named semaphores made by this (main) process from now on are `sem.mp-cj<PID>-<n>`."""
  config = getattr(multiprocessing.current_process(), "_config", None)
  if isinstance(config, dict):
    config["semprefix"] = f"/mp-{TAG}{os.getpid()}"


def remove_dead_runs_memory(folder: str = SHM_DIR, *,
                            min_untagged_age_s: float = MIN_UNTAGGED_AGE_S,
                            proc_dir: str = PROC_DIR) -> list[str]:
  """Removes what killed runs left in `folder` (/dev/shm; a temporary folder in tests) and
  returns the names removed: tagged entries whose run (PID) is dead on this host, and
  untagged multiprocessing entries older than `min_untagged_age_s` that no live process has
  open or mapped (`proc_dir`: /proc, scanned only when there is such a candidate). Only this
  user's entries are considered. Logs the counts."""
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return []  # no /dev/shm (macOS): nothing Grain left that we could find
  mine = [n for n in names if _owned_by_me(os.path.join(folder, n))]
  tagged = [n for n in mine if _tag_pid(n) is not None]
  dead = [n for n in tagged if _tag_pid(n) != os.getpid() and not pid_alive(_tag_pid(n))]
  untagged = [n for n in mine if n not in tagged and _PYTHON_MP_NAME.match(n)]
  stale = _unused_old_entries(folder, untagged, min_untagged_age_s, proc_dir)
  removed_dead, removed_stale = _unlink(folder, dead), _unlink(folder, stale)
  if removed_dead or removed_stale:
    log.warning("removed %d shared memory entries of killed runs from %s: %d named by a dead "
                "run's PID, %d untagged multiprocessing entries older than %.0f s and open "
                "in no live process", len(removed_dead) + len(removed_stale), folder,
                len(removed_dead), len(removed_stale), min_untagged_age_s)
  return removed_dead + removed_stale


def _tag_pid(name: str):
  """The main PID a tagged entry names, or None for an untagged one."""
  match = _DEAD_RUN_NAME.match(name)
  return int(match.group(1) or match.group(2)) if match else None


def _owned_by_me(path: str) -> bool:
  """A regular file of this user (not a folder, link or another user's entry)."""
  try:
    st = os.lstat(path)
  except OSError:
    return False  # removed meanwhile
  return st.st_uid == os.getuid() and os.path.isfile(path) and not os.path.islink(path)


def _unused_old_entries(folder: str, names: list[str], min_age_s: float,
                        proc_dir: str) -> list[str]:
  """The `names` not modified for `min_age_s` and held by no live process; [] when /proc
  cannot be read (then nothing can be proven unused)."""
  now = time.time()
  old = []
  for name in names:
    try:
      if now - os.stat(os.path.join(folder, name)).st_mtime >= min_age_s:
        old.append(name)
    except OSError:
      pass
  if not old:
    return []  # the common case: no /proc scan
  in_use = paths_in_use(proc_dir)
  if in_use is None:
    return []
  real = os.path.realpath(folder)
  return [n for n in old if os.path.join(real, n) not in in_use]


def paths_in_use(proc_dir: str = PROC_DIR):
  """The set of file paths some live process has open (/proc/PID/fd/*) or mapped
  (/proc/PID/maps), over the processes readable here; None without a readable `proc_dir`.

  A process that exits during the scan simply contributes what was read of it."""
  try:
    pids = [p for p in os.listdir(proc_dir) if p.isdigit()]
  except OSError:
    return None
  if not pids:
    return None  # not a procfs
  paths: set[str] = set()
  for pid in pids:
    fd_dir = os.path.join(proc_dir, pid, "fd")
    try:
      fds = os.listdir(fd_dir)
    except OSError:
      fds = []  # another user's, or exited
    for fd in fds:
      try:
        paths.add(os.readlink(os.path.join(fd_dir, fd)))
      except OSError:
        pass
    try:
      with open(os.path.join(proc_dir, pid, "maps"), encoding="utf-8",
                errors="replace") as f:
        for line in f:
          fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
          if len(fields) == 6:
            paths.add(fields[5].rstrip("\n"))
    except OSError:
      pass
  return paths


def _unlink(folder: str, names: list[str]) -> list[str]:
  """Removes `names` from `folder`; returns those actually removed."""
  removed = []
  for name in names:
    try:
      os.unlink(os.path.join(folder, name))
      removed.append(name)
    except OSError:
      pass  # removed meanwhile, or not ours to remove
  return removed
