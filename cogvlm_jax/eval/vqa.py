"""VQA accuracy as defined by the official VQA evaluation (VQAv2, OK-VQA, TextVQA, VizWiz).

An answer is normalised in two steps, re-implemented from the official `vqaEval.py`:

* `process_punctuation`: punctuation marks are deleted or replaced by a space, and periods
  that are not followed by a digit are deleted ("1.5" keeps its period, "dog." loses it).
* `process_digit_article`: lower-case, number words "none"/"zero".."ten" become digits,
  the articles a/an/the are dropped, and contractions written without an apostrophe get it
  back ("dont" -> "don't").

The accuracy of one predicted answer against the human answers (10 in VQAv2) is the mean,
over the 10 leave-one-out subsets of 9 answers, of min(1, #subset answers equal to it / 3).
With k of the 10 humans agreeing this is 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4.

Ground-truth processing (`gt_processing`):

* "full" (default): every human answer is normalised like the prediction. This is the
  official TextVQA (EvalAI / MMF) behaviour; for VQAv2 and OK-VQA, whose annotation files hold
  answers that are already normalised, it gives the same numbers as the official script.
* "vqa_api": exactly the official VQA API: human answers get `process_punctuation` only, and
  only when they are not all identical (a unanimous raw answer is compared as stored).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

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


def process_punctuation(text: str) -> str:
  """The official `processPunctuation` step (see the module docstring)."""
  out = text
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in PUNCTUATION:
    # A mark next to a space ("yes !") is deleted, a mark inside a word ("t-shirt") becomes a
    # space. The test looks at the ORIGINAL text, as the official script does.
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


def normalize_answer(text: str) -> str:
  """Normalises one answer the way the official script normalises a predicted answer."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def _normalize_gt(answers: Sequence[str], gt_processing: str) -> list[str]:
  if gt_processing == "full":
    return [normalize_answer(a) for a in answers]
  if gt_processing == "vqa_api":
    stripped = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(stripped)) > 1:
      return [process_punctuation(a) for a in stripped]
    return stripped
  raise ValueError(f"gt_processing must be 'full' or 'vqa_api', got {gt_processing!r}")


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 gt_processing: str = "full") -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers.

  Mean over the leave-one-out subsets (one per human answer) of
  min(1, matches among the other answers / 3), after normalising both sides.
  """
  if isinstance(answers, str) or len(answers) == 0:
    raise ValueError("answers must be a non-empty list of strings")
  pred = normalize_answer(prediction)
  gts = _normalize_gt(answers, gt_processing)
  total_matches = sum(g == pred for g in gts)
  accs = []
  for g in gts:
    others = total_matches - (g == pred)  # matches among the answers without this one
    accs.append(min(1.0, others / 3.0))
  return sum(accs) / len(accs)


def vqa_score(predictions: Mapping, annotations: Mapping, answer_types: Mapping | None = None,
              *, gt_processing: str = "full") -> dict:
  """Scores predictions {qid: answer} against annotations {qid: [human answers]}.

  Scores the questions that have a prediction; a prediction without an annotation is an error.
  Returns accuracies in percent (x100, unrounded; the official script rounds to 2 decimals):
  {"accuracy", "n", "missing" (annotated questions without a prediction),
   "per_answer_type": {type: accuracy}} (the last only when `answer_types` {qid: type} is given).
  """
  unknown = [q for q in predictions if q not in annotations]
  if unknown:
    raise KeyError(f"{len(unknown)} predictions have no annotation, e.g. {unknown[0]!r} "
                   "(check that question ids have the same type, int vs str)")
  per_q = {q: vqa_accuracy(p, annotations[q], gt_processing=gt_processing)
           for q, p in predictions.items()}
  n = len(per_q)
  out = {"accuracy": 100.0 * sum(per_q.values()) / n if n else 0.0, "n": n,
         "missing": sum(q not in predictions for q in annotations)}
  if answer_types is not None:
    groups: dict[str, list[float]] = {}
    for q, acc in per_q.items():
      groups.setdefault(answer_types.get(q, "unknown"), []).append(acc)
    out["per_answer_type"] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())}
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
  "multiple_choice_answer"}. `image_file` is the COCO name, e.g.
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
