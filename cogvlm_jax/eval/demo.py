"""The demo task: the demo data's held-out split (caption, VQA, grounding), each task kind
scored next to its majority / constant baseline from the train split.

    python eval.py --config configs/eval/demo.py --config.checkpoint=runs/demo --workdir OUT

train.py runs the same `run` at the end of training with its in-memory model, so the numbers
it prints are the ones eval.py prints for that checkpoint.

Per kind (all x100):
* caption: BLEU / CIDEr / ROUGE-L (and METEOR if config.caption_meteor) and exact match
  (after VQA answer normalisation);
  baseline: the most common training caption for every image.
* vqa: the VQA accuracy in config.vqa_mode (default: the official evaluator) against the one
  reference answer repeated 10 times. Ten identical answers are unanimous, so the official
  tool compares the stripped prediction as written; the demo answers are lower-case words,
  as the model is trained to emit them. Overall and per question type (color / shape /
  count); baseline: the most common training answer of the question's type.
* grounding: accuracy at IoU >= config.iou_threshold and mean IoU; baseline: the mean
  training box for every expression.
"""

from __future__ import annotations

import collections
import os
from typing import Mapping, Sequence

import numpy as np

from cogvlm_jax.boxes import format_box, parse_boxes
from cogvlm_jax.eval.caption import caption_scores
from cogvlm_jax.eval.evaluator import Task, evaluate
from cogvlm_jax.eval.refcoco import box_correct, rec_accuracy
from cogvlm_jax.eval.vqa import normalize_answer, vqa_accuracy, vqa_score

KINDS = ("caption", "vqa", "grounding")


def load(config) -> list[dict]:
  """The records of data.split (at most data.max_examples_per_task per kind) as samples,
  with each record's own template and query, exactly as training built them."""
  from cogvlm_jax.data import demo

  d = config.data
  if not os.path.exists(os.path.join(d.dir, demo.META_FILE)):
    demo.ensure_demo_data(d.dir)  # the default spec, as configs/demo.py trains on
  counts: collections.Counter = collections.Counter()
  out = []
  for r in demo.load_records(d.dir, d.split):
    counts[r["task"]] += 1
    if d.max_examples_per_task and counts[r["task"]] > d.max_examples_per_task:
      continue
    out.append({"id": str(r["id"]), "image": os.path.join(d.dir, r["image"]),
                "query": r["query"], "template": r["template"], "references": [r["answer"]],
                "task": r["task"], "question_type": r.get("question_type")})
  return out


# ----------------------------------------------------------------------------- scoring


def _score_kind(kind: str, group: Sequence[Mapping], preds: Mapping[str, str], config) -> dict:
  """The metrics of one task kind: predictions {id: text} of the samples in `group`."""
  if kind == "caption":
    out = caption_scores(preds, {s["id"]: s["references"] for s in group},
                         meteor=config.caption_meteor)
    out["exact_match"] = 100.0 * float(np.mean(
        [normalize_answer(preds[s["id"]]) == normalize_answer(s["references"][0])
         for s in group]))
    return out
  if kind == "vqa":
    return vqa_score(preds, {s["id"]: s["references"] * 10 for s in group},
                     question_types={s["id"]: s["question_type"] for s in group},
                     mode=config.vqa_mode)
  gt = {s["id"]: parse_boxes(s["references"][0])[0] for s in group}
  return rec_accuracy(preds, gt, config.iou_threshold)


def baseline_answers(train_records: Sequence[Mapping]) -> dict:
  """What each baseline always answers, from the training records:
  {"caption": str, "vqa": {question_type: str}, "grounding": box text}."""
  captions = collections.Counter(r["answer"] for r in train_records if r["task"] == "caption")
  by_type: dict = collections.defaultdict(collections.Counter)
  boxes = []
  for r in train_records:
    if r["task"] == "vqa":
      by_type[r.get("question_type")][r["answer"]] += 1
    elif r["task"] == "grounding":
      boxes.extend((parse_boxes(r["answer"]) or [])[:1])
  # most_common keeps first-seen order among ties: the same answer on every run.
  return {"caption": captions.most_common(1)[0][0] if captions else "",
          "vqa": {t: c.most_common(1)[0][0] for t, c in by_type.items()},
          "grounding": format_box(tuple(np.mean(boxes, axis=0))) if boxes else ""}


def _baseline_prediction(sample: Mapping, answers: Mapping) -> str:
  if sample["task"] == "vqa":
    return answers["vqa"].get(sample["question_type"], "")
  return answers[sample["task"]]


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """{kind: metrics} for the predicted samples, and {"baseline": {kind: metrics}}."""
  from cogvlm_jax.data import demo
  answers = baseline_answers(demo.load_records(config.data.dir, "train"))
  by_kind: dict[str, list[Mapping]] = collections.defaultdict(list)
  for s in samples:
    if s["id"] in predictions:
      by_kind[s["task"]].append(s)
  out: dict = {"baseline": {}}
  for kind, group in sorted(by_kind.items()):
    out[kind] = _score_kind(kind, group, {s["id"]: predictions[s["id"]] for s in group}, config)
    out["baseline"][kind] = _score_kind(
        kind, group, {s["id"]: _baseline_prediction(s, answers) for s in group}, config)
  return out


def correct(sample: Mapping, prediction: str, config) -> bool | None:
  """The report card's colour: VQA (any credit) and grounding; None for captions."""
  if sample["task"] == "vqa":
    return vqa_accuracy(prediction, sample["references"] * 10, mode=config.vqa_mode) > 0
  if sample["task"] == "grounding":
    return box_correct(prediction, sample["references"][0], config)
  return None


TASK = Task("demo", load, score, correct, is_grounding=lambda s: s["task"] == "grounding")


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or the `model` passed in) on the demo's held-out split.

  `config`: configs/eval/demo.py's `get_config()` (or any dict of its fields) with
  data.dir, checkpoint etc. set. Returns the metrics (see the module doc); `format_table`
  prints them.
  """
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)


# ----------------------------------------------------------------------------- the table


def _rows(metrics: Mapping) -> list[tuple[str, str, float, float | None]]:
  """(kind, metric, model value, baseline value) for the table, in KINDS order."""
  base = metrics.get("baseline", {})
  rows = []
  for kind in KINDS:
    if kind not in metrics:
      continue
    names = {"caption": ["CIDEr", "exact_match"], "vqa": ["accuracy"],
             "grounding": ["accuracy", "mean_iou"]}[kind]
    for name in names:
      rows.append((kind, name, metrics[kind][name], base.get(kind, {}).get(name)))
    for qtype, v in sorted(metrics[kind].get("per_question_type", {}).items()):
      b = base.get(kind, {}).get("per_question_type", {}).get(qtype)
      rows.append((kind, f"accuracy/{qtype}", v, b))
  return rows


def format_table(metrics: Mapping) -> str:
  """The demo metrics as a text table: task, metric, model, baseline (x100)."""
  lines = [f"{'task':10s} {'metric':20s} {'model':>8s} {'baseline':>9s}"]
  for kind, name, value, base in _rows(metrics):
    b = f"{base:9.2f}" if base is not None else f"{'-':>9s}"
    lines.append(f"{kind:10s} {name:20s} {value:8.2f} {b}")
  return "\n".join(lines)
