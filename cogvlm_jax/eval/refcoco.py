"""The referring-expression grounding task (RefCOCO / RefCOCO+ / RefCOCOg) and its metric.

    python eval.py --config configs/eval/refcoco.py ...

The model answers with CogVLM's box text `[[x0,y0,x1,y1]]` (cogvlm_jax/boxes.py parses,
formats and scores it); a box is correct at IoU >= config.iou_threshold (0.5). All boxes here
are (x0, y0, x1, y1) in relative [0, 1] coordinates.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from cogvlm_jax.boxes import box_iou, format_box, parse_boxes
from cogvlm_jax.eval.evaluator import Task, evaluate, image_path


def _pairs(predictions, gt_boxes):
  """(prediction, gt box) pairs from two mappings keyed alike or two equal-length sequences."""
  if isinstance(predictions, Mapping):
    missing = [k for k in predictions if k not in gt_boxes]
    if missing:
      raise KeyError(f"{len(missing)} predictions have no ground-truth box, e.g. {missing[0]!r}")
    return [(p, gt_boxes[k]) for k, p in predictions.items()]
  if len(predictions) != len(gt_boxes):
    raise ValueError(f"{len(predictions)} predictions but {len(gt_boxes)} ground-truth boxes")
  return list(zip(predictions, gt_boxes))


def rec_accuracy(predictions, gt_boxes, iou_threshold: float = 0.5) -> dict:
  """Referring-expression accuracy: the FIRST predicted box is correct when IoU >= threshold.

  `predictions`: {id: model output text (or an already parsed list of boxes, or None)} and
  `gt_boxes`: {id: relative (x0, y0, x1, y1)}; or two equal-length sequences. An output with no
  parseable box counts as wrong and is counted in "unparseable". Returns {"accuracy" (x100),
  "correct", "n", "unparseable", "mean_iou" (x100, unparseable counted as 0)}.
  """
  correct = unparseable = 0
  ious = []
  for pred, gt in _pairs(predictions, gt_boxes):
    boxes = parse_boxes(pred) if pred is None or isinstance(pred, str) else list(pred)
    if not boxes:
      unparseable += 1
      ious.append(0.0)
      continue
    iou = box_iou(boxes[0], gt)
    ious.append(iou)
    correct += iou >= iou_threshold
  n = len(ious)
  return {"accuracy": 100.0 * correct / n if n else 0.0, "correct": correct, "n": n,
          "unparseable": unparseable, "mean_iou": 100.0 * sum(ious) / n if n else 0.0}


def load_refcoco_json(path: str | os.PathLike, split: str | None = None) -> list[dict]:
  """Reads RefCOCO-style annotations from JSON, one record per referring expression.

  The official `refs(unc).p` files are pickles; unpickling runs arbitrary code, so they are
  never read here. Convert them once, in a trusted environment, to this JSON list:

      [{"image": "COCO_train2014_000000581857.jpg",  # file name (or relative path)
        "sentences": ["the lady with the blue shirt", ...],
        "bbox": [x, y, w, h],                         # absolute pixels, COCO convention
        "width": 640, "height": 427,                  # image size in pixels
        "split": "val",                               # e.g. train / val / testA / testB
        "id": 123}]                                   # optional; default: list index

  Returns {"id" ("<ref id>:<sentence index>"), "ref_id", "image_file", "sentence",
  "box" (relative (x0, y0, x1, y1), clipped to [0, 1]), "width", "height", "split"} for the
  refs of `split` (None = all).
  """
  with open(path, encoding="utf-8") as f:
    refs = json.load(f)
  records = []
  for idx, ref in enumerate(refs):
    if split is not None and ref.get("split") != split:
      continue
    w, h = float(ref["width"]), float(ref["height"])
    x, y, bw, bh = (float(v) for v in ref["bbox"])
    box = tuple(min(1.0, max(0.0, v)) for v in (x / w, y / h, (x + bw) / w, (y + bh) / h))
    ref_id = ref.get("id", idx)
    for k, sentence in enumerate(ref["sentences"]):
      records.append({"id": f"{ref_id}:{k}", "ref_id": ref_id, "image_file": ref["image"],
                      "sentence": sentence, "box": box, "width": int(w), "height": int(h),
                      "split": ref.get("split")})
  return records


# ----------------------------------------------------------------------------- the task


def load(config) -> list[dict]:
  """One sample per referring expression of data.split ("all" = every split)."""
  d = config.data
  raw = load_refcoco_json(d.annotations, None if d.split == "all" else d.split)
  return [{"id": str(r["id"]), "image": image_path(d.image_root, r["image_file"]),
           "query": config.query_format.format(sentence=r["sentence"]),
           "template": config.template, "references": [format_box(r["box"])],
           "box": list(r["box"])} for r in raw]


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """`rec_accuracy` at config.iou_threshold against the unrounded true boxes."""
  gt = {s["id"]: tuple(s["box"]) for s in samples}
  return rec_accuracy(predictions, {k: gt[k] for k in predictions}, config.iou_threshold)


def box_correct(prediction: str, reference: str, config) -> bool:
  """The first predicted box overlaps the reference box text's first box enough."""
  pred, gt = parse_boxes(prediction), parse_boxes(reference)
  return bool(pred and gt and box_iou(pred[0], gt[0]) >= config.iou_threshold)


def correct(sample: Mapping, prediction: str, config) -> bool:
  """The report card's colour."""
  return box_correct(prediction, sample["references"][0], config)


TASK = Task("refcoco", load, score, correct, is_grounding=lambda sample: True)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on a RefCOCO-style file; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
