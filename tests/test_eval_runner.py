"""End-to-end evaluation (eval.py / cogvlm_jax.eval.tasks) of a tiny random checkpoint.

A module fixture builds, once: tiny demo data (4 held-out scenes + the demo tokenizer), a
random tiny CogVLM saved as a Hugging Face folder (with the tokenizer), and a few-sample file
of every supported format (Karpathy / COCO captions, VQAv2 q+a, TextVQA, RefCOCO JSON, POPE
JSON lines) pointing at the demo images. Tests run on the 8 simulated CPU devices of
conftest.py, with the default (fsdp = all devices) mesh, so batches must be multiples of 8.
"""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest
from PIL import Image

from cogvlm_jax import metric_writers
from cogvlm_jax.data.examples import smallest_bucket
from cogvlm_jax.eval import demo as demo_task
from cogvlm_jax.eval import evaluator, generator, outputs, settings, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from flax import nnx

  from cogvlm_jax.checkpoint import save_params
  from cogvlm_jax.config import CogVLMConfig
  from cogvlm_jax.convert.hf import state_to_hf
  from cogvlm_jax.convert.safetensors_io import write_safetensors
  from cogvlm_jax.data.demo import DemoSpec, ensure_demo_data, load_records
  from cogvlm_jax.pretrained import create_model
  from configs.demo import get_config as demo_train_config

  root = tmp_path_factory.mktemp("eval")
  demo = ensure_demo_data(str(root / "demo"), DemoSpec(num_train_scenes=1, num_eval_scenes=4),
                          verbose=False)
  cfg = CogVLMConfig.from_dict(demo_train_config().model)
  ckpt = root / "ckpt"
  ckpt.mkdir()
  _write_json(ckpt / "config.json", cfg.to_hf_dict(torch_dtype="float32"))
  state = nnx.state(create_model(cfg, seed=0))
  write_safetensors(str(ckpt / "model.safetensors"), state_to_hf(cfg, state))
  # The same weights in cogvlm_jax format (as `convert to-jax` writes them), placed where a
  # training run keeps its steps: <workdir>/checkpoints/<step>.
  save_params(str(root / "run" / "checkpoints" / "7"), state, cfg)
  shutil.copy(os.path.join(demo, "tokenizer.model"), ckpt / "tokenizer.model")

  # Images: the demo's held-out renders, saved under the names each format expects.
  images = root / "images"
  images.mkdir()
  src = [os.path.join(demo, r["image"]) for r in load_records(demo, "eval")[::4]]

  def image(name, k):
    Image.open(src[k % len(src)]).convert("RGB").save(images / name)
    return name

  files = {}
  files["karpathy"] = _write_json(root / "dataset_coco.json", {"images": [
      {"filepath": "", "filename": image(f"k{i}.jpg", i), "cocoid": 100 + i, "imgid": i,
       "split": "test" if i < 3 else "train",
       "sentences": [{"raw": "a red circle"}, {"raw": f"a blue square number {i}"}]}
      for i in range(4)]})
  files["coco"] = _write_json(root / "captions.json", {  # NoCaps-style: with domains
      "images": [{"id": 7 + i, "file_name": image(f"c{i}.jpg", i),
                  "domain": "in-domain" if i else "out-domain"} for i in range(3)],
      "annotations": [{"image_id": 7 + i, "id": j, "caption": c} for i in range(3)
                      for j, c in enumerate(["a green triangle", "two shapes"])]})
  files["vqav2_q"] = _write_json(root / "questions.json", {"data_subtype": "val2014", "questions": [
      {"question_id": 420 + i, "image_id": 42 + i, "question": f"What color is shape {i}?"}
      for i in range(3)]})
  for i in range(3):
    image(f"COCO_val2014_{42 + i:012d}.jpg", i)
  files["vqav2_a"] = _write_json(root / "annotations.json", {"annotations": [
      {"question_id": 420 + i, "answer_type": "other", "multiple_choice_answer": "red",
       "answers": [{"answer": "red", "answer_id": k} for k in range(10)]} for i in range(3)]})
  files["textvqa"] = _write_json(root / "textvqa.json", {"data": [
      {"question_id": 9 + i, "image_id": image(f"t{i}.jpg", i)[:-4], "question": "What is written?",
       "answers": ["stop"] * 10} for i in range(3)]})
  files["refcoco"] = _write_json(root / "refcoco.json", [
      {"image": image(f"r{i}.jpg", i), "sentences": ["the red circle", "left shape"],
       "bbox": [4, 8, 20, 24], "width": 64, "height": 64, "split": "val", "id": i}
      for i in range(2)] + [{"image": "r0.jpg", "sentences": ["x"], "bbox": [0, 0, 1, 1],
                             "width": 64, "height": 64, "split": "train", "id": 9}])
  pope = root / "pope.jsonl"
  pope.write_text("".join(json.dumps({"question_id": i, "image": image(f"p{i}.jpg", i),
                                      "text": "Is there a circle in the image?",
                                      "label": "yes" if i % 2 else "no"}) + "\n"
                          for i in range(5)))
  files["pope"] = str(pope)
  return {"root": root, "demo": demo, "ckpt": str(ckpt), "run": str(root / "run"),
          "images": str(images),
          "files": files}


def make_config(env, task, **over):
  """A config like configs/eval/<task>.py, pointed at the fixture's files, small and fast."""
  import importlib
  module = {"caption": "coco_caption", "vqa": "vqav2", "refcoco": "refcoco", "pope": "pope",
            "demo": "demo"}[task]
  c = importlib.import_module(f"configs.eval.{module}").get_config()
  c.checkpoint = env["ckpt"]
  c.dtype = "float32"
  c.batch_size = 8
  c.max_new_tokens = 4
  c.length_buckets = (48, 64, 80)  # the demo model's image span is 38 tokens
  c.report_samples = 4
  c.caption_meteor = False  # METEOR's JVM takes 10-45 s; test_eval_metrics runs it once
  if "image_root" in c.data:
    c.data.image_root = env["images"]
  data = over.pop("data", {})
  for k, v in over.items():
    setattr(c, k, v) if k in c else c.__setitem__(k, v)
  with c.data.ignore_type():
    for k, v in data.items():
      c.data[k] = v
  return c


def _lines(workdir):
  with open(os.path.join(workdir, outputs.PREDICTIONS_FILE)) as f:
    return [json.loads(line) for line in f]


def _load_samples(config):
  """The samples of config.task, as the evaluator loads them."""
  config = settings.resolve(config)
  module = sys.modules[tasks.TASKS[config.task].__module__]
  return evaluator.load_samples(module.TASK, config)


CASES = {
    "caption_karpathy": ("caption", lambda f: {"annotations": f["karpathy"], "format": "auto"},
                         3, ("CIDEr", "BLEU-4", "ROUGE-L")),
    "caption_coco": ("caption", lambda f: {"annotations": f["coco"], "format": "coco"},
                     3, ("CIDEr", "BLEU-4", "ROUGE-L", "per_domain")),
    "vqav2": ("vqa", lambda f: {"questions": f["vqav2_q"], "annotations": f["vqav2_a"]},
              3, ("accuracy", "per_answer_type")),
    "textvqa": ("vqa", lambda f: {"questions": f["textvqa"], "format": "textvqa"},
                3, ("accuracy",)),
    "refcoco": ("refcoco", lambda f: {"annotations": f["refcoco"], "split": "val"},
                4, ("accuracy", "unparseable", "mean_iou")),
    "pope": ("pope", lambda f: {"questions": f["pope"]},
             5, ("accuracy", "precision", "recall", "f1", "yes_ratio")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_end_to_end(env, tmp_path, case):
  task, data, n, keys = CASES[case]
  config = make_config(env, task, data=data(env["files"]))
  metrics = tasks.run_eval(config, str(tmp_path), progress=False)
  for k in keys:
    assert k in metrics, (k, metrics)
  if "per_domain" in keys:
    assert sorted(metrics["per_domain"]) == ["in-domain", "out-domain"]
    assert metrics["per_domain"]["in-domain"]["n"] == 2
  assert metrics["n"] == n and metrics["num_samples"] == n and metrics["generated_this_run"] == n
  with open(tmp_path / "metrics.json") as f:
    saved = json.load(f)
  assert saved["task"] == task and saved["metrics"]["num_samples"] == n
  lines = _lines(tmp_path)
  assert len(lines) == n and len({l["id"] for l in lines}) == n
  for line in lines:
    assert set(line) == {"id", "prompt", "prediction", "references"}
    assert isinstance(line["prediction"], str) and line["references"]
  page = (tmp_path / "report.html").read_text()
  assert page.count("data:image/jpeg;base64,") == min(4, n)
  assert "<table class=\"metrics\">" in page
  assert os.listdir(tmp_path / "tensorboard")


def test_prompts_follow_the_task_templates(env, tmp_path):
  """Caption: base template, empty query; VQA: 'Short answer:'; POPE: chat ('Answer:')."""
  samples = _load_samples(make_config(env, "caption", data={
      "annotations": env["files"]["karpathy"]}))
  assert [s["query"] for s in samples] == ["", "", ""] and samples[0]["template"] == "base"
  assert samples[0]["references"] == ["a red circle", "a blue square number 0"]
  vqa = _load_samples(make_config(env, "vqa", data={
      "questions": env["files"]["vqav2_q"], "annotations": env["files"]["vqav2_a"]}))
  assert evaluator.prompt_text(vqa[0]) == "Question: What color is shape 0? Short answer:"
  assert os.path.exists(vqa[0]["image"]) and vqa[0]["references"] == ["red"] * 10
  pope = _load_samples(make_config(env, "pope", data={"questions": env["files"]["pope"]}))
  assert evaluator.prompt_text(pope[0]) == "Question: Is there a circle in the image? Answer:"
  ref = _load_samples(make_config(env, "refcoco", data={
      "annotations": env["files"]["refcoco"]}))
  assert ref[0]["references"] == ["[[062,125,375,500]]"]  # bbox 4,8,20,24 of 64x64


def test_demo_task_matches_training_templates_and_scores_all_kinds(env, tmp_path, monkeypatch):
  from cogvlm_jax.data.demo import load_records
  config = make_config(env, "demo", data={"dir": env["demo"]})
  config.tokenizer = ""  # found in the checkpoint folder
  samples = _load_samples(config)
  records = load_records(env["demo"], "eval")
  assert [(s["query"], s["template"], s["references"]) for s in samples] == [
      (r["query"], r["template"], [r["answer"]]) for r in records]
  # The official VQA tool compares a unanimous answer as written: the demo's answers must be
  # what the model is trained to emit, stripped lower-case words.
  answers = [s["references"][0] for s in samples if s["task"] == "vqa"]
  assert answers and all(a == a.strip().lower() and a.isalpha() for a in answers)
  # Perfect answers score 100 on every kind; a capitalised answer scores 0 (unanimity rule).
  perfect = {s["id"]: s["references"][0] for s in samples}
  scores = demo_task.score(samples, perfect, settings.resolve(config))
  assert scores["vqa"]["accuracy"] == 100.0 and scores["grounding"]["accuracy"] == 100.0
  assert scores["caption"]["exact_match"] == 100.0 and scores["caption"]["CIDEr"] > 0
  assert set(scores["vqa"]["per_question_type"]) <= {"color", "shape", "count"}
  shouted = {k: v.capitalize() for k, v in perfect.items()}
  assert demo_task.score(samples, shouted, settings.resolve(config))["vqa"]["accuracy"] == 0.0
  metrics = tasks.run_eval(config, str(tmp_path), progress=False)
  assert set(metrics) >= {"caption", "vqa", "grounding", "num_samples"}
  assert metrics["num_samples"] == len(records) == 16
  page = (tmp_path / "report.html").read_text()
  assert "data:image/jpeg;base64," in page


def test_workdir_checkpoint_gives_the_same_predictions(env, tmp_path):
  """A cogvlm_jax checkpoint in a run's workdir (no tokenizer inside: config.tokenizer names
  it) predicts exactly what the HF folder of the same weights predicts."""
  data = {"questions": env["files"]["vqav2_q"], "annotations": env["files"]["vqav2_a"]}
  tasks.run_eval(make_config(env, "vqa", data=data), str(tmp_path / "hf"), progress=False)
  config = make_config(env, "vqa", data=data, checkpoint=env["run"])
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    tasks.run_eval(config, str(tmp_path / "jax"), progress=False)
  config.tokenizer = env["ckpt"]
  tasks.run_eval(config, str(tmp_path / "jax"), progress=False)
  assert _lines(tmp_path / "jax") == _lines(tmp_path / "hf")
  with open(tmp_path / "jax" / "metrics.json") as f:
    saved = json.load(f)
  assert saved["checkpoint_step"] == 7 and saved["checkpoint"].endswith("checkpoints/7")


def _spy(monkeypatch):
  """Records (input_ids shape, images shape) of every generate call of the evaluator."""
  calls = []
  real = generator.generate_batch

  def spy(model, batch, **kw):
    calls.append((batch["input_ids"].shape, tuple(batch["images"].shape)))
    return real(model, batch, **kw)

  monkeypatch.setattr(generator, "generate_batch", spy)
  return calls


def test_resume_generates_only_the_missing_samples(env, tmp_path, monkeypatch):
  config = make_config(env, "demo", data={"dir": env["demo"]})
  first = tasks.run_eval(config, str(tmp_path), progress=False)
  lines = _lines(tmp_path)
  assert first["generated_this_run"] == 16 and len(lines) == 16
  # Keep one full line plus a line cut short by a "crash".
  path = tmp_path / outputs.PREDICTIONS_FILE
  path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1])[:20])
  calls = _spy(monkeypatch)
  second = tasks.run_eval(config, str(tmp_path), progress=False)
  assert second["generated_this_run"] == 15
  assert len(calls) == 2  # 15 samples in batches of 8 (the last one padded)
  resumed = _lines(tmp_path)
  assert len(resumed) == 16 and sorted(l["id"] for l in resumed) == sorted(l["id"] for l in lines)
  assert resumed[0] == lines[0]
  # A third run has nothing to generate and does not even load the model.
  monkeypatch.setattr(evaluator, "load_model", lambda c: pytest.fail("model loaded"))
  third = tasks.run_eval(config, str(tmp_path), progress=False)
  assert third["generated_this_run"] == 0 and len(calls) == 2
  assert third["vqa"] == second["vqa"]
  # Resuming with another checkpoint or prompt would mix two runs: refused.
  with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
    tasks.run_eval(make_config(env, "demo", data={"dir": env["demo"]}, max_new_tokens=5),
                    str(tmp_path), progress=False)


def test_static_shapes_one_compile_per_bucket(env, tmp_path, monkeypatch):
  gen_module = sys.modules["cogvlm_jax.generate"]
  calls = _spy(monkeypatch)
  # Demo prompts: caption = BOS + 38 image-span tokens (39) -> bucket 40; VQA / grounding
  # prompts are longer -> bucket 64. 16 samples in file order, batches of 8.
  config = make_config(env, "demo", data={"dir": env["demo"]}, length_buckets=(40, 64))
  before = gen_module._generate._cache_size()
  tasks.run_eval(config, str(tmp_path), progress=False)
  assert len(calls) == 2
  assert all(s[0][0] == 8 and s[0][1] in (40, 64) and s[1][0] == 8 for s in calls)
  # Same shapes again (another workdir): no new compilation.
  compiled = gen_module._generate._cache_size() - before
  assert compiled <= len(set(calls))
  tasks.run_eval(config, str(tmp_path / "again"), progress=False)
  assert gen_module._generate._cache_size() - before == compiled
  # Captions alone fit the 40 bucket; a batch of 3 is padded to the full 8 rows.
  config = make_config(env, "caption", data={"annotations": env["files"]["karpathy"]},
                       length_buckets=(40, 64))
  tasks.run_eval(config, str(tmp_path / "caption"), progress=False)
  assert calls[-1][0] == (8, 40)


def test_stop_tokens(env):
  """Answers end at eos or at a named stop token the vocabulary has; unknown names are skipped."""
  from cogvlm_jax.pretrained import from_pretrained
  from cogvlm_jax.tokenization import load_tokenizer
  tok = load_tokenizer(env["ckpt"])
  model = from_pretrained(env["ckpt"])
  gen = generator.Generator(model, tok, batch_size=8, length_buckets=(32,), max_new_tokens=2,
                         stop_tokens=("<|eot_id|>", "red"))
  assert gen.stop == [2, tok.token_to_id("red")]


def test_tensorboard_is_optional(tmp_path, monkeypatch, caplog):
  metrics = {"accuracy": 50.0, "per_answer_type": {"yes/no": 1}, "tokenizer": "ptb"}
  assert metric_writers.scalars(metrics) == {"accuracy": 50.0, "per_answer_type/yes/no": 1.0}
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  assert outputs.write_tensorboard(str(tmp_path), metrics) is False
  assert "tensorboardX is not installed" in caplog.text and not os.listdir(tmp_path)


def test_tensorboard_skipped_for_a_scheme_without_a_writer_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(metric_writers, "tensorboard_supports", lambda folder: False)
  assert outputs.write_tensorboard(str(tmp_path), {"accuracy": 50.0}) is False
  assert not os.listdir(tmp_path)


def test_config_errors(env, tmp_path):
  config = make_config(env, "pope", data={"questions": env["files"]["pope"]}, batch_size=6)
  with pytest.raises(ValueError, match="data-parallel"):
    tasks.run_eval(config, str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="length bucket"):
    smallest_bucket(70, (32, 64))
  assert smallest_bucket(32, (64, 32)) == 32
  with pytest.raises(ValueError, match="unknown task"):
    _load_samples(ml_collections.ConfigDict({"task": "nope"}))


def test_eval_py_cli(env, tmp_path):
  """The script itself: flags, config file overrides, outputs, exit code."""
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(ROOT, "eval.py"),
         "--config", os.path.join(ROOT, "configs/eval/pope.py"),
         f"--config.checkpoint={env['ckpt']}", f"--config.data.questions={env['files']['pope']}",
         f"--config.data.image_root={env['images']}", "--config.dtype=float32",
         "--config.max_new_tokens=3", "--config.length_buckets=(64,)",
         "--config.report_samples=2", f"--workdir={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["num_samples"] == 5
  assert "sample/s" in proc.stderr  # the progress bar
  assert len(_lines(out)) == 5 and (out / "report.html").exists()
  # A configuration error is one line on stderr and exit status 2, not a traceback.
  bad = subprocess.run(cmd[:-1] + [f"--workdir={tmp_path / 'bad'}", "--config.batch_size=3",
                                   "--config.mesh.data=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert bad.returncode == 2 and "error: config.mesh" in bad.stderr, bad.stderr[-2000:]


def test_only_process_0_writes(env, tmp_path, monkeypatch):
  """Another process of a multi-host run generates but writes nothing and returns {}."""
  import jax
  monkeypatch.setattr(jax, "process_index", lambda *a: 1)
  calls = _spy(monkeypatch)
  config = make_config(env, "demo", data={"dir": env["demo"]})
  workdir = tmp_path / "run"
  assert tasks.run_eval(config, str(workdir), progress=False) == {}
  assert calls and not workdir.exists()


def test_demo_baselines_are_the_majority_and_constant_answers(env):
  """Each baseline always gives the most common training answer (VQA: of the question's
  type), the most common training caption, or the mean training box; scored like the model."""
  from cogvlm_jax.data.demo import load_records
  train = [{"task": "vqa", "question_type": "color", "answer": a} for a in ("red", "blue", "red")]
  train += [{"task": "vqa", "question_type": "count", "answer": "two"},
            {"task": "caption", "answer": "a red circle"},
            {"task": "caption", "answer": "a blue square"},
            {"task": "caption", "answer": "a blue square"},
            {"task": "grounding", "answer": "[[000,000,400,400]]"},
            {"task": "grounding", "answer": "[[200,200,600,800]]"}]
  assert demo_task.baseline_answers(train) == {
      "caption": "a blue square", "vqa": {"color": "red", "count": "two"},
      "grounding": "[[100,100,500,600]]"}
  # On the fixture: the VQA baseline's accuracy is the share of held-out questions whose
  # answer is the majority training answer of their type, counted here directly.
  config = settings.resolve(make_config(env, "demo", data={"dir": env["demo"]}))
  samples = _load_samples(config)
  majority = demo_task.baseline_answers(load_records(env["demo"], "train"))["vqa"]
  vqa = [s for s in samples if s["task"] == "vqa"]
  want = 100.0 * sum(majority.get(s["question_type"]) == s["references"][0] for s in vqa) / len(vqa)
  perfect = {s["id"]: s["references"][0] for s in samples}
  scores = demo_task.score(samples, perfect, config)
  assert scores["baseline"]["vqa"]["accuracy"] == pytest.approx(want)
  assert scores["baseline"]["grounding"]["n"] == scores["grounding"]["n"] == 4
  table = demo_task.format_table(scores)
  assert table.splitlines()[0].split() == ["task", "metric", "model", "baseline"]
  vqa_row = next(l for l in table.splitlines() if l.split()[:2] == ["vqa", "accuracy"])
  assert vqa_row.split()[2:] == ["100.00", f"{want:.2f}"]
  assert any(l.split()[:2] == ["grounding", "accuracy"] for l in table.splitlines())
  assert any(l.split()[:2] == ["caption", "CIDEr"] for l in table.splitlines())


def test_demo_run_with_a_model_passed_in_equals_eval_py(env, tmp_path):
  """train.py's end-of-run call: demo.run with the in-memory model (no checkpoint to load)
  gives the metrics that evaluating the saved checkpoint gives."""
  from cogvlm_jax.pretrained import from_pretrained
  from cogvlm_jax.tokenization import load_tokenizer
  from configs.eval.demo import get_config
  config = get_config()
  config.data.dir = env["demo"]
  config.batch_size, config.max_new_tokens, config.length_buckets = 8, 4, (48, 64, 80)
  config.report_samples = 0
  model, tok = from_pretrained(env["ckpt"]), load_tokenizer(env["ckpt"])
  passed = demo_task.run(config, str(tmp_path / "mem"), model=model, tokenizer=tok,
                         progress=False)
  config.checkpoint = env["ckpt"]
  config.dtype = "float32"
  loaded = tasks.run_eval(config, str(tmp_path / "ckpt"), progress=False)
  drop = ("samples_per_second",)
  assert {k: v for k, v in passed.items() if k not in drop} == \
      {k: v for k, v in loaded.items() if k not in drop}
  assert _lines(tmp_path / "mem") == _lines(tmp_path / "ckpt")


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "config.batch_size must be an integer >= 1"),
    ("max_new_tokens", -1, "config.max_new_tokens"),
    ("length_buckets", (32, 0), "config.length_buckets"),
    ("iou_threshold", 0.0, "config.iou_threshold"),
    ("iou_threshold", 1.5, "config.iou_threshold"),
    ("vqa_mode", "vqa_api", "config.vqa_mode"),
    ("caption_meteor", 1, "config.caption_meteor must be True or False"),
    ("template", "", "config.template"),
    ("max_sampels", 3, "unknown eval setting config.max_sampels"),
])
def test_config_is_checked_once_with_the_field_named(field, value, match):
  config = {"task": "vqa", field: value}
  with pytest.raises(settings.EvalConfigError, match=match):
    settings.resolve(config)


def test_data_fields_are_checked():
  with pytest.raises(settings.EvalConfigError, match="config.data.format"):
    settings.resolve({"task": "caption", "data": {"format": "json"}})
  with pytest.raises(settings.EvalConfigError, match="config.data.max_examples_per_task"):
    settings.resolve({"task": "demo", "data": {"max_examples_per_task": -1}})
  with pytest.raises(settings.EvalConfigError, match="unknown eval setting config.data.dir"):
    settings.resolve({"task": "vqa", "data": {"dir": "x"}})


def test_plain_dicts_get_the_base_defaults():
  """A dict with just the task equals that task's config file: defaults live in one place."""
  from configs.eval import _base, pope, refcoco
  assert settings.resolve({"task": "refcoco"}) == settings.resolve(refcoco.get_config())
  got = settings.resolve({"task": "pope", "data": {"questions": "q.jsonl"}})
  assert got.data.questions == "q.jsonl" and got.data.image_root == ""
  assert got.template == pope.get_config().template == "chat"
  assert settings.resolve(got) == got  # idempotent
  assert sorted(tasks.TASKS) == sorted(_base.TASK_DEFAULTS)


@pytest.mark.slow
def test_cogagent_runs_the_tasks(env, tmp_path):
  """A tiny random CogAgent on the files of every task and the demo: each sample's one image
  at both sizes (224-style ViT and the cross tower), CogAgent's templates in the prompts."""
  from flax import nnx

  from cogvlm_jax.config import CogVLMConfig
  from cogvlm_jax.modeling.cogagent import CogAgentForCausalLM
  from cogvlm_jax.tokenization import load_tokenizer
  from configs.demo import get_config as demo_train_config

  d = demo_train_config().model.to_dict()
  d.update(variant="cogagent", cross_vision=dict(layers=2, width=32, head_width=8, patch_size=4,
                                                 image_size=24, compute_hidden_size=32))
  cfg = CogVLMConfig.from_dict(d)
  model = CogAgentForCausalLM(cfg, rngs=nnx.Rngs(0))
  tok = load_tokenizer(env["ckpt"])
  runs = [("caption", CASES["caption_karpathy"][1](env["files"]), 3),
          ("vqa", CASES["vqav2"][1](env["files"]), 3),
          ("refcoco", CASES["refcoco"][1](env["files"]), 4),
          ("pope", CASES["pope"][1](env["files"]), 5),
          ("demo", {"dir": env["demo"]}, None)]
  for task, data, n in runs:
    config = make_config(env, task, data=data, length_buckets=(64, 80))
    metrics = tasks.run_eval(config, str(tmp_path / task), model=model, tokenizer=tok,
                             progress=False)
    lines = _lines(tmp_path / task)
    assert metrics["num_samples"] == len(lines) == (n or len(lines)) > 0
    if task == "vqa":
      assert lines[0]["prompt"] == "<EOI>Question: What color is shape 0? Short answer:"
    if task == "pope":
      assert lines[0]["prompt"] == " [INST] Is there a circle in the image? [/INST] "
