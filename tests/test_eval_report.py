"""The HTML evaluation report: one self-contained file, escaped text, boxes on thumbnails."""

import base64
import io
import os
import re

import numpy as np
from PIL import Image

from cogvlm_jax.eval.report import write_report

_DATA_URI = re.compile(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


def _samples(tmp_path):
  gray = np.full((400, 800, 3), 128, np.uint8)  # 800 wide: the thumbnail is 384 x 192
  png = tmp_path / "photo.png"
  Image.new("RGB", (50, 60), (10, 20, 30)).save(png)
  return [
      {"id": "g1", "image": gray, "prompt": "Where is the <b>dog</b>?",
       "prediction": "<script>alert(1)</script> [[500,500,900,900]]",
       "references": ["[[100,100,500,500]]"],
       "pred_boxes": [(0.5, 0.5, 0.9, 0.9)], "gt_boxes": (0.1, 0.1, 0.5, 0.5), "correct": False},
      {"id": 2, "image": str(png), "prompt": "Describe.", "prediction": "A & B",
       "references": ["ref one", "ref two"], "score": 0.5},
      {"id": 3, "image": Image.new("L", (30, 30)), "prompt": "q", "prediction": "p",
       "references": []},
      {"id": 4, "image": str(tmp_path / "missing.jpg"), "prompt": "q", "prediction": "p",
       "references": ["r"]},
  ]


def test_report_is_one_escaped_html_file(tmp_path):
  out = tmp_path / "out" / "report.html"
  metrics = {"accuracy": 78.123, "n": 4, "per_answer_type": {"number": 60.0}}
  assert write_report(out, "VQA <eval>", metrics, _samples(tmp_path)) == str(out)
  assert os.listdir(out.parent) == ["report.html"]  # the temp file was renamed, not left over
  page = out.read_text(encoding="utf-8")
  assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
  assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert "&lt;b&gt;dog&lt;/b&gt;" in page and "A &amp; B" in page
  assert "<title>VQA &lt;eval&gt;</title>" in page
  assert "78.12" in page and "per_answer_type/number" in page and "60.00" in page
  assert len(_DATA_URI.findall(page)) == 3          # the missing file gets a note instead
  assert "image unavailable" in page
  assert 'src="http' not in page and "<link" not in page  # no external resources
  # Rewriting replaces the file in place.
  write_report(out, "again", {}, [])
  assert "again" in out.read_text(encoding="utf-8") and os.listdir(out.parent) == ["report.html"]


def test_report_draws_boxes(tmp_path):
  out = tmp_path / "report.html"
  write_report(out, "grounding", {}, _samples(tmp_path)[:1])
  data = _DATA_URI.search(out.read_text(encoding="utf-8")).group(1)
  thumb = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
  assert thumb.size == (384, 192)
  px = np.asarray(thumb).astype(int)
  # Predicted box (0.5..0.9) -> x 192..345.6, y 96..172.8; its left edge, half-way down.
  r, g, b = px[134, 193]
  assert r > 200 and g < 60 and b < 60, (r, g, b)
  # True box (0.1..0.5) -> x 38.4..192, y 19.2..96; its left edge, half-way down: green.
  r, g, b = px[58, 40]
  assert g > 200 and r < 60 and b < 60, (r, g, b)
  # Inside the boxes the image is untouched gray.
  assert np.all(np.abs(px[134, 260] - 128) < 10) and np.all(np.abs(px[58, 110] - 128) < 10)
