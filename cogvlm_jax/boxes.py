"""CogVLM's box text, in one place: parse, format, IoU and clipping.

CogVLM's grounding models write a box as `[[x0,y0,x1,y1]]`: integers 000..999, the corner
coordinates relative to the image width / height times 1000, zero-padded to 3 digits; several
boxes of one phrase are joined by ';' inside the brackets: `[[012,345,678,901;100,100,200,200]]`.
Every box in this module is (x0, y0, x1, y1) in relative [0, 1] coordinates, except
`clip_box`'s input, which is COCO's pixel [x, y, w, h]. IoU does not change when both axes are
scaled, so relative IoU equals pixel IoU and no image size is needed to score.

The demo data, the RefCOCO and grounding sources, the eval tasks and the report all use this
module, so a box is written one way (rounded to the nearest grid step) everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

Box = tuple[float, float, float, float]

# Non-greedy, so "[[a]] text [[b]]" is two groups; DOTALL in case the model breaks a line.
_GROUP = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_INT = re.compile(r"^\s*(\d{1,4})\s*$")


def _parse_one(part: str) -> Box | None:
  """'012, 345,678 ,901' -> relative box, or None when it is not 4 integers in 0..1000."""
  fields = part.split(",")
  if len(fields) != 4:
    return None
  values = []
  for f in fields:
    m = _INT.match(f)
    if m is None or int(m.group(1)) > 1000:
      return None
    # 1000 is one step past CogVLM's 999 maximum but still the image edge: accepted as 1.0.
    values.append(int(m.group(1)) / 1000.0)
  x0, y0, x1, y1 = values
  # A box written right-to-left still names one rectangle; order its corners.
  return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def parse_boxes(text: str | None) -> list[Box] | None:
  """All boxes in a CogVLM answer, in order, as relative (x0, y0, x1, y1); None if none parse.

  Spaces are tolerated anywhere inside the brackets. Like CogVLM's own parser, a malformed
  entry (not 4 integers, or a value above 1000) is skipped while the others are kept.
  """
  if not text:
    return None
  boxes = []
  for group in _GROUP.findall(text):
    for part in group.split(";"):
      box = _parse_one(part)
      if box is not None:
        boxes.append(box)
  return boxes or None


def _to_int(v: float) -> int:
  """Relative coordinate -> CogVLM integer: int(round(v * 1000)) clipped to 0..999."""
  return min(999, max(0, int(round(float(v) * 1000)))) if math.isfinite(v) else 0


def format_box(box: Sequence[float] | Sequence[Sequence[float]]) -> str:
  """The inverse of `parse_boxes`: one relative box (or a list of them) -> '[[x0,y0,x1,y1]]'.

  Coordinates are int(round(v * 1000)) clipped to 0..999 and zero-padded to 3 digits; several
  boxes are joined by ';' inside one pair of brackets.
  """
  if len(box) == 0:
    raise ValueError("format_box needs at least one box")
  boxes = box if hasattr(box[0], "__len__") else [box]  # nested (list / array) = several
  parts = []
  for b in boxes:
    if len(b) != 4:
      raise ValueError(f"a box has 4 coordinates, got {b!r}")
    parts.append(",".join(f"{_to_int(v):03d}" for v in b))
  return "[[" + ";".join(parts) + "]]"


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes; 0.0 when the union is empty."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
  area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
  union = area_a + area_b - inter
  return inter / union if union > 0 else 0.0



def clip_box(bbox_xywh: Sequence[float], width: float,
             height: float) -> tuple[Optional[tuple[float, float, float, float]], bool]:
  """Clips an [x, y, w, h] box to the image: (clipped box or None if nothing is left inside,
  whether it was clipped). Non-finite or non-positive sizes give (None, False)."""
  if len(bbox_xywh) != 4:
    raise ValueError(f"a box is [x, y, w, h], got {list(bbox_xywh)}")
  x, y, w, h = (float(v) for v in bbox_xywh)
  if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
    return None, False
  x0, y0 = max(x, 0.0), max(y, 0.0)
  x1, y1 = min(x + w, float(width)), min(y + h, float(height))
  if x1 <= x0 or y1 <= y0:
    return None, False
  clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
  return (x0, y0, x1 - x0, y1 - y0), clipped



def pixel_box_to_relative(bbox_xywh: Sequence[float], width: float, height: float) -> Box:
  """A pixel [x, y, w, h] box, clipped to the image, as relative (x0, y0, x1, y1);
  ValueError for a box with no area inside the image."""
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  clipped, _ = clip_box(bbox_xywh, width, height)
  if clipped is None:
    raise ValueError(f"box {list(bbox_xywh)} has no area inside the {width}x{height} image")
  x, y, w, h = clipped
  return (x / width, y / height, (x + w) / width, (y + h) / height)
