"""A self-contained HTML report of an evaluation: the metrics, then one card per sample.

One file, no external resources: images are embedded as base64 JPEG thumbnails (longest side
384 px) so the report can be mailed or attached to a run. Grounding samples get their
predicted (red) and true (green) boxes drawn onto the thumbnail. All text is HTML-escaped:
model output is untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cogvlm_jax.fileio import is_remote, write_atomic  # local + gs:// atomic writes
from cogvlm_jax.boxes import parse_boxes

THUMB_SIZE = 384
PRED_COLOR = (255, 0, 0)
GT_COLOR = (0, 255, 0)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px; color: #222; background: #f6f7f9; }
h1 { font-size: 1.5em; margin: 0 0 16px; }
table.metrics { border-collapse: collapse; background: #fff; margin-bottom: 24px; }
table.metrics th, table.metrics td { border: 1px solid #d0d4da; padding: 4px 12px; }
table.metrics th { background: #eef0f3; text-align: left; }
table.metrics td.v { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr));
        gap: 16px; }
.card { background: #fff; border: 1px solid #d0d4da; border-radius: 6px; padding: 8px;
        overflow-wrap: anywhere; }
.card.ok { border-left: 6px solid #2e9e44; }
.card.bad { border-left: 6px solid #d23b3b; }
.card img { display: block; max-width: 100%; margin: 0 auto 8px; }
.card .missing { color: #a00; font-style: italic; margin-bottom: 8px; }
.card .id { color: #666; font-size: 0.85em; }
.card .label { font-weight: 600; color: #444; }
.card pre { white-space: pre-wrap; margin: 2px 0 8px; font-family: inherit; }
.card ul { margin: 2px 0 8px; padding-left: 20px; }
.legend { margin-bottom: 12px; font-size: 0.9em; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; }
"""


def _to_pil(image: Any) -> Image.Image:
  """A path, a PIL image or a uint8 [H, W(, C)] array -> an RGB PIL image."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      return im.convert("RGB")
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(f"image arrays must be uint8, got {image.dtype}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a path, PIL image or uint8 array, got {type(image).__name__}")
  return image.convert("RGB")


def _box_list(boxes) -> list:
  """None, one box, a list of boxes, or CogVLM box text ('[[...]]') -> a list of boxes."""
  if isinstance(boxes, str):
    boxes = parse_boxes(boxes)
  if boxes is None or len(boxes) == 0:
    return []
  return list(boxes) if hasattr(boxes[0], "__len__") else [boxes]


def _draw_boxes(img: Image.Image, boxes, color) -> None:
  """Draws relative (x0, y0, x1, y1) boxes; lines are drawn on the thumbnail so they stay thick."""
  draw = ImageDraw.Draw(img)
  w, h = img.size
  width = max(3, round(max(w, h) / 128))
  for b in _box_list(boxes):
    x0, y0, x1, y1 = (float(v) for v in b)
    xy = [min(x0, x1) * w, min(y0, y1) * h, max(x0, x1) * w, max(y0, y1) * h]
    draw.rectangle(xy, outline=color, width=width)


def thumbnail_data_uri(image: Any, pred_boxes=None, gt_boxes=None,
                       size: int = THUMB_SIZE) -> str:
  """A 'data:image/jpeg;base64,...' thumbnail (longest side <= size) with boxes drawn on it."""
  img = _to_pil(image)
  img.thumbnail((size, size), Image.BICUBIC)
  _draw_boxes(img, gt_boxes, GT_COLOR)      # true box first: the prediction is drawn on top
  _draw_boxes(img, pred_boxes, PRED_COLOR)
  buf = io.BytesIO()
  # 4:4:4 chroma: with the default 4:2:0 a 3-px red line bleeds into its neighbours.
  img.save(buf, format="JPEG", quality=90, subsampling=0)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.2f}"
  return str(value)


def _flatten(metrics: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
  """{"a": {"b": 1}} -> [("a/b", 1)], so per-type breakdowns fit one two-column table."""
  rows = []
  for k, v in metrics.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      rows.extend(_flatten(v, name + "/"))
    else:
      rows.append((name, v))
  return rows


def _metrics_html(metrics: Mapping) -> str:
  rows = "".join(f'<tr><th>{html.escape(k)}</th><td class="v">{html.escape(_fmt(v))}</td></tr>'
                 for k, v in _flatten(metrics))
  return f'<table class="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def _card_html(sample: Mapping) -> str:
  """One sample card: thumbnail (or why there is none), id, prompt, prediction, references."""
  parts = []
  if sample.get("image") is not None:
    try:
      uri = thumbnail_data_uri(sample["image"], sample.get("pred_boxes"), sample.get("gt_boxes"))
      parts.append(f'<img src="{uri}" alt="sample image">')
    except (OSError, TypeError, ValueError) as e:  # one bad image must not lose the report
      parts.append(f'<div class="missing">image unavailable: {html.escape(str(e))}</div>')
  if sample.get("id") is not None:
    parts.append(f'<div class="id">id: {html.escape(str(sample["id"]))}</div>')
  for key in ("prompt", "prediction"):
    parts.append(f'<div class="label">{key}</div>'
                 f'<pre>{html.escape(str(sample.get(key, "")))}</pre>')
  refs = sample.get("references") or []
  refs = [refs] if isinstance(refs, str) else refs
  items = "".join(f"<li>{html.escape(str(r))}</li>" for r in refs)
  parts.append(f'<div class="label">references</div><ul>{items}</ul>')
  if "score" in sample:
    parts.append(f'<div class="label">score: {html.escape(_fmt(sample["score"]))}</div>')
  css = {True: " ok", False: " bad"}.get(sample.get("correct"), "")
  return f'<div class="card{css}">{"".join(parts)}</div>'


def render_report(title: str, metrics: Mapping, samples: Sequence[Mapping]) -> str:
  """The report as one HTML string (see `write_report`)."""
  t = html.escape(title)
  legend = ""
  if any(s.get("pred_boxes") is not None or s.get("gt_boxes") is not None for s in samples):
    legend = ('<div class="legend"><span class="swatch" style="background:#f00"></span> '
              'predicted box &nbsp; <span class="swatch" style="background:#0f0"></span> '
              'true box</div>')
  cards = "\n".join(_card_html(s) for s in samples)
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<meta name="viewport" content="width=device-width, initial-scale=1">'
          f'<title>{t}</title><style>{_CSS}</style></head><body>\n<h1>{t}</h1>\n'
          f'{_metrics_html(metrics)}\n{legend}<div class="grid">\n{cards}\n</div>\n'
          f'</body></html>\n')


def write_report(path: str | os.PathLike, title: str, metrics: Mapping,
                 samples: Sequence[Mapping]) -> str:
  """Writes the report to `path` atomically (temp file + os.replace); returns the path.

  `metrics`: {name: value}, nested dicts become "outer/inner" rows. `samples`: dicts with
  `image` (path, PIL image or uint8 array; optional), `prompt`, `prediction`, `references`
  (list of str), and optionally `id`, `pred_boxes` / `gt_boxes` (one or several relative
  (x0, y0, x1, y1) boxes, or CogVLM box text), `score`, and `correct` (bool, colours the
  card's edge).
  """
  page = render_report(title, metrics, samples)
  path = os.fspath(path)
  if not is_remote(path):  # a gs:// report needs no folder (abspath would make a local one)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_atomic(path, page.encode("utf-8"), mode=0o644)  # a report is meant to be shared
  return path
