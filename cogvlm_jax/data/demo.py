"""Demo data: rendered scenes of coloured shapes with captions, VQA and referring expressions.

Everything is deterministic (seeded numpy + PIL), generated on first use and reused after:

    {dir}/meta.json              generator parameters (a mismatch is an error, not a silent reuse)
    {dir}/tokenizer.model        Llama-style sentencepiece BPE (unk 0, bos 1, eos 2, no pad,
                                 split digits, byte fallback), exactly VOCAB_SIZE pieces,
                                 trained on texts of scenes of its own (`tokenizer_corpus`),
                                 so it does not depend on the size of the splits
    {dir}/{split}.jsonl          one record per (scene, task), see `scene_records`;
                                 splits "train" and "eval" (held out: another seed stream)
    {dir}/{split}/NNNNNN.png     one image per scene
    {dir}/shards/{split}/NNNNN.tar|.parquet|_stats.json
                                 the same scenes as LAION-style (img2dataset) webdataset
                                 shards: {key}.png, {key}.txt (caption), {key}.json (boxes,
                                 referring expressions, VQA pairs and the scene's records);
                                 derived from the files above (`write_shards`), added to
                                 older folders on first use. `load_records` reads these
                                 through `WebDatasetSource` and the training pipeline reads
                                 the image bytes from the tars.

A record: {"id", "image" (path relative to the folder), "task" (caption | vqa | grounding),
"template" (base | vqa | chat), "query", "answer", "question_type" (vqa only)}.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
VOCAB_SIZE = 512  # configs/demo.py sets the model's vocab_size to this
TOKENIZER_FILE = "tokenizer.model"
META_FILE = "meta.json"
SPLITS = ("train", "eval")
TASKS = ("caption", "vqa", "grounding")
TEMPLATES = {"caption": "base", "vqa": "vqa", "grounding": "base"}

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (225, 225, 225), (60, 60, 60), (240, 230, 205))
COUNT_WORDS = {1: "one", 2: "two"}
_SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str  # one of SHAPES
  color: str  # a key of COLORS
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1] image fractions


@dataclasses.dataclass(frozen=True)
class Scene:
  background: tuple[int, int, int]
  shapes: tuple[Shape, ...]  # sorted left to right by box centre


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """What to generate; stored in meta.json so that a reused folder is known to match."""

  num_train_scenes: int = 3000
  num_eval_scenes: int = 150
  image_size: int = 64  # rendered PNG side; the pipeline resizes to the model's size
  seed: int = 0
  vocab_size: int = VOCAB_SIZE

  def meta(self) -> dict:
    return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}


# ---- scenes and texts ------------------------------------------------------------------


def _overlaps(a, b, margin: float) -> bool:
  return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1]
              or b[3] + margin <= a[1])


def sample_scene(rng: np.random.Generator, max_shapes: int = 2) -> Scene:
  """1..max_shapes non-overlapping shapes, each a different kind and a different colour."""
  n = int(rng.integers(1, max_shapes + 1))
  kinds = rng.choice(len(SHAPES), size=n, replace=False)
  colors = rng.choice(len(COLORS), size=n, replace=False)
  color_names = list(COLORS)
  for _ in range(1000):  # rejection sampling of the whole layout
    shapes: list[Shape] = []
    for kind, color in zip(kinds, colors):
      size = float(rng.uniform(0.25, 0.4))
      x0, y0 = (float(v) for v in rng.uniform(0.04, 0.96 - size, size=2))
      box = (x0, y0, x0 + size, y0 + size)
      if any(_overlaps(box, s.box, 0.04) for s in shapes):
        break
      shapes.append(Shape(SHAPES[kind], color_names[color], box))
    if len(shapes) == n:
      break
  else:  # pragma: no cover - a valid layout is found within a few tries
    raise RuntimeError("could not place the shapes without overlap")
  shapes.sort(key=lambda s: s.box[0] + s.box[2])
  background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  return Scene(background, tuple(shapes))


def render_scene(scene: Scene, image_size: int) -> Image.Image:
  """An RGB image of the scene, `image_size` pixels square."""
  big = image_size * _SUPERSAMPLE
  image = Image.new("RGB", (big, big), scene.background)
  draw = ImageDraw.Draw(image)
  for s in scene.shapes:
    x0, y0, x1, y1 = (v * big for v in s.box)
    fill = COLORS[s.color]
    if s.kind == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif s.kind == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif s.kind == "triangle":
      draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    else:
      raise ValueError(f"unknown shape {s.kind!r}")
  return image.resize((image_size, image_size), Image.LANCZOS)


def caption(scene: Scene) -> str:
  """'a red circle and a blue square' (shapes named left to right)."""
  return " and ".join(f"a {s.color} {s.kind}" for s in scene.shapes)


def box_to_text(box: Sequence[float]) -> str:
  """CogVLM's grounding format: [[x0,y0,x1,y1]] with coordinates scaled to 000..999."""
  coords = [min(999, max(0, int(v * 1000))) for v in box]
  return "[[" + ",".join(f"{c:03d}" for c in coords) + "]]"


def text_to_box(text: str) -> tuple[float, float, float, float] | None:
  """Parses the first [[x0,y0,x1,y1]] in `text` back to [0, 1] fractions (None if absent)."""
  start = text.find("[[")
  end = text.find("]]", start + 2)
  if start < 0 or end < 0:
    return None
  parts = text[start + 2:end].split(",")
  if len(parts) != 4:
    return None
  try:
    return tuple(int(p) / 1000 for p in parts)  # type: ignore[return-value]
  except ValueError:
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """Two (question_type, question, answer) triples: a colour question and one other."""
  target = scene.shapes[int(rng.integers(len(scene.shapes)))]
  pairs = [("color", f"What color is the {target.kind}?", target.color)]
  other = scene.shapes[int(rng.integers(len(scene.shapes)))]
  if rng.random() < 0.5:
    pairs.append(("shape", f"What shape is the {other.color} object?", other.kind))
  else:
    pairs.append(("count", "How many shapes are there?", COUNT_WORDS[len(scene.shapes)]))
  return pairs


def referring_expression(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """('Where is the red circle?', '[[x0,y0,x1,y1]]') for one shape of the scene."""
  s = scene.shapes[int(rng.integers(len(scene.shapes)))]
  return f"Where is the {s.color} {s.kind}?", box_to_text(s.box)


def scene_records(scene: Scene, rng: np.random.Generator, scene_id: str,
                  image: str) -> list[dict]:
  """The text records of one scene: a caption, two VQA pairs and a referring expression."""
  records = [dict(id=f"{scene_id}-caption", image=image, task="caption",
                  template=TEMPLATES["caption"], query="", answer=caption(scene))]
  for i, (qtype, q, a) in enumerate(vqa_pairs(scene, rng)):
    records.append(dict(id=f"{scene_id}-vqa{i}", image=image, task="vqa",
                        template=TEMPLATES["vqa"], query=q, answer=a, question_type=qtype))
  q, a = referring_expression(scene, rng)
  records.append(dict(id=f"{scene_id}-grounding", image=image, task="grounding",
                      template=TEMPLATES["grounding"], query=q, answer=a))
  return records


def all_words() -> list[str]:
  """Every word the generator can emit (guarantees the tokenizer covers them)."""
  words = list(COLORS) + list(SHAPES) + list(COUNT_WORDS.values())
  words += "a and What color is the shape object How many shapes are there Where".split()
  words += "Question: Answer: Short answer: [[ ]] , ?".split() + list("0123456789")
  return words


# ---- files -----------------------------------------------------------------------------


def _write_split(folder: str, split: str, num_scenes: int, spec: DemoSpec) -> list[dict]:
  # Independent streams per split so that the held-out scenes never depend on train size.
  rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
  os.makedirs(os.path.join(folder, split))
  records = []
  for i in range(num_scenes):
    scene = sample_scene(rng)
    image = f"{split}/{i:06d}.png"
    render_scene(scene, spec.image_size).save(os.path.join(folder, image))
    records.extend(scene_records(scene, rng, f"{split}-{i:06d}", image))
  with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return records


def tokenizer_corpus(seed: int, num_scenes: int = 2000) -> list[str]:
  """Texts the tokenizer is trained on: prompts and answers of `num_scenes` scenes (texts
  only, nothing rendered) from a stream of their own, so that the tokenizer is the same
  whatever the number of scenes in the splits."""
  from cogvlm_jax.tokenization import history_to_prompt

  rng = np.random.default_rng([seed, len(SPLITS)])
  texts = []
  for i in range(num_scenes):
    for r in scene_records(sample_scene(rng), rng, str(i), ""):
      prompt = history_to_prompt(r["template"], None, r["query"])
      texts += [prompt, r["answer"]] if prompt else [r["answer"]]
  return texts


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int = VOCAB_SIZE) -> None:
  """A Llama-style sentencepiece BPE model with exactly `vocab_size` pieces at `path`."""
  import sentencepiece as spm

  model = io.BytesIO()
  sentences = list(texts) + [" ".join(all_words())]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
      add_dummy_prefix=True, remove_extra_whitespaces=False, hard_vocab_limit=True,
      shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())


def _generate(folder: str, spec: DemoSpec) -> None:
  _write_split(folder, "train", spec.num_train_scenes, spec)
  _write_split(folder, "eval", spec.num_eval_scenes, spec)
  train_tokenizer(tokenizer_corpus(spec.seed), os.path.join(folder, TOKENIZER_FILE),
                  spec.vocab_size)
  with open(os.path.join(folder, META_FILE), "w") as f:
    json.dump(spec.meta(), f, indent=2)


def ensure_demo_data(folder: str, spec: DemoSpec = DemoSpec(), *, verbose: bool = True) -> str:
  """Generates the demo data in `folder` unless it is there already; returns the folder.

  Generation happens in a temporary sibling folder that is renamed into place, so an
  interrupted or concurrent run never leaves (or reads) a half-written folder. A folder made
  with different parameters is an error, not silently reused.
  """
  folder = os.path.abspath(folder)
  meta_path = os.path.join(folder, META_FILE)
  if not os.path.exists(meta_path):
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)
    if os.path.exists(folder):
      raise FileExistsError(f"{folder} exists but holds no {META_FILE}; it is not a demo data "
                            "folder (delete it or choose another data.dir)")
    tmp = tempfile.mkdtemp(prefix=".demo-tmp-", dir=parent)
    if verbose:
      print(f"Generating demo data in {folder} ({spec.num_train_scenes} train / "
            f"{spec.num_eval_scenes} eval scenes)...", flush=True)
    try:
      _generate(tmp, spec)
      os.rename(tmp, folder)
    except OSError:
      if not os.path.exists(meta_path):  # lost a race to another process: use its folder
        raise
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  with open(meta_path) as f:
    meta = json.load(f)
  if meta != spec.meta():
    raise ValueError(f"demo data in {folder} was generated with {meta}, but the config asks for "
                     f"{spec.meta()}; delete the folder or set another data.dir")
  _ensure_shards(folder, verbose)
  return folder


SHARD_DIR = "shards"
SAMPLES_PER_SHARD = 1000


def _ensure_shards(folder: str, verbose: bool) -> None:
  """Writes {folder}/shards/{split}/ (LAION-style webdataset shards) unless present.

  Derived deterministically from the PNGs + jsonl, so folders made before shards existed get
  them on first use; written in a temporary folder renamed into place (atomic). A read-only
  folder keeps working without shards (`load_records` then reads the jsonl).
  """
  target = os.path.join(folder, SHARD_DIR)
  if os.path.isdir(target):
    return
  try:
    tmp = tempfile.mkdtemp(prefix=".shards-tmp-", dir=folder)
  except OSError:
    return
  try:
    for split in SPLITS:
      write_shards(folder, split, os.path.join(tmp, split), SAMPLES_PER_SHARD)
    os.rename(tmp, target)
    if verbose:
      print(f"Wrote LAION-style shards of the demo data to {target}", flush=True)
  except OSError:
    if not os.path.isdir(target):  # not a lost race: a real problem
      raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def load_records(folder: str, split: str) -> list[dict]:
  """The records of a split, in file order.

  Read from the split's webdataset shards through `WebDatasetSource` when the folder has
  them (see `_ensure_shards`), else from {split}.jsonl. Shard records also say where their
  image is — "shard" (tar path relative to `folder`), "image_offset", "image_size" — and
  `pipeline.ExampleBuilder` reads the image bytes from there (one pread), not from the PNG.
  """
  shards = os.path.join(folder, SHARD_DIR, split)
  if os.path.isdir(shards):
    return _shard_records(folder, shards)
  path = os.path.join(folder, f"{split}.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {split} split at {path}")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _shard_records(folder: str, shards: str) -> list[dict]:
  from cogvlm_jax.data.sources import WebDatasetSource

  src = WebDatasetSource(shards, num_threads=1)
  out = []
  for i in range(len(src)):
    r = src[i]
    if r["error"] or not r["metadata"] or "records" not in r["metadata"]:
      raise ValueError(f"demo shard {r['source']} sample {r['key']}: unreadable "
                       f"({r['error'] or 'no records in its json'}); delete {shards}")
    row = src._samples[i]  # where the image bytes are (the source's own index)
    where = {"shard": os.path.relpath(r["source"], folder),
             "image_offset": int(row["image_offset"]), "image_size": int(row["image_size"])}
    out.extend(dict(rec, **where) for rec in r["metadata"]["records"])
  return out


# ---- LAION-style webdataset shards -------------------------------------------------------


def write_shards(folder: str, split: str, out_dir: str, samples_per_shard: int = 1000) -> list[str]:
  """Writes a demo split as img2dataset-style shards readable by `WebDatasetSource`.

  Per shard NNNNN: `NNNNN.tar` with `{key}.png` (the scene), `{key}.txt` (its caption) and
  `{key}.json` (key, width, height, boxes [[x0,y0,x1,y1] fractions], referring expressions
  and VQA pairs), `NNNNN.parquet` (key, url, caption, status, width, height,
  original_width, original_height, similarity) and `NNNNN_stats.json`. Returns the tar paths.
  Deterministic: fixed member order and mtimes, so the same split gives the same bytes.
  """
  import tarfile

  import pyarrow as pa
  import pyarrow.parquet as pq

  by_image: dict[str, list[dict]] = {}
  for r in load_records(folder, split):
    by_image.setdefault(r["image"], []).append(r)
  os.makedirs(out_dir, exist_ok=True)
  images = list(by_image)
  paths = []
  for shard, start in enumerate(range(0, len(images), samples_per_shard)):
    name = os.path.join(out_dir, f"{shard:05d}")
    rows = []
    with tarfile.open(name + ".tar", "w", format=tarfile.USTAR_FORMAT) as tar:
      for image in images[start:start + samples_per_shard]:
        recs = by_image[image]
        key = os.path.splitext(os.path.basename(image))[0]
        with open(os.path.join(folder, image), "rb") as f:
          png = f.read()
        with Image.open(io.BytesIO(png)) as im:
          width, height = im.size
        cap = next(r["answer"] for r in recs if r["task"] == "caption")
        refs = [{"expression": r["query"], "box": text_to_box(r["answer"])}
                for r in recs if r["task"] == "grounding"]
        meta = {"key": key, "width": width, "height": height,
                "boxes": [x["box"] for x in refs], "refs": refs,
                "qa": [{"question": r["query"], "answer": r["answer"],
                        "type": r.get("question_type")} for r in recs if r["task"] == "vqa"],
                "records": recs}
        for ext, data in (("png", png), ("txt", cap.encode()),
                          ("json", json.dumps(meta).encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size, info.mtime = len(data), 0
          tar.addfile(info, io.BytesIO(data))
        rows.append({"key": key, "url": f"demo://{image}", "caption": cap, "status": "success",
                     "width": width, "height": height, "original_width": width,
                     "original_height": height, "similarity": 0.35})
    pq.write_table(pa.Table.from_pylist(rows), name + ".parquet")
    with open(name + "_stats.json", "w") as f:
      json.dump({"count": len(rows), "successes": len(rows), "failed_to_download": 0,
                 "failed_to_resize": 0}, f)
    paths.append(name + ".tar")
  return paths


def shard_records(record: dict) -> list[dict]:
  """The demo tasks of one WebDatasetSource record (caption, VQA, grounding) as text records
  (query / answer / template), for `transforms.SampleBuilder`'s pre-rendered path."""
  meta = record.get("metadata") or {}
  base = {k: record[k] for k in ("source", "key", "image_bytes", "error") if k in record}
  out = [dict(base, task="caption", template=TEMPLATES["caption"], query="",
              answer=record.get("caption"))]
  for qa in meta.get("qa", []):
    out.append(dict(base, task="vqa", template=TEMPLATES["vqa"], query=qa["question"],
                    answer=qa["answer"]))
  for ref in meta.get("refs", []):
    out.append(dict(base, task="grounding", template=TEMPLATES["grounding"],
                    query=ref["expression"], answer=box_to_text(ref["box"])))
  return out


class DemoSource:
  """A split of the demo data as a Grain random-access source of pre-rendered records.

  One record per task example (caption, VQA, grounding): "query", "answer", "template",
  "task", plus "image_bytes" read from the split's webdataset shard (one pread) — or from the
  PNG when the folder has no shards — and "source" / "key" naming it in messages. Goes
  through `transforms.SampleBuilder` like every other source.
  """

  def __init__(self, folder: str, split: str = "train"):
    from cogvlm_jax.fileio import RangeReader  # pickles (workers reopen files)

    if split not in SPLITS:
      raise ValueError(f"demo split must be one of {SPLITS}, got {split!r}")
    self.folder, self.split = folder, split
    self.records = load_records(folder, split)
    self._reader = RangeReader()

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    r = self.records[int(index)]
    out = {k: r[k] for k in ("task", "template", "query", "answer")}
    out.update(key=r.get("id"), image_bytes=None, error=None)
    try:
      if "shard" in r:
        out["source"] = path = os.path.join(self.folder, r["shard"])
        out["image_bytes"] = self._reader.read(path, r["image_offset"], r["image_size"])
      else:
        out["source"] = path = os.path.join(self.folder, r["image"])
        with open(path, "rb") as f:
          out["image_bytes"] = f.read()
    except OSError as e:
      out["error"] = f"cannot read image: {e}"
    return out

  def __repr__(self) -> str:
    return f"DemoSource({self.folder!r}, {self.split!r}, records={len(self)})"
