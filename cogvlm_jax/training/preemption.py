"""Preemption: SIGTERM on one process, Orbax's preemption sync point on several.

A Cloud TPU VM gets SIGTERM before it is taken away. One process: the flag set by the handler
makes the loop save after the current step and exit. Several processes must stop at the SAME
step, so they use the JAX distributed runtime's preemption notice, read through Orbax's
`CheckpointManager.reached_preemption(step)` (its save policy saves at that step too).
"""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionFlag:
  """Set by SIGTERM while installed (one process, main thread): the loop then saves and exits.

  `reached(step, manager)`: this process's flag with one process; Orbax's preemption sync
  point with several (the runtime then owns SIGTERM, so no handler is installed).
  """

  def __init__(self):
    self.set = False
    self._previous = None

  def _handler(self, signum, frame):
    self.set = True
    print(f"received signal {signum}: saving a checkpoint after this step, then exiting",
          flush=True)

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int, manager) -> bool:
    """Whether to save and stop after `step` (a local check: no collective)."""
    if jax.process_count() == 1:
      return self.set
    return bool(manager.reached_preemption(step))
