"""The driver every task's `run` calls: load samples, generate the missing predictions, score,
write the files.

A task (caption.py, vqa.py, refcoco.py, pope.py, demo.py) is a `Task`: how to load its
samples {"id" (str), "image" (path or None), "query", "template", "references" (list of str),
...} from the config, how to score {id: prediction} against them, and, for the report's cards,
whether one prediction is right and whether a sample is a grounding one. `evaluate`:

* merges and checks the config (`settings.resolve`);
* skips the samples OUT/predictions.jsonl already holds (a rerun resumes) and loads the model
  only when some are left: `from_pretrained(checkpoint, mesh=make_mesh(config.mesh))`, or
  the model / tokenizer / mesh passed in (train.py's end-of-run evaluation, tests);
* generates with `Generator` (bucketed, one batch prepared ahead in a thread), appending
  each batch's lines to predictions.jsonl as soon as it is decoded;
* scores, then writes metrics.json, TensorBoard scalars and report.html (outputs.py).

Several processes (multi-host): all of them generate (the batches are global arrays), only
process 0 reads and writes the files; the others follow its list of samples still to predict
and return {} (the metrics are process 0's).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from cogvlm_jax import fileio
from cogvlm_jax.boxes import parse_boxes
from cogvlm_jax.eval import outputs
from cogvlm_jax.eval.generator import Generator, data_parallel_size
from cogvlm_jax.eval.report import write_report
from cogvlm_jax.eval.settings import EvalConfigError, config_json, resolve

log = logging.getLogger(__name__)


def _never(sample: Mapping, prediction: str = "", config=None) -> None:
  return None


@dataclasses.dataclass(frozen=True)
class Task:
  """What one evaluation task adds to the driver.

  load(config) -> samples; score(samples, {id: prediction}, config) -> metrics dict;
  correct(sample, prediction, config) -> bool | None (the report card's colour; None =
  undefined); is_grounding(sample) -> bool (the card gets boxes drawn).
  """
  name: str
  load: Callable[[Any], list[dict]]
  score: Callable[[Sequence[dict], Mapping[str, str], Any], dict]
  correct: Callable[[Mapping, str, Any], Optional[bool]] = _never
  is_grounding: Callable[[Mapping], bool] = lambda sample: False


# ----------------------------------------------------------------------------- samples


def image_path(root: str, name: str | None) -> str | None:
  """`name` under `root` unless absolute (or no root); None stays None (a text-only sample)."""
  if name is None:
    return None
  return name if os.path.isabs(name) or not root else os.path.join(root, name)


def load_samples(task: Task, config) -> list[dict]:
  """The task's samples (the first config.max_samples, if set); ids must be unique."""
  samples = task.load(config)
  if config.max_samples:
    samples = samples[:config.max_samples]
  seen = set()
  for s in samples:
    if s["id"] in seen:
      raise EvalConfigError(f"duplicate sample id {s['id']!r} in the {task.name} data")
    seen.add(s["id"])
  if not samples:
    raise EvalConfigError(f"no samples for task {task.name!r}: check the data paths / split")
  return samples


def prompt_text(sample: Mapping, variant: str = "cogvlm") -> str:
  """The prompt as the model sees it (template applied; CogAgent's templates for variant
  "cogagent"), for the files and the report."""
  from cogvlm_jax.tokenization import history_to_prompt
  return history_to_prompt(sample["template"], None, sample["query"], variant)


# ----------------------------------------------------------------------------- the model


def resolve_tokenizer_path(config) -> str:
  """config.tokenizer, else the checkpoint folder (or the workdir of a training step dir),
  else the (demo) data folder."""
  from cogvlm_jax.checkpoint import tokenizer_folders
  from cogvlm_jax.tokenization import SENTENCEPIECE_FILE, TOKENIZERS_FILE
  candidates = [config.tokenizer, *(tokenizer_folders(config.checkpoint)
                                    if config.checkpoint else []), config.data.get("dir", "")]
  for c in candidates:
    if c and (os.path.isfile(c) or any(os.path.isfile(os.path.join(c, f))
                                       for f in (SENTENCEPIECE_FILE, TOKENIZERS_FILE))):
      return c
  raise FileNotFoundError(f"no tokenizer found in {[c for c in candidates if c]}; set "
                          "config.tokenizer to a folder with tokenizer.model / tokenizer.json")


def _check_batch(batch_size: int, mesh) -> None:
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise EvalConfigError(f"batch_size {batch_size} is not divisible by the data-parallel "
                          f"size {dp} (mesh data x fsdp = {dict(mesh.shape)}); change "
                          "config.batch_size or config.mesh")


def load_model(config):
  """(model, tokenizer, mesh) as configured; checks the batch against the mesh first."""
  from cogvlm_jax.pretrained import from_pretrained
  from cogvlm_jax.sharding import make_mesh
  from cogvlm_jax.tokenization import load_tokenizer

  try:
    mesh = make_mesh(config.mesh.to_dict())
  except ValueError as e:
    raise EvalConfigError(f"config.mesh: {e}") from e
  _check_batch(config.batch_size, mesh)
  if not config.checkpoint:
    raise EvalConfigError("config.checkpoint is not set (--config.checkpoint=PATH)")
  tokenizer = load_tokenizer(resolve_tokenizer_path(config))
  model = from_pretrained(config.checkpoint, dtype=config.dtype or None, mesh=mesh)
  return model, tokenizer, mesh


# ----------------------------------------------------------------------------- generation


def _todo(samples: Sequence[dict], done: Mapping, writer: bool) -> list[dict]:
  """The samples without a prediction, as process 0 sees them (broadcast to the others)."""
  import jax
  mask = np.asarray([s["id"] not in done for s in samples])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
  return [s for s, t in zip(samples, mask) if t]


def generate_missing(gen: Generator, todo: Sequence[dict], log_file: outputs.PredictionLog,
                     done: dict, bar) -> tuple[int, float]:
  """Generates `todo` batch by batch into `log_file` and `done`; (generated, seconds).

  Images are read and prompts built in a thread, one batch ahead of the device."""
  n, variant = gen.batch_size, getattr(gen.model.config, "variant", "cogvlm")
  chunks = [todo[i:i + n] for i in range(0, len(todo), n)]
  generated, start = 0, time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(gen.prepare, chunks[0])
    for k, chunk in enumerate(chunks):
      prepared = pending.result()
      if k + 1 < len(chunks):
        pending = pool.submit(gen.prepare, chunks[k + 1])
      lines = [{"id": s["id"], "prompt": prompt_text(s, variant), "prediction": a,
                "references": s["references"]} for s, a in zip(chunk, gen.run(prepared))]
      log_file.append(lines)
      done.update((line["id"], line) for line in lines)
      generated += len(chunk)
      bar.update(len(chunk))
      bar.set_postfix(samples_per_s=f"{generated / max(time.perf_counter() - start, 1e-9):.2f}")
  return generated, time.perf_counter() - start


# ----------------------------------------------------------------------------- the run


def evaluate(task: Task, config, workdir: str, *, model=None, tokenizer=None, mesh=None,
             progress: bool = True) -> dict:
  """Evaluates config.checkpoint (or `model`) on `task`; the metrics (see the module doc).

  `model` / `tokenizer` (and the `mesh` the model lives on) may be given; otherwise they are
  loaded from config.checkpoint, only when some sample still needs a prediction.
  """
  import jax
  from tqdm import tqdm

  config = resolve(config)
  if config.task != task.name:
    raise EvalConfigError(f"config.task is {config.task!r}, but this is the {task.name} task")
  writer = jax.process_index() == 0
  samples = load_samples(task, config)
  pred_path = os.path.join(workdir, outputs.PREDICTIONS_FILE)
  done: dict = {}
  if writer:
    fileio.makedirs(workdir)  # local or gs://
    outputs.check_run_signature(workdir, config)
    done = outputs.read_predictions(pred_path)
  todo = _todo(samples, done, writer)
  log.info("%s: %d samples, %d already predicted, %d to generate", task.name, len(samples),
           len(samples) - len(todo), len(todo))

  generated, seconds = 0, 0.0
  if todo:
    if model is None or tokenizer is None:
      model, tokenizer, mesh = load_model(config)
    elif mesh is not None:
      _check_batch(config.batch_size, mesh)
    gen = Generator(model, tokenizer, batch_size=config.batch_size,
                    length_buckets=config.length_buckets, max_new_tokens=config.max_new_tokens,
                    mesh=mesh, stop_tokens=config.stop_tokens)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="sample",
               desc=f"eval {task.name}", disable=not progress or not writer, dynamic_ncols=True)
    if writer:
      outputs.write_run_signature(workdir, config)
    with outputs.PredictionLog(pred_path if writer else None) as log_file:
      generated, seconds = generate_missing(gen, todo, log_file, done, bar)
    bar.close()
  if not writer:
    return {}

  predictions = {s["id"]: str(done[s["id"]]["prediction"]) for s in samples}
  metrics = dict(task.score(samples, predictions, config))
  metrics["num_samples"] = len(samples)
  metrics["generated_this_run"] = generated
  if generated:
    metrics["samples_per_second"] = generated / max(seconds, 1e-9)
  outputs.write_metrics(workdir, config, metrics, config_json(config))
  if config.report_samples:
    write_report(os.path.join(workdir, outputs.REPORT_FILE),
                 f"{task.name}: {config.checkpoint}", metrics,
                 report_cards(task, config, samples, predictions, config.report_samples,
                              getattr(getattr(model, "config", None), "variant", "cogvlm")))
  return metrics


# ----------------------------------------------------------------------------- report cards

REPORT_MIN_SIDE = 256


def _report_image(path: str | None):
  """The image for a report card; small ones (e.g. 64 px demo renders) enlarged, pixelated,
  so that boxes stay readable. An unreadable file stays a path: the card says why."""
  if path is None:
    return None
  try:
    from PIL import Image
    with Image.open(path) as im:
      img = im.convert("RGB")
  except OSError:
    return path
  factor = math.ceil(REPORT_MIN_SIDE / max(img.size))
  if factor > 1:
    img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
  return img


def report_cards(task: Task, config, samples: Sequence[Mapping], predictions: Mapping,
                 n: int, variant: str = "cogvlm") -> list[dict]:
  """`n` samples spread evenly over the set (every task kind of the demo is represented)."""
  idx = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(n, len(samples)))})
  cards = []
  for i in idx:
    s = samples[i]
    pred = predictions[s["id"]]
    card = {"id": s["id"], "image": _report_image(s.get("image")),
            "prompt": prompt_text(s, variant),
            "prediction": pred, "references": s["references"],
            "correct": task.correct(s, pred, config) if s["references"] else None}
    if task.is_grounding(s):
      card["pred_boxes"] = parse_boxes(pred)
      card["gt_boxes"] = parse_boxes(s["references"][0]) if s["references"] else None
    cards.append(card)
  return cards
