"""GUI / grounding data for CogAgent: the screenshot source and its mixture kind, training rows,
the recipe config, and the `gui` eval task with boxes drawn in the report. The screenshots are
drawn here (PIL rectangles as buttons with text labels); nothing is downloaded."""

import base64
import io
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw

from cogvlm_jax.boxes import format_box, parse_boxes
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.bad_samples import REASONS
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.data.mixture import MixtureError, build_mixture, check_spec
from cogvlm_jax.data.sources.gui import GROUNDING_QUERY, GuiSource
from cogvlm_jax.eval.report import write_report
from cogvlm_jax.eval.tasks import run_eval
from cogvlm_jax.modeling.cogagent import CogAgentForCausalLM
from cogvlm_jax.tokenization import load_tokenizer
from cogvlm_jax.training import run_config
from cogvlm_jax.training.state import build_setup
from tests.helpers import tiny_demo_cogagent

# Buttons of a 120 x 80 screenshot: (label, pixel [x0, y0, x1, y1]).
BUTTONS = [("OK", [8, 50, 48, 70]), ("Cancel", [64, 50, 112, 70]), ("Search", [8, 8, 112, 28])]


def _screenshot(path, buttons=BUTTONS, size=(120, 80)):
  """A light window with each button drawn as an outlined grey rectangle and its label."""
  im = Image.new("RGB", size, (236, 238, 242))
  draw = ImageDraw.Draw(im)
  for label, (x0, y0, x1, y1) in buttons:
    draw.rectangle([x0, y0, x1, y1], fill=(200, 204, 210), outline=(40, 40, 40))
    draw.text((x0 + 3, y0 + 4), label, fill=(0, 0, 0))
  im.save(path)
  return path


def _elements(buttons=BUTTONS):
  return [{"text": t, "box": b} for t, b in buttons]


@pytest.fixture()
def gui_data(tmp_path):
  """(json path, image folder) of three screenshots: generated turns, a conversation with
  <box:N>, a box outside its screenshot; plus two malformed entries."""
  shots = tmp_path / "shots"
  shots.mkdir()
  for name in ("a.png", "b.png", "c.png"):
    _screenshot(shots / name)
  entries = [
      {"id": "a", "image": "a.png", "elements": _elements()},
      {"id": "b", "image": "b.png", "elements": _elements()[:2], "conversations": [
          {"from": "human", "value": "<image>\nHow do I close it?"},
          {"from": "gpt", "value": "Click Cancel <box:1>."}]},
      {"id": "c", "image": "c.png", "elements": [{"text": "Gone", "box": [200, 5, 260, 20]}]},
      {"id": "bad-ref", "image": "a.png", "elements": _elements()[:1], "conversations": [
          {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "<box:3>"}]},
      {"id": "bad-box", "image": "a.png", "elements": [{"text": "x", "box": [1, 2, 3]}]},
  ]
  path = tmp_path / "gui.json"
  path.write_text(json.dumps(entries))
  return str(path), str(shots)


def _rel(box, size=(120, 80)):
  return (box[0] / size[0], box[1] / size[1], box[2] / size[0], box[3] / size[1])


def test_gui_source_turns_and_box_text(gui_data):
  source = GuiSource(*gui_data, task="both")
  assert len(source) == 3 and source.stats["malformed"] == 2
  a = source[0]
  assert len(a["turns"]) == 2 * len(BUTTONS) and a["error"] is None
  q0, a0 = a["turns"][0]
  assert q0 == GROUNDING_QUERY.format(text="OK") and a0 == format_box(_rel(BUTTONS[0][1]))
  assert parse_boxes(a0)[0] == pytest.approx(_rel(BUTTONS[0][1]), abs=1e-3)
  q1, a1 = a["turns"][1]  # grounded OCR: the box in the question, the text as the answer
  assert q1 == f"What is the text in {a0}?" and a1 == "OK"
  b = source[1]
  assert b["turns"] == [("How do I close it?", f"Click Cancel {format_box(_rel(BUTTONS[1][1]))}.")]
  c = source[2]  # the box lies outside the 120 x 80 screenshot
  assert c["box_text"] is None and "no area inside" in c["error"]
  assert len(GuiSource(*gui_data, task="grounding")[0]["turns"]) == len(BUTTONS)


def test_gui_mixture_kind(gui_data):
  json_path, images = gui_data
  sources, weights = build_mixture({"gui": dict(kind="gui", json=json_path, images=images,
                                                task="ocr", weight=2.0)})
  assert len(sources[0]) == 3 and weights == [2.0]
  assert sources[0][0]["turns"][0][1] == "OK"
  with pytest.raises(MixtureError, match=r"data\.mixture\.g\.task must be one of"):
    check_spec("g", dict(kind="gui", json="x", images="y", task="caption"))
  with pytest.raises(MixtureError, match=r"data\.mixture\.g \(kind 'gui'\) needs \['json'\]"):
    check_spec("g", dict(kind="gui", images="y"))


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / demo.TOKENIZER_FILE)
  demo.train_tokenizer(demo.tokenizer_corpus(0, num_scenes=300), path)
  return ExampleBuilder(load_tokenizer(path), CogVLMConfig.from_dict(tiny_demo_cogagent()), 400)


def test_gui_rows_train_on_the_boxes(gui_data, builder):
  source = GuiSource(*gui_data, task="grounding")
  row = builder(source[0])
  tok = builder.tokenizer
  assert row["image_valid"] and not row["bad_sample"] and row["cross_images"].shape == (24, 24, 3)
  answers = row["input_ids"][row["loss_mask"] == 1]
  want = sum((tok.encode(format_box(_rel(b))) for _, b in BUTTONS), [])
  assert list(answers) == want + [tok.eos_token_id]  # every box is trained on, then the EOS
  # The first turn is exactly the prompt the `gui` eval task asks.
  prompt = builder.prompt({"query": GROUNDING_QUERY.format(text="OK"), "template": "chat",
                           "image": f"{gui_data[1]}/a.png"})
  n = len(prompt["input_ids"])
  np.testing.assert_array_equal(row["input_ids"][:n], prompt["input_ids"])
  bad = builder(source[2])
  assert bad["bad_sample"] and REASONS[bad["bad_reason"] - 1] == "box_invalid"


def test_gui_recipe_config_is_real_size_and_refuses_unset_paths():
  from configs.cogagent_gui_sft import get_config
  config = get_config()
  model_cfg = CogVLMConfig.from_dict(config.model)
  assert config.recipe == "cogagent" and model_cfg.is_cogagent
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
  with pytest.raises(run_config.ConfigError, match=r"data\.mixture\.gui \(kind 'gui'\) needs"):
    run_config.validate_config(config, model_cfg, mesh)
  for spec in config.data.mixture.values():
    spec.update({f: f"/data/{f}" for f in ("json", "images") if f in spec})
  run_config.validate_config(config, model_cfg, mesh)
  setup = build_setup(model_cfg, config.recipe, config.optim, config.train.steps, mesh,
                      frozen_dtype=config.train.frozen_dtype)
  trainable, total = setup.num_params()
  assert total == 18_291_033_280  # the spec's count (unused tower block, norm, head included)
  # Visual experts (~6.4B) + the cross module (~0.65B); the LM and the ViTs' 11B are frozen.
  assert 6.5e9 < trainable < 7.5e9, trainable


def test_report_draws_predicted_and_true_boxes_on_a_screenshot(tmp_path):
  shot = _screenshot(tmp_path / "shot.png")
  gt, pred = format_box(_rel(BUTTONS[0][1])), format_box(_rel(BUTTONS[1][1]))
  path = write_report(tmp_path / "report.html", "gui", {"accuracy": 0.0},
                      [{"image": str(shot), "prompt": "p", "prediction": pred,
                        "references": [gt], "pred_boxes": parse_boxes(pred),
                        "gt_boxes": parse_boxes(gt)}])
  page = open(path).read()
  uri = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
  thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")).astype(int)
  scale = thumb.shape[1] / 120

  def color_at(x, y):
    return thumb[int(y * scale), int(x * scale)]

  red, green = np.array([255, 0, 0]), np.array([0, 255, 0])
  assert np.abs(color_at(8, 60) - green).max() < 60  # left edge of the true box (OK)
  assert np.abs(color_at(64, 60) - red).max() < 60  # left edge of the predicted box (Cancel)
  assert "predicted box" in page


@pytest.mark.slow
def test_gui_eval_task_runs_a_cogagent(gui_data, builder, tmp_path):
  json_path, images = gui_data
  entries = json.loads(open(json_path).read())[:2]  # the two with boxes inside
  ann = tmp_path / "test.json"
  ann.write_text(json.dumps(entries))
  model = CogAgentForCausalLM(builder.model_config, rngs=nnx.Rngs(0))
  config = {"task": "gui", "checkpoint": "tiny", "dtype": "", "batch_size": 4,
            "max_new_tokens": 4, "data": {"annotations": str(ann), "image_root": images}}
  metrics = run_eval(config, str(tmp_path / "out"), model=model, tokenizer=builder.tokenizer,
                     progress=False)
  assert metrics["num_samples"] == len(BUTTONS) + 2 and metrics["n"] == len(BUTTONS) + 2
  lines = [json.loads(l) for l in open(tmp_path / "out" / "predictions.jsonl")]
  assert lines[0]["prompt"] == f' [INST] {GROUNDING_QUERY.format(text="OK")} [/INST] '
  assert lines[0]["references"] == [format_box(_rel(BUTTONS[0][1]))]
  page = open(tmp_path / "out" / "report.html").read()
  assert page.count("data:image/jpeg;base64,") == len(lines) and "true box" in page


@pytest.mark.parametrize("kind", ["truncated", "bomb"])
def test_gui_eval_names_an_unreadable_or_oversized_screenshot(tmp_path, monkeypatch, kind):
  from cogvlm_jax.eval import gui
  from cogvlm_jax.eval.settings import EvalConfigError

  path = tmp_path / "shot.png"
  if kind == "truncated":
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
  else:  # a decompression bomb: over twice Pillow's pixel limit
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
  with pytest.raises(EvalConfigError, match="screenshot .*shot.png"):
    gui._size(str(path))
