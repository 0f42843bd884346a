"""A run's training data from its config: named sources, the task each one trains, weights.

`config.data.mixture` maps a name to a source spec; `build_mixture` turns it into the
random-access sources and weights that `pipeline.mixture_dataset` mixes. Every spec has
`kind` and `weight`; the other fields depend on the kind:

    kind="webdataset"  LAION-style img2dataset shards (`sources.WebDatasetSource`)
        paths        a .tar, a folder, a glob or a list of them (gs:// too)
        task         "caption" (the .txt) or "grounding" (boxes in the .json, see below)
        filters      MetadataFilter settings, e.g. dict(min_image_size=224,
                     max_aspect_ratio=6.0, min_similarity=0.28, max_punsafe=0.5)
        index_dir    where tar indexes are cached ("" = beside the shards)
        shard_files_per_host  True: each host indexes only its share of the tar files
                     (for billions of samples); False: every host indexes all of them and
                     keeps every process_count-th sample
    kind="arrayrecord" raw records copied by `sources.arrayrecord.write_arrayrecord` (for
                       sources that cannot be read at random): paths, task as webdataset
    kind="llava"       LLaVA instruction JSON (`sources.LlavaSource`): json, images
    kind="gui"         GUI screenshots with element boxes, LLaVA-style JSON
                       (`sources.GuiSource`): json, images, task ("grounding" | "ocr" |
                       "both": the turns of entries without conversations)
    kind="refcoco"     RefCOCO-style JSON (`sources.RefCocoSource`): json, images, split
    kind="tfds"        a prepared TFDS dataset: name, split, data_dir, task ("caption"),
                       image_key ("image"), caption_key ("captions/text"; a list -> first)
    kind="demo"        the generated demo data: split ("train"); its folder is data.dir

Grounding records from shards: the `.json` of a sample lists referring expressions with
boxes as fractions of the image, either CogVLM-style
`"refs": [{"expression": "the red circle", "box": [x0, y0, x1, y1]}, ...]` or GRIT-style
`"ref_exps": [[start, end, x0, y0, x1, y1, score], ...]` (the expression is
`caption[start:end]`). One expression per sample is trained, picked by a hash of the sample
key (so the same sample always gives the same text, also after a resume); all boxes of that
expression are rendered, joined by ";".
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping, Optional

import numpy as np

from cogvlm_jax.data.bad_samples import BadDataError
from cogvlm_jax.data.sources import LlavaSource, RefCocoSource, WebDatasetSource, tfds_source
from cogvlm_jax.data.sources.gui import TASKS as GUI_TASKS
from cogvlm_jax.data.sources.gui import GuiSource
from cogvlm_jax.data.sources.refcoco import render_box

KINDS = ("webdataset", "arrayrecord", "llava", "gui", "refcoco", "tfds", "demo")
SHARD_TASKS = ("caption", "grounding")

# Fields each kind accepts besides kind / weight (a typo in a config is an error, not a
# silently ignored setting).
_FIELDS = {
    "webdataset": {"paths", "task", "filters", "index_dir", "shard_files_per_host"},
    "arrayrecord": {"paths", "task"},
    "llava": {"json", "images"},
    "gui": {"json", "images", "task"},
    "refcoco": {"json", "images", "split"},
    "tfds": {"name", "split", "data_dir", "task", "image_key", "caption_key"},
    "demo": {"split"},
}
_REQUIRED = {"webdataset": {"paths"}, "arrayrecord": {"paths"}, "llava": {"json", "images"},
             "gui": {"json", "images"},
             "refcoco": {"json", "images"}, "tfds": {"name", "split"}, "demo": set()}


class MixtureError(ValueError):
  """A data.mixture setting that cannot work (names the source and the field)."""


# ---- record adapters: raw source record -> a record ExampleBuilder understands ------------


def _pick(key: str, n: int) -> int:
  """A stable choice among n for a sample key (crc32: the same across processes/runs)."""
  return zlib.crc32(key.encode("utf-8")) % n


def _expressions(record: dict) -> dict[str, list[list[float]]]:
  """{expression: [box, ...]} of a shard record's .json (boxes as [x0, y0, x1, y1] fractions)."""
  meta = record.get("metadata") or {}
  out: dict[str, list[list[float]]] = {}
  for ref in meta.get("refs") or []:
    if isinstance(ref, dict) and ref.get("expression") and ref.get("box") is not None:
      out.setdefault(str(ref["expression"]), []).append(list(ref["box"]))
  caption = record.get("caption") or meta.get("caption") or ""
  for ref in meta.get("ref_exps") or []:
    if isinstance(ref, (list, tuple)) and len(ref) >= 6:
      text = caption[int(ref[0]):int(ref[1])].strip()
      if text:
        out.setdefault(text, []).append([float(v) for v in ref[2:6]])
  return out


def grounding_record(record: dict) -> dict:
  """A webdataset record with boxes in its .json -> a referring-expression record
  ("sentence", "box_text"); no usable box -> box_text None and an error (a counted bad
  sample, reason box_invalid)."""
  base = {k: record.get(k) for k in ("source", "key", "image_bytes", "error")}
  try:
    return _grounding_record(record, base)
  except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # malformed .json
    return dict(base, sentence=None, box_text=None,
                error=base["error"] or f"malformed boxes in the .json: {type(e).__name__}: {e}")


def _grounding_record(record: dict, base: dict) -> dict:
  expressions = _expressions(record)
  if not expressions:
    return dict(base, sentence=None, box_text=None,
                error=base["error"] or "no referring expression with a box in the .json")
  names = sorted(expressions)
  sentence = names[_pick(str(record.get("key")), len(names))]
  # Fractions -> the [x, y, w, h] boxes render_box takes, on a 1 x 1 image.
  xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in expressions[sentence]]
  try:
    box_text = render_box(xywh, 1.0, 1.0)
  except (ValueError, TypeError) as e:
    return dict(base, sentence=sentence, box_text=None, error=base["error"] or f"box: {e}")
  return dict(base, sentence=sentence, box_text=box_text)


def _get_path(record: Mapping, path: str):
  value: Any = record
  for part in path.split("/"):
    value = value[part]
  return value


@dataclasses.dataclass(frozen=True)
class TfdsCaptionRecord:
  """A decoded TFDS record -> a caption record (decoded pixels in "image_array")."""

  name: str
  image_key: str = "image"
  caption_key: str = "captions/text"

  def __call__(self, record: dict) -> dict:
    out = {"source": self.name, "key": str(record.get("image/id", record.get("id", "?"))),
           "image_bytes": None, "caption": None, "error": None}
    try:
      image = _get_path(record, self.image_key)
      caption = _get_path(record, self.caption_key)
    except (KeyError, TypeError) as e:
      out["error"] = f"record has no {e}"
      return out
    if isinstance(caption, (list, tuple, np.ndarray)):
      caption = caption[0] if len(caption) else None
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8", errors="replace")
    out["caption"] = caption
    if isinstance(image, bytes):
      out["image_bytes"] = image
    else:
      out["image_array"] = np.asarray(image)
    return out


class TaskSource:
  """A random-access source whose records go through `adapt` (picklable for workers).

  `presharded`: the source already holds only this process's share (file-level host
  sharding); `mixture_dataset` then does not slice it again.
  """

  def __init__(self, source, adapt: Optional[Callable[[dict], dict]] = None, *,
               name: str = "", presharded: bool = False):
    self.source, self.adapt, self.name, self.presharded = source, adapt, name, presharded

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    if self.adapt is None:
      return record
    try:
      return self.adapt(record)
    except Exception as e:  # noqa: BLE001  a malformed record is a counted bad sample
      return {"source": record.get("source", self.name), "key": record.get("key", index),
              "image_bytes": None, "error": f"record error: {type(e).__name__}: {e}"}

  def __repr__(self) -> str:
    return f"TaskSource({self.name!r}, {self.source!r})"


# ---- config -> sources -------------------------------------------------------------------


def check_spec(name: str, spec: Mapping) -> str:
  """The kind of source spec `name`; MixtureError naming the field when it cannot work."""
  kind = spec.get("kind")
  if kind not in KINDS:
    raise MixtureError(f"data.mixture.{name}.kind must be one of {KINDS}, got {kind!r}")
  unknown = set(spec) - _FIELDS[kind] - {"kind", "weight"}
  if unknown:
    raise MixtureError(f"data.mixture.{name}: unknown field(s) {sorted(unknown)} for kind "
                       f"{kind!r}; known: {sorted(_FIELDS[kind])}")
  missing = [f for f in sorted(_REQUIRED[kind]) if not spec.get(f)]
  if missing:
    raise MixtureError(f"data.mixture.{name} (kind {kind!r}) needs {missing}")
  weight = spec.get("weight", 1.0)
  if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
    raise MixtureError(f"data.mixture.{name}.weight must be a number >= 0, got {weight!r}")
  task = spec.get("task", "caption")
  if kind in ("webdataset", "arrayrecord", "tfds") and task not in (
      ("caption",) if kind == "tfds" else SHARD_TASKS):
    raise MixtureError(f"data.mixture.{name}.task {task!r} is not supported for {kind}")
  if kind == "gui" and spec.get("task", "grounding") not in GUI_TASKS:
    raise MixtureError(f"data.mixture.{name}.task must be one of {GUI_TASKS} for gui, got "
                       f"{spec.get('task')!r}")
  return kind


def _build_one(name: str, spec: Mapping, *, demo_folder: Optional[str], process_index: int,
               process_count: int) -> TaskSource:
  kind = spec["kind"]
  if kind == "webdataset":
    per_host = bool(spec.get("shard_files_per_host", False))
    source = WebDatasetSource(
        spec["paths"], filters=dict(spec.get("filters") or {}) or None,
        index_dir=spec.get("index_dir") or None,
        shard_index=process_index if per_host else 0,
        shard_count=process_count if per_host else 1)
    adapt = grounding_record if spec.get("task", "caption") == "grounding" else None
    return TaskSource(source, adapt, name=name, presharded=per_host)
  if kind == "arrayrecord":
    from cogvlm_jax.data.sources.arrayrecord import ArrayRecordSource
    adapt = grounding_record if spec.get("task", "caption") == "grounding" else None
    return TaskSource(ArrayRecordSource(spec["paths"]), adapt, name=name)
  if kind == "llava":
    return TaskSource(LlavaSource(spec["json"], spec["images"]), name=name)
  if kind == "gui":
    return TaskSource(GuiSource(spec["json"], spec["images"], spec.get("task", "grounding")),
                      name=name)
  if kind == "refcoco":
    return TaskSource(RefCocoSource(spec["json"], spec["images"],
                                    split=spec.get("split") or None), name=name)
  if kind == "tfds":
    source = tfds_source(spec["name"], spec["split"], spec.get("data_dir") or None)
    return TaskSource(source, TfdsCaptionRecord(spec["name"], spec.get("image_key", "image"),
                                                spec.get("caption_key", "captions/text")),
                      name=name)
  from cogvlm_jax.data.demo import DemoSource
  if demo_folder is None:
    raise MixtureError(f"data.mixture.{name}: kind 'demo' needs data.source = 'demo'")
  return TaskSource(DemoSource(demo_folder, spec.get("split", "train")), name=name)


def check_unreadable_shards(source: TaskSource, max_bad_ratio: float) -> None:
  """Judges a source's unreadable shard files (`WebDatasetSource.unreadable`) by the rule
  for bad samples: BadDataError naming them when more than `max_bad_ratio` of its files
  are unreadable, else a warning line and the run goes on without them."""
  unreadable = getattr(source.source, "unreadable", None)
  if not unreadable:
    return
  total = len(source.source.shards)
  named = "; ".join(f"{path} ({why})" for path, why in list(unreadable.items())[:3])
  line = (f"data.mixture.{source.name}: {len(unreadable)} of {total} shard files are "
          f"unreadable: {named}")
  if len(unreadable) > max_bad_ratio * total:
    raise BadDataError(f"{line} ({len(unreadable) / total:.1%} > max_bad_ratio="
                       f"{max_bad_ratio:.1%})")
  print(f"{line}; skipped (max_bad_ratio={max_bad_ratio:.1%})", flush=True)


def build_mixture(mixture: Mapping[str, Mapping], *, demo_folder: Optional[str] = None,
                  process_index: int = 0, process_count: int = 1, max_bad_ratio: float = 1.0
                  ) -> tuple[list[TaskSource], list[float]]:
  """(sources, weights) of `data.mixture`, in name order (deterministic), sources with weight 0
  left out. Raises MixtureError naming the source for a bad spec or an unreadable source;
  unreadable shard files of a webdataset source are judged by `check_unreadable_shards`."""
  if not mixture:
    raise MixtureError("data.mixture is empty: name at least one source")
  for name in sorted(mixture):
    check_spec(name, mixture[name])
  sources, weights = [], []
  for name in sorted(mixture):
    spec = dict(mixture[name])
    weight = float(spec.get("weight", 1.0))
    if weight == 0:
      continue
    try:
      source = _build_one(name, spec, demo_folder=demo_folder, process_index=process_index,
                          process_count=process_count)
    except (OSError, ValueError, ImportError) as e:
      if isinstance(e, MixtureError):
        raise
      raise MixtureError(f"data.mixture.{name}: {type(e).__name__}: {e}") from e
    check_unreadable_shards(source, max_bad_ratio)
    if len(source) == 0:
      raise MixtureError(f"data.mixture.{name} has no samples ({source!r})")
    sources.append(source)
    weights.append(weight)
  if not sources:
    raise MixtureError("every source in data.mixture has weight 0")
  return sources, weights
