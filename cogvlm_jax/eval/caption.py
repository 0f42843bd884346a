"""The caption task (COCO Karpathy test, NoCaps, Flickr30K) and its metrics (BLEU-1..4,
CIDEr-D, ROUGE-L) computed with `pycocoevalcap`.

    python eval.py --config configs/eval/coco_caption.py ...

Scores are what the COCO caption evaluation computes, reported x100 as papers do (a CIDEr of
1.487 from pycocoevalcap is reported as 148.7). pycocoevalcap's `Cider` is CIDEr-D (clipped
n-gram counts, Gaussian length penalty, sigma 6). Its IDF statistics come from the
references of the images being scored, so CIDEr of a subset is not comparable to CIDEr of the
full split, and CIDEr of a single image is always 0.

Tokenisation: both predictions and references go through Stanford's PTBTokenizer (the Java
jar shipped with pycocoevalcap, run exactly as pycocoevalcap's `PTBTokenizer` runs it:
`-preserveLines -lowerCase`, then its punctuation tokens are dropped). When `java` is not on
PATH, or the Java run fails, a pure-Python approximation is used instead (`python_tokenize`),
a warning is issued and the result carries `"tokenizer": "python-fallback"`: such scores are
close to, but NOT comparable with, published numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from typing import Mapping, Sequence

from cogvlm_jax.eval.evaluator import Task, evaluate, image_path

# Tokens pycocoevalcap's PTBTokenizer removes after tokenising (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".",
                             "?", "!", ",", ":", "-", "--", "...", ";"})
# PTB writes brackets as -LRB- etc. Lower-cased these are not in the list above, so they stay
# in pycocoevalcap's output as "-lrb-" tokens; the fallback does the same.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB splits clitics off the word before them: "don't" -> "do n't", "dog's" -> "dog 's".
_CLITIC_NT = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
# Tokens, in order of preference: clitics, dotted abbreviations ("a.m.", "u.s."), numbers with
# inner . , : ("1,000", "3.5", "5:30"), words with inner hyphens or slashes ("black-and-white",
# "and/or" stay one token, as in PTB), "...", "--", then any other single symbol.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|(?:[a-z]\.){2,}|\d+(?:[.,:]\d+)+"
                    r"|\w+(?:[-/]\w+)*|\.\.\.|--|[^\w\s]")

_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


def python_tokenize(sentence: str) -> str:
  """Pure-Python stand-in for the PTB tokenisation (used without Java).

  Lower-cases, splits off clitics ("n't", "'s", ...) and punctuation the way PTB does for
  ordinary English captions, writes brackets as "-lrb-" etc. (as they come out of
  pycocoevalcap's PTB run) and drops the punctuation tokens pycocoevalcap drops. Returns the
  space-joined tokens, the format the pycocoevalcap scorers expect. It matches PTB on
  ordinary captions; it differs on rarer cases (e.g. "mr." loses its period here).
  """
  s = sentence.lower()
  s = _CLITIC_NT.sub(r"\1 \2", s)
  s = _CLITIC.sub(r"\1 \2", s)
  tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(s))
  # Quotes become `` / '' in PTB and are dropped with the other punctuation.
  return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def _ptb_jar() -> str:
  """Path of the Stanford CoreNLP jar bundled with pycocoevalcap."""
  from pycocoevalcap.tokenizer import ptbtokenizer
  jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                     ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
  if not os.path.exists(jar):
    raise FileNotFoundError(f"PTB tokenizer jar not found: {jar}")
  return jar


def ptb_tokenize(sentences: Sequence[str], java: str = "java") -> list[str]:
  """Tokenises sentences with Stanford's PTBTokenizer, one output line per sentence.

  Same command and post-processing as pycocoevalcap's `PTBTokenizer.tokenize`, but the input
  file goes to the system temp dir (pycocoevalcap writes it next to the jar, which fails in a
  read-only site-packages) and all whitespace, including line breaks that would shift the
  one-caption-per-line alignment, is collapsed to single spaces first.
  """
  lines = [" ".join(s.split()) for s in sentences]
  with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
    f.write("\n".join(lines).encode("utf-8"))
    name = f.name
  try:
    cmd = [java, "-cp", _ptb_jar(), _PTB_CLASS, "-preserveLines", "-lowerCase", name]
    proc = subprocess.run(cmd, capture_output=True, check=False)
  finally:
    os.remove(name)
  if proc.returncode != 0:
    raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): "
                       f"{proc.stderr.decode('utf-8', 'replace')[-500:]}")
  out = proc.stdout.decode("utf-8").split("\n")[:len(lines)]
  if len(out) != len(lines):
    raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} sentences")
  return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION)
          for line in out]


def _tokenize_all(sentences: list[str], tokenizer: str) -> tuple[list[str], str]:
  """Tokenises with PTB when possible; returns (tokens, name of the tokenizer used)."""
  if tokenizer not in ("auto", "ptb", "python"):
    raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
  if tokenizer == "python":
    return [python_tokenize(s) for s in sentences], "python"
  java = shutil.which("java")
  reason = "`java` is not on PATH"
  if java is not None:
    try:
      return ptb_tokenize(sentences, java), "ptb"
    except (OSError, RuntimeError) as e:
      if tokenizer == "ptb":
        raise
      reason = f"the Java PTBTokenizer failed ({e})"
  elif tokenizer == "ptb":
    raise RuntimeError("tokenizer='ptb' needs Java: `java` is not on PATH")
  warnings.warn(f"caption metrics: {reason}; using the Python fallback tokenizer. Scores are "
                "NOT comparable to published numbers (which use the Java PTB tokenizer).",
                RuntimeWarning, stacklevel=3)
  return [python_tokenize(s) for s in sentences], "python-fallback"


def caption_scores(predictions: Mapping, references: Mapping, *,
                   tokenizer: str = "auto") -> dict:
  """BLEU-1..4, CIDEr(-D) and ROUGE-L (x100) of predictions {id: caption} vs {id: [refs]}.

  Scores the ids that have a prediction; each needs at least one reference. `tokenizer`:
  "auto" (PTB via Java, else the Python fallback with a warning), "ptb" (Java or error), or
  "python" (the fallback, chosen on purpose; recorded as "python"). Returns
  {"BLEU-1".."BLEU-4", "CIDEr", "ROUGE-L", "n", "tokenizer"}.
  """
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  ids = list(predictions)
  bad = [i for i in ids if not references.get(i)]
  if bad:
    raise KeyError(f"{len(bad)} predictions have no reference captions, e.g. {bad[0]!r}")
  if not ids:
    raise ValueError("no predictions to score")
  flat = [str(predictions[i]) for i in ids]
  ref_lists = [[str(r) for r in references[i]] for i in ids]
  for refs in ref_lists:
    flat.extend(refs)
  tokens, used = _tokenize_all(flat, tokenizer)
  # pycocoevalcap wants {key: [tokenized str]}; keys are indexes so any id type works.
  res = {k: [tokens[k]] for k in range(len(ids))}
  gts, pos = {}, len(ids)
  for k, refs in enumerate(ref_lists):
    gts[k] = tokens[pos:pos + len(refs)]
    pos += len(refs)
  with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
    bleu, _ = Bleu(4).compute_score(gts, res)
  cider, _ = Cider().compute_score(gts, res)
  rouge, _ = Rouge().compute_score(gts, res)
  out = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
  out.update({"CIDEr": 100.0 * float(cider), "ROUGE-L": 100.0 * float(rouge), "n": len(ids),
              "tokenizer": used})
  return out


# ----------------------------------------------------------------------------- loaders


def load_karpathy(path: str | os.PathLike, split: str | None = "test") -> list[dict]:
  """Reads a Karpathy split file (dataset_coco.json, dataset_flickr30k.json, ...).

  Returns {"id" (cocoid when present, else imgid), "image_file" (filepath/filename, or just
  filename), "references" (the "raw" sentences), "split"} for the images of `split`
  ("train", "restval", "val", "test"; None = all).
  """
  with open(path, encoding="utf-8") as f:
    images = json.load(f)["images"]
  records = []
  for im in images:
    if split is not None and im.get("split") != split:
      continue
    rel = os.path.join(im["filepath"], im["filename"]) if im.get("filepath") else im["filename"]
    records.append({"id": im["cocoid"] if "cocoid" in im else im["imgid"], "image_file": rel,
                    "references": [s["raw"] for s in im["sentences"]], "split": im.get("split")})
  return records


def load_coco_captions(path: str | os.PathLike) -> list[dict]:
  """Reads COCO-format caption annotations (COCO captions, NoCaps, Flickr30K in COCO form).

  Returns {"id" (image id), "image_file" (file_name), "references" (its captions; [] for a
  file without annotations such as NoCaps test)}, plus "domain" when the image entry has one
  (NoCaps: in-domain / near-domain / out-domain), in the file's image order.
  """
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  refs: dict = {}
  for a in data.get("annotations", []):
    refs.setdefault(a["image_id"], []).append(a["caption"])
  records = []
  for im in data["images"]:
    rec = {"id": im["id"], "image_file": im["file_name"], "references": refs.get(im["id"], [])}
    if "domain" in im:
      rec["domain"] = im["domain"]
    records.append(rec)
  return records


# ----------------------------------------------------------------------------- the task


def load(config) -> list[dict]:
  """Samples of a Karpathy split JSON (data.format "karpathy") or COCO caption JSON ("coco");
  "auto" looks at the file."""
  d = config.data
  fmt = d.format
  if fmt == "auto":
    with open(d.annotations, encoding="utf-8") as f:
      images = json.load(f).get("images", [])
    fmt = "karpathy" if images and "sentences" in images[0] else "coco"
  if fmt == "karpathy":
    raw = load_karpathy(d.annotations, None if d.split == "all" else d.split)
  else:
    raw = load_coco_captions(d.annotations)
  return [{"id": str(r["id"]), "image": image_path(d.image_root, r["image_file"]),
           "query": config.query_format.format(), "template": config.template,
           "references": list(r["references"]), "domain": r.get("domain")} for r in raw]


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """Caption metrics; NoCaps-style files (images with a "domain") also get them per domain."""
  tokenizer = config.caption_tokenizer
  refs = {s["id"]: s["references"] for s in samples}
  if not any(refs.values()):  # e.g. NoCaps test: nothing to score, predictions are written
    return {"n": len(predictions), "note": "no reference captions: metrics not computed"}
  out = caption_scores(predictions, refs, tokenizer=tokenizer)
  domains = sorted({s["domain"] for s in samples if s.get("domain")})
  if domains:
    out["per_domain"] = {}
    for dom in domains:
      ids = [s["id"] for s in samples if s.get("domain") == dom and s["id"] in predictions]
      scores = caption_scores({i: predictions[i] for i in ids}, refs, tokenizer=tokenizer)
      out["per_domain"][dom] = {k: v for k, v in scores.items() if k != "tokenizer"}
  return out


TASK = Task("caption", load, score)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on a caption set; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
