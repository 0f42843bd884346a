"""The files an evaluation leaves in its workdir, and how they are read back.

    predictions.jsonl   one line per sample {"id", "prompt", "prediction", "references"},
                        appended (and fsynced) per batch; a rerun skips the ids already there
    eval_run.json       the run signature: what the predictions were made with
    metrics.json        {"task", "checkpoint", "checkpoint_step", "metrics", "config"}
    tensorboard/        the metrics as scalars "eval/<name>" at the checkpoint's training step
    report.html         see report.py

The workdir may be remote (gs://): every file goes through fileio (predictions.jsonl as a
fileio.AppendLog: on an object store rewritten whole at most every 30 s and at the end).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Sequence

from cogvlm_jax import fileio
from cogvlm_jax.fileio import write_json_atomic
from cogvlm_jax.eval.settings import EvalConfigError

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
RUN_FILE = "eval_run.json"
# Settings that change what is predicted: resuming under different ones would mix two runs.
SIGNATURE_KEYS = ("task", "template", "query_format", "max_new_tokens")


def read_predictions(path: str) -> dict[str, dict]:
  """{id: line} of an existing predictions.jsonl ({} when there is none).

  A last line cut short by a crash is truncated away (so appending stays valid JSON lines);
  a later line wins for a repeated id.
  """
  if not fileio.exists(path):
    return {}
  data = fileio.read_bytes(path)
  if data and not data.endswith(b"\n"):
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping an incomplete last line", path)
    data = data[:keep]
    fileio.write_atomic(path, data, mode=0o644)
  out = {}
  for line in data.decode("utf-8").splitlines():
    if line.strip():
      d = json.loads(line)
      out[str(d["id"])] = d
  return out


class PredictionLog:
  """Appends prediction lines; durable per batch, so a crash loses at most one batch (on a
  remote workdir: at most the last 30 s, see fileio.AppendLog; the rerun redoes them).

  `path` None (processes other than 0 of a multi-host run) writes nothing.
  """

  def __init__(self, path: str | None):
    self._log = fileio.AppendLog(path) if path else None

  def append(self, lines: Sequence[Mapping]) -> None:
    if self._log is not None:
      self._log.append("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))

  def close(self) -> None:
    if self._log is not None:
      self._log.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def resolved_checkpoint(path: str) -> str:
  """The absolute path of what is evaluated: a training workdir resolves to its latest step
  (so that resuming after training went on does not mix two steps' predictions)."""
  if not path:
    return ""
  from cogvlm_jax import checkpoint
  try:
    return checkpoint.resolve_step_dir(path)
  except (FileNotFoundError, OSError):
    return fileio.resolve_path(path)


def checkpoint_step(path: str) -> int | None:
  """The training step of a `<workdir>/checkpoints/<step>` checkpoint, else None."""
  from cogvlm_jax import checkpoint
  parent, name = os.path.split(resolved_checkpoint(path))
  if name.isdigit() and os.path.basename(parent) == checkpoint.CHECKPOINTS_DIR:
    return int(name)
  return None


def run_signature(config) -> dict:
  """{SIGNATURE_KEYS..., "checkpoint": resolved path} as stored (tuples as lists)."""
  sig = {k: config[k] for k in SIGNATURE_KEYS}
  sig["checkpoint"] = resolved_checkpoint(config.checkpoint)
  return json.loads(json.dumps(sig))


def check_run_signature(workdir: str, config) -> None:
  """Refuses to resume predictions made with another checkpoint / task / prompt settings
  (`write_run_signature` records ours once the model has loaded)."""
  path = fileio.join(workdir, RUN_FILE)
  sig = run_signature(config)
  if fileio.exists(path) and fileio.exists(fileio.join(workdir, PREDICTIONS_FILE)):
    old = fileio.parse_json(path, fileio.read_bytes(path))
    diff = "; ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in sig.items()
                     if old.get(k) != v)
    if diff:
      raise EvalConfigError(f"{workdir} holds predictions made with other settings ({diff}); "
                            "use another --workdir (or delete its predictions.jsonl) to start over")


def write_run_signature(workdir: str, config) -> None:
  """Writes eval_run.json: what the predictions about to be appended are made with. Written
  only once the model has loaded, so a run refused for bad input leaves no file behind."""
  write_json_atomic(fileio.join(workdir, RUN_FILE), run_signature(config))


def write_metrics(workdir: str, config, metrics: Mapping, config_dict: Mapping) -> None:
  """metrics.json (atomically) and the TensorBoard scalars, at the checkpoint's step."""
  step = checkpoint_step(config.checkpoint)
  write_json_atomic(fileio.join(workdir, METRICS_FILE),
                    {"task": config.task, "checkpoint": resolved_checkpoint(config.checkpoint),
                     "checkpoint_step": step, "metrics": dict(metrics), "config": config_dict})
  write_tensorboard(workdir, metrics, step=step or 0)  # the training step, to line up curves


def write_tensorboard(workdir: str, metrics: Mapping, step: int = 0) -> bool:
  """Scalars "eval/<metric>" under workdir/tensorboard; False (logged) without tensorboardX
  or without its writer for a remote workdir's scheme (metric_writers.tensorboard_supports)."""
  from cogvlm_jax.metric_writers import create_writer
  try:
    # Only process 0 gets here (the evaluator's other processes write no files).
    writer = create_writer(workdir, jsonl=False, is_writer_process=True)
  except ImportError:
    log.warning("tensorboardX is not installed: TensorBoard scalars not written")
    return False
  try:
    if not writer.writes_tensorboard:
      return False
    writer.write(step, metrics, tensorboard_prefix="eval/")
  finally:
    writer.close()
  return True
