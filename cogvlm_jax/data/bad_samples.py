"""Bad samples: the reasons a record cannot become an example, and their running counts.

A record that cannot become a training example becomes a placeholder (see
`examples.ExampleBuilder`) and is counted here under its reason. The placeholder's
"bad_reason" is 1 + its index in REASONS (0: a real example), so a batch's counts per reason
are one bincount (`bad_reason_counts`) wherever the batch is consumed — also right with
worker processes, whose counters live in the workers. When more than `max_bad_ratio` of the
samples seen so far (after `min_samples` of them) are bad, the next one raises
`BadDataError` naming the sources (shards) with most bad samples: a broken dataset stops the
run instead of silently training on placeholders.
"""

from __future__ import annotations

import collections
import threading
from typing import Optional

import numpy as np

# Reasons a sample is replaced by a placeholder (the counter's keys).
REASONS = ("image_missing", "image_corrupt", "image_too_large", "caption_missing",
           "box_invalid", "too_long", "record_error")


class BadDataError(RuntimeError):
  """Too large a share of the input is bad; the message names the worst sources."""


class BadSample(Exception):
  """Raised while building an example: this record becomes a placeholder for `reason`."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason  # one of REASONS


class BadSampleCounter:
  """Thread-safe running counts of samples seen and of bad ones, per reason and source.

  Counted when a sample is BUILT: with prefetching, slightly ahead of the training step.
  """

  def __init__(self, max_bad_ratio: float = 1.0, min_samples: int = 100):
    if not 0.0 <= max_bad_ratio <= 1.0:
      raise ValueError(f"max_bad_ratio must be in [0, 1], got {max_bad_ratio}")
    self.max_bad_ratio = max_bad_ratio
    self.min_samples = max(1, int(min_samples))
    self._lock = threading.Lock()
    self.total = 0
    self.by_reason: collections.Counter = collections.Counter()
    self.by_source: collections.Counter = collections.Counter()
    self.examples: dict[str, str] = {}  # reason -> the first message seen for it

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"]  # locks do not pickle; each worker process gets its own
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def bad(self) -> int:
    return sum(self.by_reason.values())

  def add(self, bad_reason: Optional[str] = None, source: str = "", message: str = "") -> None:
    """Counts one sample (bad when `bad_reason` is given); raises BadDataError over the limit."""
    with self._lock:
      self.total += 1
      if bad_reason is None:
        return
      self.by_reason[bad_reason] += 1
      self.by_source[source] += 1
      self.examples.setdefault(bad_reason, message)
      total, bad = self.total, sum(self.by_reason.values())
      if total >= self.min_samples and bad > self.max_bad_ratio * total:
        worst = ", ".join(f"{s} ({n})" for s, n in self.by_source.most_common(5))
        reasons = ", ".join(f"{r}: {n} (e.g. {self.examples[r]})"
                            for r, n in self.by_reason.most_common())
        raise BadDataError(
            f"{bad} of {total} samples are bad ({bad / total:.1%} > max_bad_ratio="
            f"{self.max_bad_ratio:.1%}). Sources with most bad samples: {worst}. "
            f"Reasons: {reasons}")

  def snapshot(self) -> dict:
    """{"samples", "bad", "bad_ratio", "bad/<reason>": n} for the training logs."""
    with self._lock:
      total, bad = self.total, sum(self.by_reason.values())
      out = {"samples": total, "bad": bad, "bad_ratio": bad / total if total else 0.0}
      out.update({f"bad/{r}": n for r, n in sorted(self.by_reason.items())})
      return out


def bad_reason_counts(batch) -> dict[str, int]:
  """{reason: number of placeholders} of a batch (its int32 [B] "bad_reason"), zeros left out."""
  counts = np.bincount(np.asarray(batch["bad_reason"]).ravel(), minlength=len(REASONS) + 1)
  return {r: int(n) for r, n in zip(REASONS, counts[1:]) if n}


def classify_image_error(error: str) -> str:
  """An error string of a source / `decode_image` -> one of REASONS."""
  e = error.lower()
  if "too large" in e:
    return "image_too_large"
  if "cannot decode" in e or "cannot identify" in e or "empty size" in e:
    return "image_corrupt"
  if "no image bytes" in e or "not found" in e or "cannot read image" in e:
    return "image_missing"
  return "record_error"
