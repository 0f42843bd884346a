"""The demo data folder: generated on first use, checked against the config after.

    {dir}/meta.json              the generator version and `DemoSpec`; a folder whose meta.json
                                 differs from what the config asks for is an error, never
                                 silently reused or upgraded
    {dir}/tokenizer.model        the demo tokenizer (`cogvlm_jax.data.demo.tokenizer`)
    {dir}/{split}.jsonl          one record per (scene, task), see `scenes.scene_records`;
                                 splits "train" and "eval" (held out: another seed stream)
    {dir}/{split}/NNNNNN.png     one image per scene
    {dir}/shards/{split}/NNNNN.tar|.parquet|_stats.json
                                 the same scenes as LAION-style (img2dataset) webdataset
                                 shards: {key}.png, {key}.txt (caption), {key}.json (boxes,
                                 referring expressions, VQA pairs and the scene's records).
                                 `load_records` reads these through `WebDatasetSource`, and
                                 the training pipeline reads the image bytes from the tars.

The whole folder is written in a staging folder and renamed into place
(`fileio.atomic_output_dir`), so an interrupted or concurrent run never leaves (or reads) a
half-written one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from cogvlm_jax.boxes import parse_boxes
from cogvlm_jax.data.demo.scenes import render_scene, sample_scene, scene_records
from cogvlm_jax.data.demo.tokenizer import (TOKENIZER_FILE, VOCAB_SIZE, tokenizer_corpus,
                                            train_tokenizer)
from cogvlm_jax.fileio import atomic_output_dir

# 2: grounding answers are `boxes.format_box` (rounded; version 1 truncated), and the shards
# are written with the folder. 3: larger shapes on a 20-step grid, 48 px renders, two in three
# second questions ask for a shape. 4: shapes cover whole patches of the model's 6 x 6 patch
# grid (scenes.GRID). A folder of another version is refused (`check_folder`).
GENERATOR_VERSION = 4
META_FILE = "meta.json"
SPLITS = ("train", "eval")  # split i draws its scenes from the seed stream [seed, i]
SHARD_DIR = "shards"
SAMPLES_PER_SHARD = 1000


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """What to generate; stored in meta.json so that a reused folder is known to match."""

  num_train_scenes: int = 3000
  num_eval_scenes: int = 150
  image_size: int = 48  # rendered PNG side (configs/demo.py: the model's, no resampling)
  seed: int = 0
  vocab_size: int = VOCAB_SIZE

  def meta(self) -> dict:
    """The JSON object meta.json holds for this spec."""
    return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}


def ensure_demo_data(folder: str, spec: DemoSpec = DemoSpec(), *, verbose: bool = True) -> str:
  """Generates the demo data in `folder` unless it is there already; returns its absolute path.

  Raises FileExistsError for a folder that is not a demo data folder, and ValueError (one
  line) for a demo folder of another generator version or other parameters.
  """
  folder = os.path.abspath(folder)
  if not os.path.exists(os.path.join(folder, META_FILE)):
    _generate_in_place(folder, spec, verbose)
  check_folder(folder, spec)
  return folder


def check_folder(folder: str, spec: DemoSpec) -> None:
  """Raises ValueError (one line, saying what to do) unless folder's meta.json is `spec`'s."""
  with open(os.path.join(folder, META_FILE)) as f:
    meta = json.load(f)
  fix = "delete the folder or set another data.dir"
  version = meta.get("generator_version")
  if version != GENERATOR_VERSION:
    raise ValueError(f"demo data in {folder} was made by generator version {version}, this "
                     f"code makes version {GENERATOR_VERSION} (other answer texts); {fix}")
  if meta != spec.meta():
    raise ValueError(f"demo data in {folder} was generated with {meta}, but the config asks "
                     f"for {spec.meta()}; {fix}")


def _generate_in_place(folder: str, spec: DemoSpec, verbose: bool) -> None:
  """Generates the folder in a staging folder renamed to `folder`; a concurrent process that
  placed its (identical) folder first wins, and this one's is dropped."""
  if os.path.isdir(folder) and not os.listdir(folder):
    os.rmdir(folder)
  if os.path.exists(folder):
    raise FileExistsError(f"{folder} exists but holds no {META_FILE}; it is not a demo data "
                          "folder (delete it or choose another data.dir)")
  if verbose:
    print(f"Generating demo data in {folder} ({spec.num_train_scenes} train / "
          f"{spec.num_eval_scenes} eval scenes)...", flush=True)
  try:
    with atomic_output_dir(folder) as (_, out):
      _generate(out, spec)
  except OSError:
    if not os.path.exists(os.path.join(folder, META_FILE)):  # not a lost race: a real error
      raise


def _generate(folder: str, spec: DemoSpec) -> None:
  """Writes everything of the folder layout into `folder` (created here), meta.json last."""
  os.makedirs(folder)
  for split, num_scenes in zip(SPLITS, (spec.num_train_scenes, spec.num_eval_scenes)):
    records = _write_split(folder, split, num_scenes, spec)
    write_shards(folder, split, os.path.join(folder, SHARD_DIR, split), SAMPLES_PER_SHARD,
                 records=records)
  train_tokenizer(tokenizer_corpus(spec.seed), os.path.join(folder, TOKENIZER_FILE),
                  spec.vocab_size)
  with open(os.path.join(folder, META_FILE), "w") as f:
    json.dump(spec.meta(), f, indent=2)


def _write_split(folder: str, split: str, num_scenes: int, spec: DemoSpec) -> list[dict]:
  """Renders a split's PNGs and writes its jsonl; returns its records in file order."""
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


# ---- reading ---------------------------------------------------------------------------


def load_records(folder: str, split: str) -> list[dict]:
  """The records of a split, in file order, read from its shards through `WebDatasetSource`.

  Each is a `scenes.scene_records` record plus where its image bytes are: "shard" (tar path
  relative to `folder`), "image_offset" and "image_size" (read with one pread).
  """
  if split not in SPLITS:
    raise ValueError(f"demo split must be one of {SPLITS}, got {split!r}")
  shards = os.path.join(folder, SHARD_DIR, split)
  if not os.path.isdir(shards):
    raise FileNotFoundError(f"no {split} shards in {shards}: not a complete demo data folder "
                            "(delete it or set another data.dir)")
  return _shard_records(folder, shards)


def _shard_records(folder: str, shards: str) -> list[dict]:
  """The records stored in the json members of the shards in `shards`, with their image's
  place in the tar; ValueError for a sample without them."""
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


def write_shards(folder: str, split: str, out_dir: str, samples_per_shard: int = 1000,
                 records: Optional[Sequence[dict]] = None) -> list[str]:
  """Writes a demo split as img2dataset-style shards readable by `WebDatasetSource`.

  Per shard NNNNN: `NNNNN.tar` with `{key}.png` (the scene), `{key}.txt` (its caption) and
  `{key}.json` (key, width, height, boxes [[x0,y0,x1,y1] fractions], referring expressions,
  VQA pairs and the scene's records), `NNNNN.parquet` (key, url, caption, status, width,
  height, original_width, original_height, similarity) and `NNNNN_stats.json`.
  records: the split's records (default: `load_records(folder, split)`); their "image" paths
  are read from `folder`. Returns the tar paths. Deterministic: fixed member order and
  mtimes, so the same records give the same bytes.
  """
  by_image: dict[str, list[dict]] = {}
  for r in records if records is not None else load_records(folder, split):
    by_image.setdefault(r["image"], []).append(r)
  os.makedirs(out_dir, exist_ok=True)
  images = list(by_image)
  paths = []
  for shard, start in enumerate(range(0, len(images), samples_per_shard)):
    name = os.path.join(out_dir, f"{shard:05d}")
    _write_shard(folder, name, [(image, by_image[image])
                                for image in images[start:start + samples_per_shard]])
    paths.append(name + ".tar")
  return paths


def _write_shard(folder: str, name: str, scenes: list[tuple[str, list[dict]]]) -> None:
  """One shard `name`.tar / .parquet / _stats.json of (image path, its records) pairs."""
  import tarfile

  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = []
  with tarfile.open(name + ".tar", "w", format=tarfile.USTAR_FORMAT) as tar:
    for image, recs in scenes:
      key = os.path.splitext(os.path.basename(image))[0]
      with open(os.path.join(folder, image), "rb") as f:
        png = f.read()
      with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
      cap = next(r["answer"] for r in recs if r["task"] == "caption")
      for ext, data in (("png", png), ("txt", cap.encode()),
                        ("json", json.dumps(_sample_json(key, width, height, recs)).encode())):
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


def _sample_json(key: str, width: int, height: int, recs: list[dict]) -> dict:
  """A scene's {key}.json: size, boxes (relative x0, y0, x1, y1), refs, qa and its records."""
  refs = [{"expression": r["query"], "box": list(parse_boxes(r["answer"])[0])}
          for r in recs if r["task"] == "grounding"]
  return {"key": key, "width": width, "height": height,
          "boxes": [x["box"] for x in refs], "refs": refs,
          "qa": [{"question": r["query"], "answer": r["answer"], "type": r.get("question_type")}
                 for r in recs if r["task"] == "vqa"],
          "records": recs}
