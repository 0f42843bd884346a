"""The task table: `run_eval(config, workdir)` runs config.task's `run` (what eval.py calls).

Every task is one file with one `run(config, workdir, *, model=None, tokenizer=None,
mesh=None, progress=True) -> metrics`: caption.py, vqa.py, refcoco.py, gui.py, pope.py,
demo.py.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from cogvlm_jax.eval import caption, demo, gui, pope, refcoco, vqa
from cogvlm_jax.eval.settings import EvalConfigError, resolve

TASKS: dict[str, Callable[..., dict]] = {
    "caption": caption.run,
    "vqa": vqa.run,
    "refcoco": refcoco.run,
    "gui": gui.run,
    "pope": pope.run,
    "demo": demo.run,
}


def run_eval(config, workdir: str, *, lease: bool | None = None, lease_options=None,
             **kw) -> dict:
  """Evaluates config.checkpoint (or kw["model"]) on config.task; the metrics dict.

  kw: model, tokenizer, mesh, progress (see `evaluator.evaluate`). `workdir` may be remote
  (gs://, kept as given); `lease` / `lease_options` as fileio.workdir_lock's (None: the
  lease for a remote workdir, flock for a local one). Raises EvalConfigError for a bad
  config (eval.py prints it as one line), WorkdirBusyError when another process holds
  `workdir` or took it over (a lost lease stops the next write).
  """
  config = resolve(config)
  if config.task not in TASKS:  # the base config knows a task this table lacks
    raise EvalConfigError(f"task {config.task!r} has no run; known: {sorted(TASKS)}")
  with _workdir_lock(workdir, lease, lease_options or {}):
    return TASKS[config.task](config, workdir, **kw)


def _workdir_lock(workdir: str, lease, lease_options):
  """The workdir lock of eval.py (fileio.workdir_lock; WorkdirBusyError names the holder),
  held by process 0: two evaluations appending to one predictions.jsonl would duplicate and
  mix their lines. A remote workdir gets the lease; the files written under it check it
  (fileio.check_held_lease) and stop once it is lost."""
  import jax

  from cogvlm_jax.fileio import workdir_lock
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return workdir_lock(workdir, "eval.py", lease=lease, **lease_options)
