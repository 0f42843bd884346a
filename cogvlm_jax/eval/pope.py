"""The POPE task (object-hallucination yes/no questions): answer parsing and the metrics.

    python eval.py --config configs/eval/pope.py ...

Answers are read with the rule of the official POPE `evaluate.py`, so numbers are comparable:
keep the text before the first '.', delete commas, split on single spaces; if one of the words
is exactly "No", "no" or "not" the answer is "no", otherwise it is "yes". So "Yes, there is a
dog." -> yes and "No, there is no dog." -> no, but also (official quirks, kept on purpose):

* an answer with neither word ("I cannot tell", "There is a dog") counts as YES;
* the match is case- and punctuation-sensitive: "NO", "No!" and "Not" count as yes.

Such answers are also counted in "unparseable" (no yes / no / not word in the first sentence,
ignoring case and punctuation), so a high count flags prompts or outputs to look at.
Positive class = "yes". Metrics are in percent (x100).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

from cogvlm_jax.eval.evaluator import Task, evaluate, image_path

_NEGATIONS = ("No", "not", "no")
_WORD = re.compile(r"[a-z']+")


def _first_sentence_words(text: str) -> list[str]:
  """The official preprocessing: text before the first '.', commas removed, split on ' '."""
  if "." in text:
    text = text.split(".")[0]
  return text.replace(",", "").split(" ")


def parse_pope_answer(text: str) -> str:
  """'yes' or 'no' by the official POPE rule (see the module docstring)."""
  words = _first_sentence_words(text or "")
  return "no" if any(w in _NEGATIONS for w in words) else "yes"


def pope_answer_is_clear(text: str) -> bool:
  """Whether the first sentence holds a yes / no / not word, ignoring case and punctuation."""
  if "." in (text or ""):
    text = text.split(".")[0]
  return any(w in ("yes", "no", "not") for w in _WORD.findall((text or "").lower()))


def _label(value: str) -> int:
  """Ground truth as in the official script: "no" -> 0 (here in any case), else 1 (yes)."""
  return 0 if str(value).strip().lower() == "no" else 1


def pope_scores(predictions, labels) -> dict:
  """POPE metrics of model answers against yes/no labels.

  `predictions` {id: answer text} with `labels` {id: "yes" | "no"}, or two equal-length
  sequences. Returns {"accuracy", "precision", "recall", "f1", "yes_ratio" (all x100), "n",
  "tp", "fp", "tn", "fn", "unparseable"}. Where the official script would divide by zero
  (no "yes" predicted, or no "yes" label) the metric is 0.
  """
  if isinstance(predictions, Mapping):
    missing = [k for k in predictions if k not in labels]
    if missing:
      raise KeyError(f"{len(missing)} predictions have no label, e.g. {missing[0]!r}")
    pairs = [(p, labels[k]) for k, p in predictions.items()]
  else:
    if len(predictions) != len(labels):
      raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    pairs = list(zip(predictions, labels))
  tp = fp = tn = fn = unclear = 0
  for text, label in pairs:
    pred = parse_pope_answer(text) == "yes"
    gold = _label(label) == 1
    unclear += not pope_answer_is_clear(text)
    tp += pred and gold
    fp += pred and not gold
    tn += (not pred) and (not gold)
    fn += (not pred) and gold
  n = len(pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": 100.0 * (tp + tn) / n if n else 0.0, "precision": 100.0 * precision,
          "recall": 100.0 * recall, "f1": 100.0 * f1,
          "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0, "n": n,
          "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unparseable": unclear}


def load_pope(path: str | os.PathLike) -> list[dict]:
  """Reads a POPE question file (JSON lines: {"question_id", "image", "text", "label"}).

  Returns {"question_id", "image_file", "question", "label"} per line.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        d = json.loads(line)
        records.append({"question_id": d["question_id"], "image_file": d["image"],
                        "question": d["text"], "label": d["label"]})
  return records


# ----------------------------------------------------------------------------- the task


def load(config) -> list[dict]:
  """Samples of a POPE question file (JSON lines {"question_id", "image", "text", "label"})."""
  d = config.data
  return [{"id": str(r["question_id"]), "image": image_path(d.image_root, r["image_file"]),
           "query": config.query_format.format(question=r["question"]),
           "template": config.template, "references": [r["label"]],
           "label": r["label"]} for r in load_pope(d.questions)]


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """`pope_scores` of the predicted samples."""
  labels = {s["id"]: s["label"] for s in samples}
  return pope_scores(predictions, {k: labels[k] for k in predictions})


def correct(sample: Mapping, prediction: str, config) -> bool:
  """The official reading of the answer equals the label (the report card's colour)."""
  return parse_pope_answer(prediction) == str(sample["label"]).strip().lower()


TASK = Task("pope", load, score, correct)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on a POPE file; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
