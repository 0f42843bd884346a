"""The demo scenes (cogvlm_jax/data/demo/scenes.py): large, separate shapes the model can see,
and answers the official VQA evaluator compares as written (lower-case words)."""

import numpy as np

from cogvlm_jax.boxes import parse_boxes
from cogvlm_jax.data.demo import COLORS, SHAPES, render_scene, sample_scene, scene_records
from cogvlm_jax.data.demo import scenes


def _scenes(n=300, seed=0):
  rng = np.random.default_rng(seed)
  return [(s, scene_records(s, rng, str(i), "x.png"))
          for i, s in enumerate(sample_scene(rng) for _ in range(n))]


def test_shapes_cover_whole_patches_inside_and_apart():
  for scene, _ in _scenes():
    assert 1 <= len(scene.shapes) <= 2
    assert len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) \
        == len(scene.shapes)
    cells = [tuple(round(v * scenes.GRID) for v in s.box) for s in scene.shapes]
    for s, (x0, y0, x1, y1) in zip(scene.shapes, cells):
      assert np.allclose(s.box, np.array([x0, y0, x1, y1]) / scenes.GRID)  # on the grid
      assert scenes.MIN_SIZE <= x1 - x0 == y1 - y0 <= scenes.MAX_SIZE
      assert scenes.EDGE <= min(x0, y0) and max(x1, y1) <= scenes.GRID - scenes.EDGE
    if len(cells) == 2:
      assert not scenes._overlaps(cells[0], cells[1], scenes.GAP)


def test_answers_are_lower_case_words_and_shape_questions_dominate():
  words = set(COLORS) | set(SHAPES) | set(scenes.COUNT_WORDS.values())
  types = []
  for scene, recs in _scenes():
    for r in recs:
      if r["task"] == "vqa":
        assert r["answer"] in words and r["answer"] == r["answer"].lower()
        types.append(r["question_type"])
      elif r["task"] == "grounding":
        (box,) = parse_boxes(r["answer"])
        # 3 digits per corner: 1/6 prints as 167, and the right / bottom edge as 999.
        assert any(np.allclose(box, s.box, atol=1.01e-3) for s in scene.shapes)
        grid_steps = np.array(box) * scenes.GRID  # every corner on the patch grid
        assert np.allclose(grid_steps, np.round(grid_steps), atol=0.01), r["answer"]
  second = types[1::2]  # each scene: a colour question, then a shape or count question
  assert set(types[::2]) == {"color"}
  share = second.count("shape") / len(second)
  assert abs(share - scenes.SHAPE_QUESTION_SHARE) < 0.08, share


def test_render_draws_each_shape_in_its_colour():
  scene = scenes.Scene((255, 255, 255), (
      scenes.Shape("square", "red", (0.05, 0.05, 0.45, 0.45)),
      scenes.Shape("circle", "blue", (0.55, 0.55, 0.95, 0.95))))
  image = np.asarray(render_scene(scene, 48))
  assert image.shape == (48, 48, 3)

  def near(y, x, rgb):  # anti-aliased (LANCZOS) edges ring by a few levels
    return np.abs(image[y, x].astype(int) - rgb).max() <= 8

  assert near(12, 12, COLORS["red"]) and near(36, 36, COLORS["blue"])
  # A square fills its box's corner, a circle does not (box corners at 2.4 and 26.4 px).
  assert near(5, 5, COLORS["red"]) and near(28, 28, (255, 255, 255))
