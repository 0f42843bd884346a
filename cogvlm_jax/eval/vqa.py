"""VQA accuracy as the official tools compute it (VQAv2, OK-VQA, TextVQA), and the VQA task.

    python eval.py --config configs/eval/vqav2.py ...   (or textvqa.py)

One predicted answer is scored against the human answers (10 in VQAv2): the mean, over the
leave-one-out subsets (one per human answer), of min(1, #subset answers equal to it / 3).
With k of 10 humans agreeing that is 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4. What
"equal" means is the answer processing, one of three modes (`config.vqa_mode`):

* "official" (default): GT-Vision-Lab/VQA master `a013f004` (2021),
  PythonEvaluationTools/vqaEvaluation/vqaEval.py. Newlines / tabs become spaces and the ends
  are stripped, on the prediction and on the human answers. Then, ONLY when the human answers
  are not all identical, both sides get `process_punctuation` and `process_digit_article`.
  Unanimous answers are compared as written: "Yes" against ten "yes" scores 0.
* "legacy_2016": the same file at `458a8b26` (2016-2021, the numbers of most papers of that
  time). The prediction is always stripped and gets both steps; the human answers are NOT
  stripped, and get `process_punctuation` only (no digits / articles / contractions), only
  when they are not all identical. So "Yes" against ten "yes" scores 1, "two" against ten
  "two" scores 0 (the prediction becomes "2").
* "textvqa": MMF's `EvalAIAnswerProcessor` (mmf/utils/m4c_evaluators.py, used by the
  TextVQA / EvalAI evaluation) on both sides, always: lower-case, delete every "," and "?",
  "'s" -> " 's", strip, then the two steps. No unanimity rule.

The two steps, re-implemented from the official code (quirks kept, so numbers match):

* `process_punctuation`: a mark of PUNCTUATION next to a space is deleted, one inside a word
  becomes a space; a comma between digits anywhere ("1,000") makes every mark of the answer
  deleted; a period not followed by a digit is deleted ("3.5" keeps it, "dog." loses it).
* `process_digit_article`: lower-case, number words "none"/"zero".."ten" become digits,
  the articles a/an/the are dropped, contractions written without an apostrophe get it back.

Overall / per answer type / per question type accuracies are reported exactly (x100) and,
for the official and legacy modes, also as the official script prints them ("rounded").
"""

from __future__ import annotations

import decimal
import json
import os
import re
from typing import Mapping, Sequence

from cogvlm_jax.eval.evaluator import Task, evaluate, image_path
from cogvlm_jax.eval.settings import EvalConfigError

# Contractions written without an apostrophe -> with it, as in the official script. Keys are
# looked up after lower-casing, so the capitalised keys ("Im", "Ive", "Id've") can never match;
# they are kept (like "somebody'd" -> "somebodyd") because the official map has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Only whole words are mapped ("one" -> "1", but "someone" stays); "none" counts as 0.
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The official list. Apostrophe, colon, period, '#', '$', '%', '&', '*' are NOT in it, so
# "don't", "10:30" and "$5" survive this step.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!"]

# The official pattern is "(?!<=\d)(\.)(?!\d)": "(?!<=\d)" is a (buggy) negative LOOKAHEAD
# for the text "<=digit", not a lookbehind, so in effect a period is deleted whenever the next
# character is not a digit ("5." -> "5", "a.m" -> "am", "3.5" and ".5" unchanged). Kept as is
# so that scores match the official ones.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# A comma between digits ("1,000") anywhere in the answer switches every punctuation mark of
# the whole answer from "replace by a space" to "delete", which turns "1,000" into "1000".
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the third positional argument
# of Pattern.sub is `count`, so at most re.UNICODE == 32 periods are removed. Reproduced.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


MODES = ("official", "legacy_2016", "textvqa")


def process_punctuation(text: str) -> str:
  """The official `processPunctuation` step (see the module docstring)."""
  out = text
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in PUNCTUATION:
    # The test looks at the ORIGINAL text, as the official script does.
    if delete_all or (p + " " in text) or (" " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle` step: lower-case, number words, articles, contractions."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_answer(text: str) -> str:
  """Newlines and tabs -> spaces, ends stripped: what every mode does to the prediction."""
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """One answer fully processed as the official script processes a non-unanimous question."""
  return process_digit_article(process_punctuation(strip_answer(text)))


def textvqa_normalize(text: str) -> str:
  """MMF's EvalAIAnswerProcessor: its own word step, then `normalize_answer`.

  MMF's comma pattern differs from the official one, but it runs after every comma is gone,
  so neither can match: "1,000" -> "1000" either way, and no comma switches marks to deleted.
  """
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  return normalize_answer(text)


def _compared(prediction: str, answers: Sequence[str], mode: str) -> tuple[str, list[str]]:
  """(prediction, human answers) as the mode compares them."""
  if mode == "official":
    answers = [strip_answer(a) for a in answers]
    if len(set(answers)) > 1:
      return normalize_answer(prediction), [normalize_answer(a) for a in answers]
    return strip_answer(prediction), answers
  if mode == "legacy_2016":
    if len(set(answers)) > 1:
      answers = [process_punctuation(a) for a in answers]
    return normalize_answer(prediction), list(answers)
  if mode == "textvqa":
    return textvqa_normalize(prediction), [textvqa_normalize(a) for a in answers]
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def leave_one_out(prediction: str, answers: Sequence[str]) -> float:
  """Mean over the subsets without answer i of min(1, #matches among them / 3), in [0, 1].

  Exact string comparison: the answers are already processed. The official loop sums in
  the same order, so the float is the official one."""
  matches = sum(a == prediction for a in answers)
  accs = [min(1, (matches - (a == prediction)) / 3) for a in answers]
  return float(sum(accs)) / len(accs)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, mode: str = "official") -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers (module doc)."""
  if isinstance(answers, str) or len(answers) == 0:
    raise ValueError("answers must be a non-empty list of strings")
  return leave_one_out(*_compared(prediction, answers, mode))


def official_round(value: float, digits: int = 2) -> float:
  """`round` as the official (Python 2) script rounds: half away from zero, on the float's
  exact value. Python 3's `round` goes half to even: 0.125 -> 0.12 there, 0.13 here."""
  q = decimal.Decimal(value).quantize(decimal.Decimal(1).scaleb(-digits),
                                      rounding=decimal.ROUND_HALF_UP)
  return float(q)


def _mean_percent(accs: Sequence[float]) -> float:
  return 100 * float(sum(accs)) / len(accs)  # the official order of operations


def _per_group(per_q: Mapping, groups: Mapping) -> dict:
  by: dict[str, list[float]] = {}
  for q, acc in per_q.items():
    by.setdefault(groups.get(q, "unknown"), []).append(acc)
  return {g: _mean_percent(v) for g, v in sorted(by.items())}


def vqa_accuracies(predictions: Mapping, annotations: Mapping, *,
                   mode: str = "official") -> dict:
  """{qid: accuracy in [0, 1]} of predictions {qid: answer} vs {qid: [human answers]}.

  A prediction without an annotation is a KeyError (ids of another type, int vs str)."""
  unknown = [q for q in predictions if q not in annotations]
  if unknown:
    raise KeyError(f"{len(unknown)} predictions have no annotation, e.g. {unknown[0]!r} "
                   "(check that question ids have the same type, int vs str)")
  return {q: vqa_accuracy(p, annotations[q], mode=mode) for q, p in predictions.items()}


def vqa_score(predictions: Mapping, annotations: Mapping, answer_types: Mapping | None = None,
              *, question_types: Mapping | None = None, mode: str = "official") -> dict:
  """Scores predictions {qid: answer} against annotations {qid: [human answers]}.

  Scores the questions that have a prediction. Returns percentages (x100, exact):
  {"accuracy", "n", "missing" (annotated questions without a prediction),
   "per_answer_type" / "per_question_type" (when `answer_types` / `question_types`
   {qid: type} are given), "rounded" (official / legacy modes: the same numbers rounded as
   the official script prints them)}.
  """
  per_q = vqa_accuracies(predictions, annotations, mode=mode)
  n = len(per_q)
  out = {"accuracy": _mean_percent(list(per_q.values())) if n else 0.0, "n": n,
         "missing": sum(q not in predictions for q in annotations)}
  for key, groups in (("per_answer_type", answer_types), ("per_question_type", question_types)):
    if groups is not None:
      out[key] = _per_group(per_q, groups)
  if mode != "textvqa":  # MMF reports TextVQA unrounded
    out["rounded"] = {k: ({g: official_round(v) for g, v in out[k].items()}
                          if isinstance(out[k], dict) else official_round(out[k]))
                      for k in ("accuracy", "per_answer_type", "per_question_type") if k in out}
  return out


# ----------------------------------------------------------------------------- loaders


def _read_json(path: str | os.PathLike):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_vqav2(questions_path: str | os.PathLike,
               annotations_path: str | os.PathLike | None = None) -> list[dict]:
  """Reads the official VQAv2 (and OK-VQA, same format) question + annotation JSON files.

  Returns one record per question: {"question_id", "image_id", "question", "image_file",
  "answers" (10 strings, or None without annotations, e.g. test-dev), "answer_type",
  "question_type", "multiple_choice_answer"}. `image_file` is the COCO name, e.g.
  "COCO_val2014_000000000042.jpg", built from the questions file's `data_subtype`
  (None when that field is absent).
  """
  qdata = _read_json(questions_path)
  subtype = qdata.get("data_subtype")
  anns = {}
  if annotations_path is not None:
    anns = {a["question_id"]: a for a in _read_json(annotations_path)["annotations"]}
  records = []
  for q in qdata["questions"]:
    ann = anns.get(q["question_id"])
    records.append({
        "question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"],
        "image_file": f"COCO_{subtype}_{int(q['image_id']):012d}.jpg" if subtype else None,
        "answers": [a["answer"] for a in ann["answers"]] if ann else None,
        "answer_type": ann.get("answer_type") if ann else None,
        "question_type": ann.get("question_type") if ann else None,
        "multiple_choice_answer": ann.get("multiple_choice_answer") if ann else None,
    })
  return records


def load_textvqa(path: str | os.PathLike) -> list[dict]:
  """Reads an official TextVQA JSON file ({"data": [...]}).

  Returns {"question_id", "image_id", "question", "image_file" ("<image_id>.jpg"; TextVQA's
  val images live in train_images/), "answers" (10 strings, None for the test split)}.
  """
  return [{
      "question_id": d["question_id"], "image_id": d["image_id"], "question": d["question"],
      "image_file": f"{d['image_id']}.jpg", "answers": d.get("answers"),
  } for d in _read_json(path)["data"]]


def annotations_from_records(records: Sequence[dict]) -> tuple[dict, dict]:
  """({qid: answers}, {qid: answer_type}) from loader records; unannotated ones are skipped."""
  annotations = {r["question_id"]: r["answers"] for r in records if r.get("answers")}
  types = {r["question_id"]: r["answer_type"] for r in records
           if r.get("answers") and r.get("answer_type")}
  return annotations, types


# ----------------------------------------------------------------------------- the task


def load(config) -> list[dict]:
  """Samples of a VQAv2 / OK-VQA (data.format "vqav2") or TextVQA ("textvqa") file."""
  d = config.data
  if d.format == "vqav2":
    raw = load_vqav2(d.questions, d.annotations or None)
  else:
    raw = load_textvqa(d.questions)
  out = []
  for r in raw:
    if r["image_file"] is None:
      raise EvalConfigError(f"{d.questions} has no data_subtype: cannot name the image files")
    out.append({"id": str(r["question_id"]), "image": image_path(d.image_root, r["image_file"]),
                "query": config.query_format.format(question=r["question"]),
                "template": config.template, "references": list(r["answers"] or []),
                "answer_type": r.get("answer_type"), "question_type": r.get("question_type")})
  return out


def _types(samples: Sequence[Mapping], key: str) -> dict | None:
  types = {s["id"]: s[key] for s in samples if s.get(key)}
  return types or None


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """`vqa_score` in config.vqa_mode over the annotated samples (none: nothing to score)."""
  annotated = [s for s in samples if s["references"]]
  if not annotated:  # e.g. test-dev: nothing to score, predictions are still written
    return {"n": len(predictions), "note": "no annotations: accuracy not computed"}
  preds = {s["id"]: predictions[s["id"]] for s in annotated if s["id"] in predictions}
  return vqa_score(preds, {s["id"]: s["references"] for s in annotated},
                   _types(annotated, "answer_type"),
                   question_types=_types(annotated, "question_type"), mode=config.vqa_mode)


def correct(sample: Mapping, prediction: str, config) -> bool:
  """Whether any human answer counts for the prediction (the report card's colour)."""
  return vqa_accuracy(prediction, sample["references"], mode=config.vqa_mode) > 0


TASK = Task("vqa", load, score, correct)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on VQAv2 / OK-VQA / TextVQA; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
