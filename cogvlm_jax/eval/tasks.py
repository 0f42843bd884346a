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


def run_eval(config, workdir: str, **kw) -> dict:
  """Evaluates config.checkpoint (or kw["model"]) on config.task; the metrics dict.

  kw: model, tokenizer, mesh, progress (see `evaluator.evaluate`). Raises EvalConfigError
  for a bad config (eval.py prints it as one line), WorkdirBusyError when another process
  holds `workdir`.
  """
  config = resolve(config)
  if config.task not in TASKS:  # the base config knows a task this table lacks
    raise EvalConfigError(f"task {config.task!r} has no run; known: {sorted(TASKS)}")
  with _workdir_lock(workdir):
    return TASKS[config.task](config, workdir, **kw)


def _workdir_lock(workdir: str):
  """The workdir lock of eval.py (fileio.workdir_lock; WorkdirBusyError names the holder),
  held by process 0 of a local workdir: two evaluations appending to one predictions.jsonl
  would duplicate and mix their lines."""
  import jax

  from cogvlm_jax.fileio import is_remote, workdir_lock
  if jax.process_index() != 0 or is_remote(workdir):
    return contextlib.nullcontext()
  return workdir_lock(workdir, "eval.py")
