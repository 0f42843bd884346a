"""Benchmark evaluation: generate answers for a task's samples, score them, write a report.

    python eval.py --config configs/eval/vqav2.py --config.checkpoint=PATH --workdir OUT

`run_eval(config, workdir)` does the work. Per task an adapter turns the task's files into
samples {"id" (str), "image" (path), "query", "template", "references" (list of str), ...}
and scores {id: prediction} against them. The runner:

* loads the model with `from_pretrained(checkpoint, mesh=make_mesh(config.mesh))` (HF folder,
  converted checkpoint or training workdir) and runs generation under the same activation
  sharding rules as training; the batch must divide the data-parallel size (data x fsdp);
* builds prompts with `build_conversation_input_ids` (the task's template), left-pads each
  batch to the smallest of `config.length_buckets` that fits and fills the last batch with
  dummy rows, so that `generate` (prefill + KV-cache decoding under jit) compiles once per
  bucket, not once per batch;
* appends one JSON line per sample to OUT/predictions.jsonl as soon as its batch is decoded
  ({"id", "prompt", "prediction", "references"}); a rerun skips the ids already there;
* writes OUT/metrics.json (atomically), TensorBoard scalars (tensorboardX, when installed) and
  OUT/report.html (the metric table and `config.report_samples` sample cards).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cogvlm_jax.fileio import write_atomic  # local + gs:// atomic writes
from cogvlm_jax.eval.caption import caption_scores, load_coco_captions, load_karpathy
from cogvlm_jax.eval.grounding import (box_iou, format_box, load_refcoco_json, parse_boxes,
                                       rec_accuracy)
from cogvlm_jax.eval.pope import load_pope, parse_pope_answer, pope_scores
from cogvlm_jax.eval.report import write_report
from cogvlm_jax.eval.vqa import load_textvqa, load_vqav2, normalize_answer, vqa_score

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


class EvalConfigError(ValueError):
  """A configuration / data problem the user must fix (eval.py prints it without a trace)."""


# ----------------------------------------------------------------------------- task adapters


def _cfg_get(config, key: str, default=None):
  """config[key] for a ConfigDict or a dict; `default` when absent or None."""
  try:
    value = config[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def _image_path(root: str, name: str | None) -> str | None:
  if name is None:
    return None
  return name if os.path.isabs(name) or not root else os.path.join(root, name)


def _query(config, default: str, **fields) -> str:
  return str(_cfg_get(config, "query_format", default)).format(**fields)


def _template(config, default: str) -> str:
  return _cfg_get(config, "template", default) or default


def load_caption(config) -> list[dict]:
  """Karpathy split JSON (data.format "karpathy") or COCO caption JSON ("coco"); "auto" looks."""
  d = config.data
  path = d.annotations
  fmt = _cfg_get(d, "format", "auto")
  if fmt == "auto":
    with open(path, encoding="utf-8") as f:
      images = json.load(f).get("images", [])
    fmt = "karpathy" if images and "sentences" in images[0] else "coco"
  if fmt == "karpathy":
    split = _cfg_get(d, "split", "test")
    raw = load_karpathy(path, None if split == "all" else split)
  elif fmt == "coco":
    raw = load_coco_captions(path)
  else:
    raise EvalConfigError(f"caption data.format must be auto, karpathy or coco, got {fmt!r}")
  return [{"id": str(r["id"]), "image": _image_path(d.image_root, r["image_file"]),
           "query": _query(config, ""), "template": _template(config, "base"),
           "references": list(r["references"]), "domain": r.get("domain")} for r in raw]


def score_caption(samples, predictions, config) -> dict:
  """Caption metrics; NoCaps-style files (images with a "domain") also get them per domain."""
  tokenizer = _cfg_get(config, "caption_tokenizer", "auto")
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


def load_vqa(config) -> list[dict]:
  """VQAv2 / OK-VQA questions (+ annotations) JSON (data.format "vqav2"), TextVQA ("textvqa")."""
  d = config.data
  fmt = _cfg_get(d, "format", "vqav2")
  if fmt == "vqav2":
    raw = load_vqav2(d.questions, _cfg_get(d, "annotations") or None)
  elif fmt == "textvqa":
    raw = load_textvqa(d.questions)
  else:
    raise EvalConfigError(f"vqa data.format must be vqav2 or textvqa, got {fmt!r}")
  out = []
  for r in raw:
    if r["image_file"] is None:
      raise EvalConfigError(f"{d.questions} has no data_subtype: cannot name the image files")
    out.append({"id": str(r["question_id"]), "image": _image_path(d.image_root, r["image_file"]),
                "query": _query(config, "{question}", question=r["question"]),
                "template": _template(config, "vqa"), "references": list(r["answers"] or []),
                "answer_type": r.get("answer_type")})
  return out


def score_vqa(samples, predictions, config) -> dict:
  annotated = {s["id"]: s for s in samples if s["references"]}
  if not annotated:  # e.g. test-dev: nothing to score, predictions are still written
    return {"n": len(predictions), "note": "no annotations: accuracy not computed"}
  preds = {k: v for k, v in predictions.items() if k in annotated}
  types = {k: s["answer_type"] for k, s in annotated.items() if s.get("answer_type")}
  return vqa_score(preds, {k: s["references"] for k, s in annotated.items()},
                   types or None, gt_processing=_cfg_get(config, "gt_processing", "full"))


def load_refcoco(config) -> list[dict]:
  """RefCOCO/+/g converted to JSON (see `load_refcoco_json`), one sample per expression."""
  d = config.data
  split = _cfg_get(d, "split", "val")
  raw = load_refcoco_json(d.annotations, None if split == "all" else split)
  default_query = "Where is {sentence}? Answer in [[x0,y0,x1,y1]] format."
  return [{"id": str(r["id"]), "image": _image_path(d.image_root, r["image_file"]),
           "query": _query(config, default_query, sentence=r["sentence"]),
           "template": _template(config, "base"), "references": [format_box(r["box"])],
           "box": list(r["box"])} for r in raw]


def score_refcoco(samples, predictions, config) -> dict:
  gt = {s["id"]: tuple(s["box"]) for s in samples}
  return rec_accuracy(predictions, {k: gt[k] for k in predictions},
                      float(_cfg_get(config, "iou_threshold", 0.5)))


def load_pope_task(config) -> list[dict]:
  """POPE question JSON lines ({"question_id", "image", "text", "label"})."""
  d = config.data
  return [{"id": str(r["question_id"]), "image": _image_path(d.image_root, r["image_file"]),
           "query": _query(config, "{question}", question=r["question"]),
           "template": _template(config, "chat"), "references": [r["label"]],
           "label": r["label"]} for r in load_pope(d.questions)]


def score_pope(samples, predictions, config) -> dict:
  labels = {s["id"]: s["label"] for s in samples}
  return pope_scores(predictions, {k: labels[k] for k in predictions})


def load_demo(config) -> list[dict]:
  """The demo data's held-out split: caption, VQA and grounding records, as in training."""
  from cogvlm_jax.data import demo

  d = config.data
  folder = d.dir
  if not os.path.exists(os.path.join(folder, demo.META_FILE)):
    demo.ensure_demo_data(folder)  # the default spec, as configs/demo.py trains on
  records = demo.load_records(folder, _cfg_get(d, "split", "eval"))
  limit = int(_cfg_get(d, "max_examples_per_task", 0))
  counts: dict[str, int] = {}
  out = []
  for r in records:
    counts[r["task"]] = counts.get(r["task"], 0) + 1
    if limit and counts[r["task"]] > limit:
      continue
    out.append({"id": str(r["id"]), "image": os.path.join(folder, r["image"]),
                "query": r["query"], "template": r["template"], "references": [r["answer"]],
                "task": r["task"], "question_type": r.get("question_type")})
  return out


def score_demo(samples, predictions, config) -> dict:
  """Per task kind: caption metrics, VQA accuracy (one reference answer: exact match after
  the official normalisation), grounding accuracy at IoU >= 0.5."""
  out: dict[str, Any] = {}
  by_task: dict[str, list[dict]] = {}
  for s in samples:
    if s["id"] in predictions:
      by_task.setdefault(s["task"], []).append(s)
  for task, group in sorted(by_task.items()):
    preds = {s["id"]: predictions[s["id"]] for s in group}
    if task == "caption":
      out[task] = caption_scores(preds, {s["id"]: s["references"] for s in group},
                                 tokenizer=_cfg_get(config, "caption_tokenizer", "auto"))
      out[task]["exact_match"] = 100.0 * float(np.mean(
          [normalize_answer(preds[s["id"]]) == normalize_answer(s["references"][0])
           for s in group]))
    elif task == "vqa":
      # With 10 identical answers the VQA accuracy is exactly the normalised exact match.
      out[task] = vqa_score(preds, {s["id"]: s["references"] * 10 for s in group},
                            {s["id"]: s["question_type"] for s in group})
    elif task == "grounding":
      gt = {s["id"]: parse_boxes(s["references"][0])[0] for s in group}
      out[task] = rec_accuracy(preds, gt)
  return out


TASKS: dict[str, tuple[Callable, Callable]] = {
    "caption": (load_caption, score_caption),
    "vqa": (load_vqa, score_vqa),
    "refcoco": (load_refcoco, score_refcoco),
    "pope": (load_pope_task, score_pope),
    "demo": (load_demo, score_demo),
}


def _is_grounding(task: str, sample: Mapping) -> bool:
  return task == "refcoco" or (task == "demo" and sample.get("task") == "grounding")


def _sample_correct(task: str, sample: Mapping, prediction: str) -> bool | None:
  """Per-sample correctness for the report's card colour (None = not defined)."""
  refs = sample["references"]
  if not refs:
    return None
  if _is_grounding(task, sample):
    pred, gt = parse_boxes(prediction), parse_boxes(refs[0])
    return bool(pred and gt and box_iou(pred[0], gt[0]) >= 0.5)
  if task == "pope":
    return parse_pope_answer(prediction) == str(sample["label"]).strip().lower()
  if task == "vqa" or (task == "demo" and sample.get("task") == "vqa"):
    return normalize_answer(prediction) in {normalize_answer(r) for r in refs}
  return None


# ----------------------------------------------------------------------------- files


def _atomic_write_json(path: str, obj) -> None:
  data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
  write_atomic(path, data, mode=0o644)


def read_predictions(path: str) -> dict[str, dict]:
  """{id: line} of an existing predictions.jsonl. A last line cut short by a crash is
  truncated away (so appending stays valid JSON lines); a later line wins for a repeated id."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    data = f.read()
  if data and not data.endswith(b"\n"):
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping an incomplete last line", path)
    with open(path, "r+b") as f:
      f.truncate(keep)
    data = data[:keep]
  out = {}
  for line in data.decode("utf-8").splitlines():
    if line.strip():
      d = json.loads(line)
      out[str(d["id"])] = d
  return out


def _scalars(metrics: Mapping, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    if isinstance(v, Mapping):
      out.update(_scalars(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = float(v)
  return out


def write_tensorboard(workdir: str, metrics: Mapping, step: int = 0) -> bool:
  """Scalars "eval/<metric>" under workdir/tensorboard (tensorboardX); False (logged) when
  tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    log.warning("tensorboardX is not installed: TensorBoard scalars not written")
    return False
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  try:
    for name, value in _scalars(metrics).items():
      writer.add_scalar(f"eval/{name}", value, step)
  finally:
    writer.close()
  return True


# ----------------------------------------------------------------------------- generation


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (ValueError naming the length when none fits)."""
  fits = [b for b in sorted(buckets) if b >= length]
  if not fits:
    raise EvalConfigError(f"a prompt has {length} tokens, longer than every length bucket "
                     f"{sorted(buckets)}; add a larger one to config.length_buckets")
  return fits[0]


DEFAULT_TEXT_BUCKETS = (16, 32, 64, 128, 256)


def default_buckets(model_config) -> list[int]:
  """BOS + the image span + a few text lengths (used when config.length_buckets is empty)."""
  return [1 + model_config.image_span_length + t for t in DEFAULT_TEXT_BUCKETS]


def data_parallel_size(mesh) -> int:
  return int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))


def _generate(model, batch, **kw):
  """Indirection so tests can count calls and shapes (monkeypatch `runner.generate_batch`)."""
  from cogvlm_jax.generate import generate
  return generate(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                  batch["images"], **kw)


generate_batch = _generate


class Generator:
  """Batched, bucketed greedy generation: prompts in, decoded answers out."""

  def __init__(self, model, tokenizer, *, batch_size: int, length_buckets: Sequence[int],
               max_new_tokens: int, mesh=None, stop_tokens: Sequence[str] = ()):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
    cfg = model.config
    self.buckets = sorted(int(b) for b in length_buckets) or default_buckets(cfg)
    # eos of the tokenizer and the model, plus named stop tokens the vocabulary has (CogVLM2
    # chat models end a turn with <|eot_id|>; its HF config lists it as a second eos).
    extra = [tokenizer.token_to_id(t) for t in stop_tokens]
    self.stop = list(dict.fromkeys(t for t in (tokenizer.eos_token_id, cfg.eos_token_id, *extra)
                                   if t is not None))
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.image_size = cfg.vision.image_size

  def build(self, sample: Mapping) -> dict:
    from cogvlm_jax.tokenization import build_conversation_input_ids
    image = sample.get("image")
    try:
      return build_conversation_input_ids(self.tokenizer, self.model.config,
                                          query=sample["query"], image=image,
                                          template_version=sample["template"])
    except (OSError, ValueError) as e:  # missing / undecodable image: answer from a black one
      if image is None:
        raise
      log.warning("sample %s: cannot read image %s (%s); using a black image",
                  sample["id"], image, e)
      black = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      return build_conversation_input_ids(self.tokenizer, self.model.config,
                                          query=sample["query"], image=black,
                                          template_version=sample["template"])

  def prepare(self, samples: Sequence[Mapping]) -> tuple[dict, int, int]:
    """Host work for one batch (images, tokens, padding): (batch, bucket, real rows).

    Thread-safe, so the next batch can be prepared while the current one generates."""
    from cogvlm_jax.tokenization import collate
    if not 0 < len(samples) <= self.batch_size:
      raise ValueError(f"got {len(samples)} samples for batch_size {self.batch_size}")
    built = [self.build(s) for s in samples]
    bucket = pick_bucket(max(len(b["input_ids"]) for b in built), self.buckets)
    built += [built[0]] * (self.batch_size - len(built))  # dummy rows: static batch shape
    batch = collate(built, pad_to=bucket, pad_id=self.pad_id)
    batch.setdefault("images", None)
    batch.pop("has_image", None)
    return batch, bucket, len(samples)

  def run(self, prepared: tuple[dict, int, int]) -> list[str]:
    """Generates for a prepared batch; the decoded answers of its real rows."""
    batch, bucket, n = prepared
    if self.mesh is not None and batch["images"] is not None:
      import jax
      from jax.sharding import NamedSharding, PartitionSpec
      spec = PartitionSpec(("data", "fsdp"))  # the batch dim, as training shards it
      batch = {**batch, "images": jax.device_put(batch["images"],
                                                 NamedSharding(self.mesh, spec))}
    kw = dict(max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop,
              pad_token_id=self.stop[0] if self.stop else None)
    if self.mesh is not None:
      from cogvlm_jax.sharding import activation_sharding
      with activation_sharding(self.mesh):
        out = generate_batch(self.model, batch, **kw)
    else:
      out = generate_batch(self.model, batch, **kw)
    answers = []
    for row in np.asarray(out)[:n, bucket:]:
      ids = [int(t) for t in row]
      cut = min([ids.index(t) for t in self.stop if t in ids], default=len(ids))
      answers.append(self.tokenizer.decode(ids[:cut]).strip())
    return answers

  def __call__(self, samples: Sequence[Mapping]) -> list[str]:
    return self.run(self.prepare(samples))


# ----------------------------------------------------------------------------- the run


def _resolve_tokenizer_path(config) -> str:
  from cogvlm_jax.tokenization import SENTENCEPIECE_FILE, TOKENIZERS_FILE
  candidates = [_cfg_get(config, "tokenizer", ""), config.checkpoint,
                _cfg_get(config.data, "dir", "")]
  for c in candidates:
    if c and (os.path.isfile(c) or any(os.path.isfile(os.path.join(c, f))
                                       for f in (SENTENCEPIECE_FILE, TOKENIZERS_FILE))):
      return c
  raise FileNotFoundError(f"no tokenizer found in {[c for c in candidates if c]}; set "
                          "config.tokenizer to a folder with tokenizer.model / tokenizer.json")


def load_samples(config) -> list[dict]:
  task = config.task
  if task not in TASKS:
    raise EvalConfigError(f"unknown task {task!r}; known: {sorted(TASKS)}")
  samples = TASKS[task][0](config)
  limit = int(_cfg_get(config, "max_samples", 0))
  if limit:
    samples = samples[:limit]
  seen = set()
  for s in samples:
    if s["id"] in seen:
      raise EvalConfigError(f"duplicate sample id {s['id']!r} in the {task} data")
    seen.add(s["id"])
  return samples


def _load_model(config):
  """(model, tokenizer, mesh) as configured; checks the batch against the mesh first."""
  from cogvlm_jax.pretrained import from_pretrained
  from cogvlm_jax.sharding import make_mesh
  from cogvlm_jax.tokenization import load_tokenizer

  mesh_cfg = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
  try:
    mesh = make_mesh(mesh_cfg)
  except ValueError as e:
    raise EvalConfigError(f"config.mesh: {e}") from e
  dp = data_parallel_size(mesh)
  if config.batch_size % dp:
    raise EvalConfigError(f"batch_size {config.batch_size} is not divisible by the "
                          f"data-parallel size {dp} (mesh data x fsdp = {dict(mesh.shape)}); "
                          "change config.batch_size or config.mesh")
  if not config.checkpoint:
    raise EvalConfigError("config.checkpoint is not set (--config.checkpoint=PATH)")
  tokenizer = load_tokenizer(_resolve_tokenizer_path(config))
  model = from_pretrained(config.checkpoint, dtype=_cfg_get(config, "dtype") or None, mesh=mesh)
  return model, tokenizer, mesh


RUN_FILE = "eval_run.json"
# Settings that change what is predicted: resuming under different ones would mix two runs.
_SIGNATURE_KEYS = ("task", "template", "query_format", "max_new_tokens")


def _run_signature(config) -> dict:
  sig = {k: _cfg_get(config, k) for k in _SIGNATURE_KEYS}
  sig["checkpoint"] = resolved_checkpoint(config.checkpoint)
  return sig


def resolved_checkpoint(path: str) -> str:
  """The absolute path of what is evaluated: a training workdir resolves to its latest step
  (so that resuming after training went on does not mix two steps' predictions)."""
  if not path:
    return ""
  from cogvlm_jax import checkpoint
  try:
    return checkpoint.resolve_step_dir(path)
  except (FileNotFoundError, OSError):
    return os.path.abspath(path)


def checkpoint_step(path: str) -> int | None:
  """The training step of a `<workdir>/checkpoints/<step>` checkpoint, else None."""
  from cogvlm_jax import checkpoint
  resolved = resolved_checkpoint(path)
  parent, name = os.path.split(resolved)
  if name.isdigit() and os.path.basename(parent) == checkpoint.CHECKPOINTS_DIR:
    return int(name)
  return None


def _check_run_signature(workdir: str, config) -> None:
  """Refuses to resume predictions made with another checkpoint / task / prompt settings."""
  path = os.path.join(workdir, RUN_FILE)
  sig = json.loads(json.dumps(_run_signature(config)))  # tuples -> lists, as stored
  if os.path.exists(path) and os.path.exists(os.path.join(workdir, PREDICTIONS_FILE)):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    diff = "; ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in sig.items()
                     if old.get(k) != v)
    if diff:
      raise EvalConfigError(f"{workdir} holds predictions made with other settings ({diff}); "
                            "use another --workdir (or delete its predictions.jsonl) to start over")
  _atomic_write_json(path, sig)


def _prompt_text(sample: Mapping) -> str:
  from cogvlm_jax.tokenization import history_to_prompt
  return history_to_prompt(sample["template"], None, sample["query"])


def run_eval(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
             progress: bool = True) -> dict:
  """Evaluates config.checkpoint on config.task; returns the metrics (see the module doc).

  `model` / `tokenizer` may be given (tests, notebooks); otherwise they are loaded only when
  some sample still needs a prediction.

  Several processes (multi-host): all of them generate (the batches are global arrays), only
  process 0 reads and writes the files in `workdir` — the other processes follow its list of
  samples still to predict and return {} (the metrics are process 0's).
  """
  import jax

  writer = jax.process_index() == 0
  samples = load_samples(config)
  if not samples:
    raise EvalConfigError(f"no samples for task {config.task!r}: check the data paths / split")
  pred_path = os.path.join(workdir, PREDICTIONS_FILE)
  done: dict = {}
  if writer:
    os.makedirs(workdir, exist_ok=True)
    _check_run_signature(workdir, config)
    done = read_predictions(pred_path)
  todo_mask = np.asarray([s["id"] not in done for s in samples])
  if jax.process_count() > 1:  # everyone follows process 0's view of what is left
    from jax.experimental import multihost_utils
    todo_mask = np.asarray(multihost_utils.broadcast_one_to_all(todo_mask))
  todo = [s for s, t in zip(samples, todo_mask) if t]
  log.info("%s: %d samples, %d already predicted, %d to generate", config.task, len(samples),
           len(samples) - len(todo), len(todo))

  generated, gen_seconds = 0, 0.0
  if todo:
    if model is None or tokenizer is None:
      model, tokenizer, mesh = _load_model(config)
    elif mesh is not None and config.batch_size % data_parallel_size(mesh):
      raise EvalConfigError(f"batch_size {config.batch_size} is not divisible by the "
                            f"data-parallel size {data_parallel_size(mesh)}")
    gen = Generator(model, tokenizer, batch_size=config.batch_size,
                    length_buckets=config.length_buckets, max_new_tokens=config.max_new_tokens,
                    mesh=mesh, stop_tokens=tuple(_cfg_get(config, "stop_tokens", ())))
    from tqdm import tqdm
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="sample",
               desc=f"eval {config.task}", disable=not progress or not writer,
               dynamic_ncols=True)
    start = time.perf_counter()
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    # Images are read and prompts built in a thread, one batch ahead of the device.
    with open(pred_path if writer else os.devnull, "a", encoding="utf-8") as f, \
        concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(gen.prepare, chunks[0])
      for k, chunk in enumerate(chunks):
        prepared = pending.result()
        if k + 1 < len(chunks):
          pending = pool.submit(gen.prepare, chunks[k + 1])
        answers = gen.run(prepared)
        for s, a in zip(chunk, answers):
          line = {"id": s["id"], "prompt": _prompt_text(s), "prediction": a,
                  "references": s["references"]}
          f.write(json.dumps(line, ensure_ascii=False) + "\n")
          done[s["id"]] = line
        if writer:  # durable before the next batch: a crash loses at most one batch
          f.flush()
          os.fsync(f.fileno())
        generated += len(chunk)
        gen_seconds = time.perf_counter() - start
        bar.update(len(chunk))
        bar.set_postfix(samples_per_s=f"{generated / max(gen_seconds, 1e-9):.2f}")
    bar.close()
  if not writer:
    return {}

  predictions = {s["id"]: str(done[s["id"]]["prediction"]) for s in samples}
  metrics = dict(TASKS[config.task][1](samples, predictions, config))
  metrics["num_samples"] = len(samples)
  metrics["generated_this_run"] = generated
  if generated:
    metrics["samples_per_second"] = generated / max(gen_seconds, 1e-9)
  config_dict = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
  step = checkpoint_step(config.checkpoint)
  _atomic_write_json(os.path.join(workdir, METRICS_FILE),
                     {"task": config.task, "checkpoint": resolved_checkpoint(config.checkpoint),
                      "checkpoint_step": step, "metrics": metrics, "config": config_dict})
  write_tensorboard(workdir, metrics, step=step or 0)  # the training step, to line up curves
  n = int(_cfg_get(config, "report_samples", 0))
  if n:
    write_report(os.path.join(workdir, REPORT_FILE), f"{config.task}: {config.checkpoint}",
                 metrics, report_cards(config.task, samples, predictions, n))
  return metrics


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


def report_cards(task: str, samples: Sequence[Mapping], predictions: Mapping,
                 n: int) -> list[dict]:
  """`n` samples spread evenly over the set (every task kind of the demo is represented)."""
  idx = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(n, len(samples)))})
  cards = []
  for i in idx:
    s = samples[i]
    pred = predictions[s["id"]]
    card = {"id": s["id"], "image": _report_image(s.get("image")), "prompt": _prompt_text(s),
            "prediction": pred, "references": s["references"],
            "correct": _sample_correct(task, s, pred)}
    if _is_grounding(task, s):
      card["pred_boxes"] = parse_boxes(pred)
      card["gt_boxes"] = parse_boxes(s["references"][0]) if s["references"] else None
    cards.append(card)
  return cards
