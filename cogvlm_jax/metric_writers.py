"""Metric writers: the one way train.py and eval.py record numbers.

`create_writer(workdir)` gives a `MetricWriter` that appends JSON lines to
`workdir/metrics.jsonl` and writes TensorBoard scalars to `workdir/tensorboard`, on process 0
only (the other processes get a writer that drops everything).

Why not clu's `metric_writers`: the interface is the same idea (`write_scalars(step, ...)`,
`flush`, `close`), but clu's package imports TensorFlow's summary writer at import time and its
other back end is torch's; we have neither at run time. tensorboardX (pure Python, pinned)
writes the same event files.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Every number in a nested mapping, named "outer/inner" (bools and strings left out)."""
  out = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      out.update(scalars(value, f"{prefix}{key}/"))
    elif _is_number(value):
      out[f"{prefix}{key}"] = float(value)
  return out


def _is_number(value) -> bool:
  if isinstance(value, bool):
    return False
  try:
    import numpy as np
    number_types = (int, float, np.integer, np.floating)
  except ImportError:  # pragma: no cover - numpy is a dependency
    number_types = (int, float)
  return isinstance(value, number_types)


class MetricWriter:
  """Writes records {"step": int, name: value, ...} as JSON lines and TensorBoard scalars."""

  def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None):
    self.jsonl_path = jsonl_path
    self._tb = None
    if tensorboard_dir is not None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(tensorboard_dir, flush_secs=30)

  def write(self, step: int, record: Mapping[str, Any], tensorboard_prefix: str = "") -> None:
    """Appends {"step": step, **record} to the JSON lines file and each number in it (nested
    dicts flattened) as the scalar `tensorboard_prefix + name` at `step`."""
    if self.jsonl_path is not None:
      with open(self.jsonl_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(step), **record}, default=_json_default) + "\n")
    if self._tb is not None:
      for name, value in scalars(record).items():
        if math.isfinite(value):
          self._tb.add_scalar(f"{tensorboard_prefix}{name}", value, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _json_default(value):
  """numpy scalars / arrays in a record become plain JSON numbers / lists."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def create_writer(workdir: str, *, jsonl: bool = True, tensorboard: bool = True,
                  is_writer_process: bool | None = None) -> MetricWriter:
  """The writer of a run in `workdir`: metrics.jsonl and/or TensorBoard events there.

  `is_writer_process` defaults to `jax.process_index() == 0`: on several hosts only process 0
  writes, the others get a writer that writes nothing.
  """
  if is_writer_process is None:
    import jax
    is_writer_process = jax.process_index() == 0
  if not is_writer_process:
    return MetricWriter(None, None)
  os.makedirs(workdir, exist_ok=True)
  return MetricWriter(os.path.join(workdir, METRICS_FILE) if jsonl else None,
                      os.path.join(workdir, TENSORBOARD_DIR) if tensorboard else None)


def read_records(path: str) -> Sequence[dict]:
  """The records of a metrics.jsonl file (a last line cut short by a crash is ignored)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.endswith("\n") and line.strip():
        records.append(json.loads(line))
  return records


def drop_records_after(workdir: str, step: int) -> int:
  """Rewrites workdir/metrics.jsonl without the records of steps after `step` (atomically);
  returns how many it dropped.

  A resumed run replays the steps after its checkpoint: without this, metrics.jsonl would
  hold those steps twice.
  """
  from cogvlm_jax.fileio import write_atomic

  path = os.path.join(workdir, METRICS_FILE)
  records = read_records(path)
  kept = [r for r in records if int(r.get("step", 0)) <= step]
  if len(kept) != len(records) or (os.path.exists(path) and not _ends_with_newline(path)):
    data = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
    write_atomic(path, data, mode=0o644)
  return len(records) - len(kept)


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"

