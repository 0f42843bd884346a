"""DemoSource: a split of the demo data as a Grain random-access source."""

from __future__ import annotations

import os

from cogvlm_jax.data.demo.storage import SPLITS, load_records


class DemoSource:
  """A split of the demo data as a Grain random-access source of pre-rendered records.

  One record per task example (caption, VQA, grounding): "query", "answer", "template",
  "task", plus "image_bytes" read from the split's webdataset shard (one pread), and
  "source" (the tar) / "key" (the record id) naming it in messages; "error" is a string when
  the bytes cannot be read. Goes through `examples.ExampleBuilder` like every other source.
  """

  def __init__(self, folder: str, split: str = "train"):
    from cogvlm_jax.fileio import RangeReader  # pickles (workers reopen files)

    if split not in SPLITS:
      raise ValueError(f"demo split must be one of {SPLITS}, got {split!r}")
    self.folder, self.split = folder, split
    self.records = load_records(folder, split)
    self._reader = RangeReader()

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    """The raw record `index` (see the class docstring); never raises for an unreadable tar."""
    r = self.records[int(index)]
    out = {k: r[k] for k in ("task", "template", "query", "answer")}
    out.update(key=r.get("id"), image_bytes=None, error=None)
    out["source"] = path = os.path.join(self.folder, r["shard"])
    try:
      out["image_bytes"] = self._reader.read(path, r["image_offset"], r["image_size"])
    except OSError as e:
      out["error"] = f"cannot read image: {e}"
    return out

  def __repr__(self) -> str:
    return f"DemoSource({self.folder!r}, {self.split!r}, records={len(self)})"
