"""The demo's scenes: sampling, rendering, and the texts of a scene.

A scene is 1-2 non-overlapping coloured shapes (circle, square, triangle) on a plain
background. Its texts are a caption, two VQA pairs (a colour question and a shape or count
question) and a referring expression whose answer is the shape's box in CogVLM's grounding
format (`cogvlm_jax.boxes.format_box`: relative corners on the 000..999 grid, rounded).
Everything is drawn from the numpy Generator passed in, so a seed fixes the scenes and texts.

A record: {"id", "image" (path relative to the data folder), "task" (caption | vqa |
grounding), "template" (base | vqa | chat), "query", "answer", "question_type" (vqa only)}.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from cogvlm_jax.boxes import format_box

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
# The second question of a scene asks for a shape this often, else for the count: counting
# blobs is learned early, telling shapes apart needs the examples.
SHAPE_QUESTION_SHARE = 2 / 3
_SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges
# Layouts live on the model's patch grid: configs/demo.py sees 48 px images in 8 px patches, a
# 6 x 6 grid, and every shape covers whole patches (sides of MIN_SIZE..MAX_SIZE patches, no
# margin to the border or between shapes). Measured with a shape probe on the demo ViT: placed
# freely (a 20-step grid, so each shape met the patch grid at a random offset) shape accuracy
# was 0.49 after 400 steps, on half-patch steps 0.75, on whole patches 0.92. Aligned, each
# shape kind shows the ViT a few fixed patch patterns instead of every crop of its outline.
# Box corners then print as multiples of 1/6 (`format_box`: 000 167 333 500 667 833 999).
GRID = 6
MIN_SIZE, MAX_SIZE = 2, 3
EDGE, GAP = 0, 0


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str  # one of SHAPES
  color: str  # a key of COLORS
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1] image fractions


@dataclasses.dataclass(frozen=True)
class Scene:
  background: tuple[int, int, int]
  shapes: tuple[Shape, ...]  # sorted left to right by box centre


def _overlaps(a, b, margin: int) -> bool:
  """Whether grid boxes a and b (x0, y0, x1, y1 in steps) come closer than `margin` on both
  axes (integers: no rounding at the limit)."""
  return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1]
              or b[3] + margin <= a[1])


def sample_scene(rng: np.random.Generator, max_shapes: int = 2) -> Scene:
  """1..max_shapes non-overlapping shapes, each a different kind and a different colour."""
  n = int(rng.integers(1, max_shapes + 1))
  kinds = rng.choice(len(SHAPES), size=n, replace=False)
  colors = rng.choice(len(COLORS), size=n, replace=False)
  color_names = list(COLORS)
  for _ in range(1000):  # rejection sampling of the whole layout
    cells: list[tuple[int, int, int, int]] = []
    for _ in range(n):
      size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
      x0, y0 = (int(v) for v in rng.integers(EDGE, GRID - EDGE - size + 1, size=2))
      cell = (x0, y0, x0 + size, y0 + size)
      if any(_overlaps(cell, c, GAP) for c in cells):
        break
      cells.append(cell)
    if len(cells) == n:
      break
  else:  # pragma: no cover - a valid layout is found within a few tries
    raise RuntimeError("could not place the shapes without overlap")
  shapes = [Shape(SHAPES[kind], color_names[color], tuple(v / GRID for v in cell))
            for kind, color, cell in zip(kinds, colors, cells)]
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


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """Two (question_type, question, answer) triples: a colour question and one other."""
  target = scene.shapes[int(rng.integers(len(scene.shapes)))]
  pairs = [("color", f"What color is the {target.kind}?", target.color)]
  other = scene.shapes[int(rng.integers(len(scene.shapes)))]
  if rng.random() < SHAPE_QUESTION_SHARE:
    pairs.append(("shape", f"What shape is the {other.color} object?", other.kind))
  else:
    pairs.append(("count", "How many shapes are there?", COUNT_WORDS[len(scene.shapes)]))
  return pairs


def referring_expression(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """('Where is the red circle?', '[[x0,y0,x1,y1]]') for one shape of the scene."""
  s = scene.shapes[int(rng.integers(len(scene.shapes)))]
  return f"Where is the {s.color} {s.kind}?", format_box(s.box)


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
