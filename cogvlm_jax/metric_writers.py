"""Metric writers: the one way train.py and eval.py record numbers.

`create_writer(workdir)` gives a `MetricWriter` that appends JSON lines to
`workdir/metrics.jsonl` and writes TensorBoard scalars to `workdir/tensorboard`, on process 0
only (the other processes get a writer that drops everything). A remote workdir (gs://) works
too: metrics.jsonl through fileio.AppendLog (the object rewritten whole, at the latest at each
`flush`, which the training loop calls before each checkpoint), TensorBoard through
tensorboardX's own writer for the scheme, or skipped with a warning when it has none.

Why not clu's `metric_writers`: the interface is the same idea (`write_scalars(step, ...)`,
`flush`, `close`), but clu's package imports TensorFlow's summary writer at import time and its
other back end is torch's; we have neither at run time. tensorboardX (pure Python, pinned)
writes the same event files.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping, Sequence

from cogvlm_jax import fileio

log = logging.getLogger(__name__)

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
    self._jsonl = fileio.AppendLog(jsonl_path) if jsonl_path is not None else None
    self._tb = None
    if tensorboard_dir is not None and tensorboard_supports(tensorboard_dir):
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(tensorboard_dir, flush_secs=30)

  @property
  def writes_tensorboard(self) -> bool:
    """False when TensorBoard was asked for but its folder cannot be written (logged)."""
    return self._tb is not None

  def write(self, step: int, record: Mapping[str, Any], tensorboard_prefix: str = "") -> None:
    """Appends {"step": step, **record} to the JSON lines file and each number in it (nested
    dicts flattened) as the scalar `tensorboard_prefix + name` at `step`."""
    if self._jsonl is not None:
      self._jsonl.append(json.dumps({"step": int(step), **record}, default=_json_default)
                         + "\n")
    if self._tb is not None:
      for name, value in scalars(record).items():
        if math.isfinite(value):
          self._tb.add_scalar(f"{tensorboard_prefix}{name}", value, int(step))

  def flush(self) -> None:
    """Makes every record so far durable (remote: rewrites metrics.jsonl if it changed)."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    try:
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
    finally:
      if self._tb is not None:
        self._tb.close()
        self._tb = None


def tensorboard_supports(folder: str) -> bool:
  """True if tensorboardX can write event files to `folder`: local, or a URL whose scheme it
  has a writer for (gs:// needs google-cloud-storage, s3:// boto3). Otherwise False with a
  one-line warning (the metrics still go to metrics.jsonl); tensorboardX would make the URL
  a local folder."""
  if not fileio.is_remote(folder):
    return True
  from tensorboardX import record_writer
  scheme = folder.split("://", 1)[0]
  enabled = {"gs": getattr(record_writer, "GCS_ENABLED", False),
             "s3": getattr(record_writer, "S3_ENABLED", False)}
  if scheme in record_writer.REGISTERED_FACTORIES and enabled.get(scheme, True):
    return True
  need = {"gs": "google-cloud-storage", "s3": "boto3"}.get(scheme, f"a {scheme}:// writer")
  log.warning("TensorBoard scalars not written to %s: tensorboardX needs %s for it "
              "(metrics.jsonl has every number)", folder, need)
  return False


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
  fileio.makedirs(workdir)
  return MetricWriter(fileio.join(workdir, METRICS_FILE) if jsonl else None,
                      fileio.join(workdir, TENSORBOARD_DIR) if tensorboard else None)


def read_records(path: str) -> Sequence[dict]:
  """The records of a metrics.jsonl file, local or remote (a last line cut short by a crash
  is ignored)."""
  return _parse_records(_read(path))


def _read(path: str) -> bytes | None:
  return fileio.read_bytes(path) if fileio.exists(path) else None


def _parse_records(data: bytes | None) -> list[dict]:
  records = []
  for line in (data or b"").splitlines(keepends=True):
    if line.endswith(b"\n") and line.strip():
      records.append(json.loads(line))
  return records


def drop_records_after(workdir: str, step: int) -> int:
  """Rewrites workdir/metrics.jsonl without the records of steps after `step` (atomically);
  returns how many it dropped.

  A resumed run replays the steps after its checkpoint: without this, metrics.jsonl would
  hold those steps twice.
  """
  path = fileio.join(workdir, METRICS_FILE)
  data = _read(path)
  records = _parse_records(data)
  kept = [r for r in records if int(r.get("step", 0)) <= step]
  if len(kept) != len(records) or (data and not data.endswith(b"\n")):
    text = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
    fileio.write_atomic(path, text, mode=0o644)
  return len(records) - len(kept)

