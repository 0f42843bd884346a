"""Grounding on GUI screenshots: where is the element with this text? Accuracy at IoU >= 0.5.

    python eval.py --config configs/eval/gui.py --config.checkpoint=CKPT \\
        --config.data.annotations=test.json --config.data.image_root=screenshots/

data.annotations is the screenshot JSON of `cogvlm_jax.data.sources.gui` (what the "gui"
training source reads): one sample per element, asked with the training source's
`GROUNDING_QUERY` (config.query_format, {text}) in config.template ("chat", CogAgent's), so
the question is the one the model was trained on. The reference is the element's box as
CogVLM box text; answers are parsed and scored as RefCOCO's (`refcoco.rec_accuracy`), and the
report draws the predicted and true boxes on each screenshot.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from PIL import Image

from cogvlm_jax.boxes import format_box
from cogvlm_jax.data.sources.gui import parse_elements, relative_box
from cogvlm_jax.data.sources.llava import _load_entries
from cogvlm_jax.eval import refcoco
from cogvlm_jax.eval.evaluator import Task, evaluate, image_path
from cogvlm_jax.eval.settings import EvalConfigError


def _size(path: str) -> tuple[int, int]:
  """(width, height) from the image header; EvalConfigError naming an unreadable file."""
  try:
    with Image.open(path) as im:
      return im.size
  except (OSError, Image.DecompressionBombError) as e:  # the latter is no OSError
    raise EvalConfigError(f"screenshot {path}: {e}") from e


def load(config) -> list[dict]:
  """One sample per element of every screenshot: id "<entry id>:<element index>"."""
  d = config.data
  if not d.annotations:
    raise EvalConfigError("config.data.annotations is not set (the screenshot JSON)")
  samples = []
  for position, entry in enumerate(_load_entries(d.annotations)):
    elements, why = parse_elements(entry.get("elements") if isinstance(entry, dict) else None)
    if why or not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
      raise EvalConfigError(f"{d.annotations}: entry {position}: "
                            f"{why or 'no screenshot image path'}")
    path = image_path(d.image_root, entry["image"])
    width, height = _size(path)
    for i, (text, box) in enumerate(elements):
      try:
        rel = relative_box(box, width, height)
      except ValueError as e:
        raise EvalConfigError(f"{d.annotations}: entry {position} element {i}: {e}") from e
      samples.append({"id": f"{entry.get('id', position)}:{i}", "image": path,
                      "query": config.query_format.format(text=text),
                      "template": config.template, "references": [format_box(rel)],
                      "box": list(rel)})
  return samples


def score(samples: Sequence[Mapping], predictions: Mapping, config) -> dict:
  """RefCOCO's accuracy at config.iou_threshold against the unrounded true boxes."""
  return refcoco.score(samples, predictions, config)


TASK = Task("gui", load, score, refcoco.correct, is_grounding=lambda sample: True)


def run(config, workdir: str, *, model=None, tokenizer=None, mesh=None,
        progress: bool = True) -> dict:
  """Evaluates a checkpoint (or `model`) on a screenshot JSON; returns the metrics."""
  return evaluate(TASK, config, workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                  progress=progress)
