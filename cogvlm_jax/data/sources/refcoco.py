"""RefCOCO-style referring expressions, and CogVLM's box text format.

Input: a JSON list, one object per referred object (a "ref"):

    [{"image": "COCO_train2014_000000581857.jpg",   # relative to image_folder
      "sentences": ["the lady with the blue shirt", "woman in blue"],
      "bbox": [103.93, 299.99, 134.22, 177.42],      # COCO [x, y, width, height], pixels
      "width": 640, "height": 480,                   # of the image
      "split": "val",                                # train | val | testA | testB | test
      "ref_id": 0, "category_id": 1}, ...]           # optional: ref_id names the record

`sentences` may also hold REFER-style dicts ({"sent": "...", ...}). Why a JSON file: the
original annotations ship as `refs(unc).p`, a Python pickle, and unpickling runs arbitrary
code from the file, so this module never loads pickles. Convert once, in an environment you
trust, with the REFER API (github.com/lichengunc/refer), e.g.::

    refer = REFER(data_root, "refcoco", "unc")
    out = [{"image": refer.Imgs[r["image_id"]]["file_name"],
            "sentences": [s["sent"] for s in r["sentences"]],
            "bbox": refer.Anns[r["ann_id"]]["bbox"],
            "width": refer.Imgs[r["image_id"]]["width"],
            "height": refer.Imgs[r["image_id"]]["height"],
            "split": r["split"], "ref_id": r["ref_id"]} for r in refer.Refs.values()]

Boxes: CogVLM writes a box as "[[x0,y0,x1,y1]]", corners scaled to 000..999 (`render_box`).
A box partly outside its image is clipped to it (counted in `stats["clipped_boxes"]`); a box
with no area inside the image gives an invalid record: `error` set, `box_text` None
(counted in `stats["invalid_boxes"]`), so the pipeline can count and skip it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from cogvlm_jax import fileio
from cogvlm_jax.boxes import clip_box, format_box, pixel_box_to_relative

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "testA", "testB")


def render_box(bbox_xywh, width: float, height: float) -> str:
  """CogVLM's box text "[[x0,y0,x1,y1]]" of one pixel [x, y, w, h] box or a list of them.

  Boxes partly outside the image are clipped; ValueError for a box with no area inside
  (`cogvlm_jax.boxes` formats: corners rounded to the 000..999 grid, ';' between boxes).
  """
  boxes = bbox_xywh
  if len(boxes) and not isinstance(boxes[0], (list, tuple)):
    boxes = [boxes]
  if not len(boxes):
    raise ValueError("no box to render")
  return format_box([pixel_box_to_relative(b, width, height) for b in boxes])


def _sentence_text(s) -> Optional[str]:
  if isinstance(s, str):
    return s
  if isinstance(s, dict):
    v = s.get("sent", s.get("raw"))
    return v if isinstance(v, str) else None
  return None


class RefCocoSource:
  """Grain random-access source over RefCOCO-style JSON (format: the module docstring).

  Args:
    json_path: the converted annotations.
    image_folder: the folder the "image" paths are relative to (COCO train2014).
    split: keep refs of this split ("val", "testA", ...); None keeps all.
    per_sentence: one record per (ref, sentence) — how RefCOCO is evaluated and usually
      trained — or, when False, one record per ref with all its sentences.

  A record: source, key ("{ref_id}/{sentence index}"), image, image_bytes (read now; None if
  missing), sentence (per_sentence) or sentences, bbox (clipped [x, y, w, h] pixels, None when
  invalid), box_text ("[[...]]" or None), width, height, error (None | str).
  """

  def __init__(self, json_path: str, image_folder: str, *, split: Optional[str] = None,
               per_sentence: bool = True):
    self.json_path = os.fspath(json_path)
    self.image_folder = os.fspath(image_folder)
    self.split = split
    self.per_sentence = per_sentence
    refs = fileio.parse_json(self.json_path, fileio.read_bytes(self.json_path))
    if not isinstance(refs, list):
      raise ValueError(f"{self.json_path}: expected a JSON list of refs")
    splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
    if split is not None and split not in splits:
      raise ValueError(f"{self.json_path} has no split {split!r}; it has {splits}")
    self._records: list[dict] = []
    stats = {"refs": 0, "records": 0, "clipped_boxes": 0, "invalid_boxes": 0,
             "without_sentences": 0}
    for position, ref in enumerate(refs):
      if not isinstance(ref, dict) or (split is not None and ref.get("split") != split):
        continue
      stats["refs"] += 1
      ref_id = ref.get("ref_id", position)
      sentences = [t for t in (_sentence_text(s) for s in ref.get("sentences") or []) if t]
      if not sentences:
        stats["without_sentences"] += 1
        continue
      base = {"image": ref.get("image"), "width": ref.get("width"),
              "height": ref.get("height"), "bbox": None, "box_text": None, "error": None}
      base["error"] = self._check(ref, base, stats)
      if per_sentence:
        for i, s in enumerate(sentences):
          self._records.append({**base, "key": f"{ref_id}/{i}", "sentence": s})
      else:
        self._records.append({**base, "key": str(ref_id), "sentences": sentences})
    stats["records"] = len(self._records)
    self.stats = stats
    if stats["invalid_boxes"]:
      log.warning("%s: %d ref(s) with a box outside the image (records kept, with an error)",
                  self.json_path, stats["invalid_boxes"])

  @staticmethod
  def _check(ref: dict, base: dict, stats: dict) -> Optional[str]:
    """Fills bbox / box_text of `base`; returns an error string for an unusable ref."""
    if not isinstance(ref.get("image"), str):
      return "ref has no image file name"
    width, height = ref.get("width"), ref.get("height")
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float))
            and width > 0 and height > 0):
      return f"ref has no valid image width/height ({width!r}, {height!r})"
    bbox = ref.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)):
      return f"ref has no valid bbox ({bbox!r})"
    clipped, was_clipped = clip_box(bbox, width, height)
    if clipped is None:
      stats["invalid_boxes"] += 1
      return f"bbox {list(bbox)} has no area inside the {width}x{height} image"
    stats["clipped_boxes"] += was_clipped
    base["bbox"] = list(clipped)
    base["box_text"] = render_box(clipped, width, height)
    return None

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = {"source": self.json_path, **self._records[int(index)], "image_bytes": None}
    if record["bbox"] is not None:
      record["bbox"] = list(record["bbox"])  # the caller may change its copy
    if record["error"] is None:  # an invalid ref is skipped anyway: do not read its image
      path = fileio.join(self.image_folder, record["image"])
      try:
        record["image_bytes"] = fileio.read_bytes(path)
      except FileNotFoundError:
        record["error"] = record["error"] or f"image file not found: {path}"
      except OSError as e:
        record["error"] = record["error"] or f"cannot read image file {path}: {e}"
    return record

  def __repr__(self) -> str:
    return (f"RefCocoSource(json_path={self.json_path!r}, split={self.split!r}, "
            f"records={len(self)})")
