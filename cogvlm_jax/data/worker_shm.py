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
removes the entries whose PID is no live process on this host; entries of live runs and
untagged ones (other programs) are never touched.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re

from cogvlm_jax.fileio import pid_alive

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
TAG = "cj"  # cogvlm_jax
_DEAD_RUN_NAME = re.compile(rf"^(?:psm_{TAG}(\d+)_|sem\.mp-{TAG}(\d+)-)")


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


def remove_dead_runs_memory(folder: str = SHM_DIR) -> list[str]:
  """Removes the tagged entries of `folder` whose run (PID) is no longer alive on this host;
  returns their names. Only this user's entries can be removed; others' are skipped."""
  try:
    names = os.listdir(folder)
  except OSError:
    return []  # no /dev/shm (macOS): nothing Grain left that we could find
  removed = []
  for name in names:
    match = _DEAD_RUN_NAME.match(name)
    if not match:
      continue
    pid = int(match.group(1) or match.group(2))
    if pid == os.getpid() or pid_alive(pid):
      continue
    try:
      os.unlink(os.path.join(folder, name))
      removed.append(name)
    except OSError:
      pass  # another user's, or removed meanwhile
  if removed:
    log.warning("removed %d shared memory entries of killed data worker runs from %s",
                len(removed), folder)
  return removed
