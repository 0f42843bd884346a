"""Metadata filters for image-text pairs, as the CogVLM paper cleaned LAION / COYO.

The paper (section 2.2) removed broken URLs, NSFW images, noisy captions and images with an
aspect ratio above 6 or below 1/6. The usual LAION metadata makes these thresholds:

    min_image_size   drop if min(width, height) < this (pixels)
    max_aspect_ratio drop if max(w, h) / min(w, h) > this (6: keep aspect in 1/6 .. 6)
    min_similarity   drop if the CLIP image-text similarity < this (noisy captions)
    max_punsafe      drop if the NSFW probability > this
    max_pwatermark   drop if the watermark probability > this

Sizes: img2dataset writes `width`/`height` (of the stored, possibly resized image) and
`original_width`/`original_height` (of the downloaded one); the originals are used when
present (they tell the real resolution), else `width`/`height`. Column names are matched
case-insensitively (LAION's own parquet has WIDTH/HEIGHT).

Rules:
* A filter whose column(s) a shard lacks is skipped for that shard, logged once per filter.
* A null value (NaN / None) in a present column passes: missing is not evidence of bad.
* Each dropped sample is counted under the FIRST filter it fails, in the order above, so
  the per-reason counts add up to the number dropped.

Filtering runs when a source builds its sample list, so the source's length is the count
after filtering. Reading parquet needs `pyarrow` (guarded: a clear ImportError only when a
filter needs a parquet file and pyarrow is missing).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Optional

import numpy as np

from cogvlm_jax import fileio

log = logging.getLogger(__name__)

# Filter names in evaluation order (a sample is counted under the first one it fails).
FILTERS = ("min_image_size", "max_aspect_ratio", "min_similarity", "max_punsafe",
           "max_pwatermark")
_SIZE_COLUMNS = (("original_width", "original_height"), ("width", "height"))
_THRESHOLD_COLUMNS = {"min_similarity": "similarity", "max_punsafe": "punsafe",
                      "max_pwatermark": "pwatermark"}


class MetadataFilter:
  """Thresholds on per-sample metadata; build with `from_config`.

  `apply(columns, n)` takes {lower-case column name: float array [n]} (NaN = null) and
  returns (keep bool [n], {reason: dropped count}).
  """

  def __init__(self, min_image_size: Optional[float] = None,
               max_aspect_ratio: Optional[float] = None,
               min_similarity: Optional[float] = None, max_punsafe: Optional[float] = None,
               max_pwatermark: Optional[float] = None):
    self.thresholds = {
        "min_image_size": min_image_size, "max_aspect_ratio": max_aspect_ratio,
        "min_similarity": min_similarity, "max_punsafe": max_punsafe,
        "max_pwatermark": max_pwatermark,
    }
    if max_aspect_ratio is not None and max_aspect_ratio < 1:
      raise ValueError(f"max_aspect_ratio must be >= 1 (it bounds max/min side), got "
                       f"{max_aspect_ratio}")
    self._logged: set[str] = set()  # filters already reported as skipped (log once)
    self._lock = threading.Lock()  # shards are filtered from several threads

  @classmethod
  def from_config(cls, config: Optional[Mapping[str, Any]]) -> "MetadataFilter":
    """From a dict / ConfigDict of the names in FILTERS; None values are disabled.

    Unknown names are an error, so that a typo does not silently disable a filter.
    """
    if config is None:
      return cls()
    if isinstance(config, MetadataFilter):
      return config
    items = dict(config.items())
    unknown = sorted(set(items) - set(FILTERS))
    if unknown:
      raise ValueError(f"unknown filter(s) {unknown}; known: {list(FILTERS)}")
    return cls(**items)

  @property
  def active(self) -> dict[str, float]:
    """The enabled filters and their thresholds."""
    return {k: v for k, v in self.thresholds.items() if v is not None}

  def __bool__(self) -> bool:
    return bool(self.active)

  def __repr__(self) -> str:
    return f"MetadataFilter({', '.join(f'{k}={v}' for k, v in self.active.items())})"

  def __getstate__(self):
    return {"thresholds": self.thresholds}

  def __setstate__(self, state):
    self.__init__(**state["thresholds"])

  def wanted_columns(self) -> set[str]:
    """Lower-case metadata columns the active filters can use."""
    cols: set[str] = set()
    for name in self.active:
      if name in ("min_image_size", "max_aspect_ratio"):
        cols.update(c for pair in _SIZE_COLUMNS for c in pair)
      else:
        cols.add(_THRESHOLD_COLUMNS[name])
    return cols

  def _skip(self, name: str, why: str) -> None:
    with self._lock:
      if name in self._logged:
        return
      self._logged.add(name)
    log.warning("filter %s=%s skipped: %s", name, self.thresholds[name], why)

  def _sizes(self, columns: Mapping[str, np.ndarray]):
    for w, h in _SIZE_COLUMNS:
      if w in columns and h in columns:
        return columns[w], columns[h]
    return None

  def apply(self, columns: Mapping[str, np.ndarray], n: int,
            where: str = "") -> tuple[np.ndarray, dict[str, int]]:
    """keep mask [n] and dropped counts per reason (first failing filter only)."""
    keep = np.ones(n, dtype=bool)
    counts = {name: 0 for name in self.active}
    with np.errstate(invalid="ignore", divide="ignore"):
      for name, threshold in self.active.items():
        if name in ("min_image_size", "max_aspect_ratio"):
          sizes = self._sizes(columns)
          if sizes is None:
            self._skip(name, f"no width/height (or original_width/original_height) metadata "
                       f"{where}".strip())
            continue
          w, h = sizes
          if name == "min_image_size":
            fail = np.minimum(w, h) < threshold  # NaN compares False: null passes
          else:
            fail = np.maximum(w, h) / np.minimum(w, h) > threshold
        else:
          col = _THRESHOLD_COLUMNS[name]
          if col not in columns:
            self._skip(name, f"no {col!r} column {where}".strip())
            continue
          values = columns[col]
          fail = values < threshold if name.startswith("min_") else values > threshold
        fail &= keep  # count each sample under its first failing filter
        counts[name] = int(fail.sum())
        keep &= ~fail
    return keep, counts


# ---- metadata readers ------------------------------------------------------------------


def _require_pyarrow(what: str):
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"{what} needs the `pyarrow` package to read parquet metadata "
                      f"(pip install pyarrow); or remove the metadata filters") from e
  return pq


def read_parquet_columns(path: str, wanted: set[str],
                         key_column: str = "key") -> tuple[list[str], dict[str, np.ndarray]]:
  """(keys, {lower-case column: float64 array}) of the `wanted` columns a parquet file has.

  Nulls become NaN. Columns that are missing are simply absent from the dict.
  """
  pq = _require_pyarrow(f"filtering with metadata from {path}")
  import pyarrow as pa

  with fileio.open_binary(path) as f:
    pf = pq.ParquetFile(f)
    by_lower = {name.lower(): name for name in pf.schema_arrow.names}
    if key_column not in by_lower:
      raise ValueError(f"{path}: no {key_column!r} column to match samples by; columns: "
                       f"{pf.schema_arrow.names}")
    present = sorted(c for c in wanted if c in by_lower)
    table = pf.read(columns=[by_lower[key_column]] + [by_lower[c] for c in present])
  keys = [str(k) for k in table.column(0).to_pylist()]
  columns = {}
  for i, c in enumerate(present, start=1):
    col = table.column(i)
    try:
      col = col.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
      raise ValueError(f"{path}: column {c!r} is not numeric ({col.type})") from e
    columns[c] = col.to_numpy(zero_copy_only=False).astype(np.float64)
  return keys, columns


def columns_from_dicts(records: list[Optional[dict]], wanted: set[str]) -> dict[str, np.ndarray]:
  """Float columns from per-sample metadata dicts (e.g. the {key}.json members).

  A column exists when any record has it; records without it (or without metadata) get NaN.
  """
  present: dict[str, str] = {}  # lower-case -> first spelling seen
  for r in records:
    if r:
      for k in r:
        if isinstance(k, str) and k.lower() in wanted:
          present.setdefault(k.lower(), k)
  out = {}
  for low in present:
    values = np.full(len(records), np.nan)
    for i, r in enumerate(records):
      if not r:
        continue
      v = next((r[k] for k in r if isinstance(k, str) and k.lower() == low), None)
      try:
        values[i] = float(v) if v is not None else np.nan
      except (TypeError, ValueError):
        pass  # a non-numeric value counts as null
    out[low] = values
  return out
