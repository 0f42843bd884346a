"""Training on the demo data: data generation, loss masking, recipes, learning, resume.

Everything runs on CPU with a toy model (16px images, one layer each) and a small demo split
generated once per test session in a temporary folder.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.config import preset
from cogvlm_jax.boxes import format_box, parse_boxes
from cogvlm_jax.data import demo
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.tokenization import load_tokenizer
from cogvlm_jax.training import loop
from cogvlm_jax import checkpoint
from cogvlm_jax.training import input_pipeline
from cogvlm_jax import metric_writers
from cogvlm_jax.training import run_config
from cogvlm_jax.training.state import (build_setup, init_train_state, is_adapter,
                                       is_visual_expert)
from cogvlm_jax.training.step import (abstract_batch, compile_train_step, model_inputs,
                                      next_token_loss, put_batch)
from tests.helpers import SMALL_SPEC, demo_batches, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ---- data ------------------------------------------------------------------------------


def test_demo_data_is_deterministic_and_reused(data_dir, tmp_path):
  spec = demo.DemoSpec(**SMALL_SPEC)
  other = demo.ensure_demo_data(str(tmp_path / "again"), spec, verbose=False)
  for split in demo.SPLITS:
    assert demo.load_records(data_dir, split) == demo.load_records(other, split)
  for name in ("train/000003.png", "eval/000001.png", demo.TOKENIZER_FILE):
    with open(os.path.join(data_dir, name), "rb") as a, open(os.path.join(other, name),
                                                             "rb") as b:
      assert a.read() == b.read(), name
  # Reused, not regenerated; a folder made with other parameters is refused.
  mtime = os.path.getmtime(os.path.join(other, demo.META_FILE))
  demo.ensure_demo_data(other, spec, verbose=False)
  assert os.path.getmtime(os.path.join(other, demo.META_FILE)) == mtime
  with pytest.raises(ValueError, match="generated with"):
    demo.ensure_demo_data(other, demo.DemoSpec(num_train_scenes=5, num_eval_scenes=4))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".demo-tmp")]


def test_demo_records_and_tokenizer(data_dir):
  records = demo.load_records(data_dir, "train")
  assert len(records) == 4 * SMALL_SPEC["num_train_scenes"]
  assert {r["task"] for r in records} == set(demo.TASKS)
  tok = load_tokenizer(data_dir)
  assert tok.vocab_size == demo.VOCAB_SIZE
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
  assert tok.backend.pad_id() == -1 and tok.backend.unk_id() == 0
  for r in records:
    if r["task"] == "grounding":
      (box,) = parse_boxes(r["answer"])
      assert r["answer"] == format_box(box)
      assert len(r["answer"]) == len("[[000,000,000,000]]")
      assert all(0 <= v < 1 for v in box) and box[0] < box[2] and box[1] < box[3]
    ids = tok.encode(r["query"] + " " + r["answer"])
    assert tok.backend.unk_id() not in ids, r
    assert tok.decode(tok.encode(r["answer"])) == r["answer"]


def test_pipeline_batches_and_iterator_state(data_dir):
  config = tiny_config(data_dir, batch_size=8)
  config.data.shuffle_seed = 3
  _run = run_config.resolve_config(config)
  model_cfg, _ = _run.model_config, _run.mesh
  folder, tok = input_pipeline.prepare_data(config, model_cfg)
  it, _, _ = input_pipeline.training_data(config, model_cfg, folder, tok)
  first = next(it)
  assert first["images"].dtype == np.uint8 and first["images"].shape == (8, 16, 16, 3)
  assert first["input_ids"].shape == (8, 40) and first["image_valid"].all()
  assert not first["bad_sample"].any()
  # Right padding: real tokens first, then zeros; loss only where attention is on.
  assert (first["attention_mask"][:, 0] == 1).all()
  assert not (first["loss_mask"] & (1 - first["attention_mask"])).any()
  for _ in range(30):  # past one epoch (48 scenes * 4 records / 8 = 24 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed, _, _ = input_pipeline.training_data(config, model_cfg, folder, tok)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


# ---- loss ------------------------------------------------------------------------------


def test_loss_counts_only_answer_targets():
  rng = np.random.default_rng(0)
  B, T, V = 2, 8, 11
  logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
  # Row layout: BOS, 2 image tokens, 2 prompt tokens, answer, EOS, pad.
  input_ids = jnp.asarray(rng.integers(3, V, size=(B, T)), jnp.int32)
  loss_mask = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 0]], jnp.int32)
  loss, (total, count) = next_token_loss(logits, input_ids, loss_mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  want = []
  for b in range(B):
    for t in range(1, T):
      if loss_mask[b, t]:  # position t-1 predicts token t
        want.append(-logp[b, t - 1, input_ids[b, t]])
  assert count == len(want) == 5
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-6)
  np.testing.assert_allclose(total, np.sum(want), rtol=1e-6)
  # Logits that predict image / prompt / pad targets get no gradient.
  grad = jax.grad(lambda l: next_token_loss(l, input_ids, loss_mask)[0])(logits)
  predicts_target = np.zeros((B, T), bool)
  predicts_target[:, :-1] = np.asarray(loss_mask[:, 1:]) == 1
  assert np.abs(np.asarray(grad)[~predicts_target]).max() == 0
  assert (np.abs(np.asarray(grad)[predicts_target]).sum(-1) > 0).all()
  # example_weight drops whole rows (evaluation padding).
  _, (_, c) = next_token_loss(logits, input_ids, loss_mask, jnp.asarray([True, False]))
  assert c == 2


def test_built_examples_mask_image_prompt_and_pad(data_dir):
  cfg = preset("tiny-cogvlm", vocab_size=demo.VOCAB_SIZE,
               vision=dict(image_size=16, patch_size=8))
  tok = load_tokenizer(data_dir)
  builder = ExampleBuilder(tok, cfg, 40)
  source = demo.DemoSource(data_dir, "eval")
  for i in range(4):
    r = source[i]
    ex = builder(r)
    answer = tok.encode(r["answer"]) + [tok.eos_token_id]
    (idx,) = np.nonzero(ex["loss_mask"])
    assert list(ex["input_ids"][idx]) == answer  # exactly answer + EOS
    assert idx[0] > cfg.image_span_length  # never BOS / the image span / the prompt
    assert (ex["token_type_ids"][idx] == 0).all() and (ex["attention_mask"][idx] == 1).all()
    assert (ex["attention_mask"][idx[-1] + 1:] == 0).all()  # right padding after EOS
  batch = {k: np.stack([v, v]) for k, v in builder(r).items()}
  batch["image_valid"] = np.asarray([True, False])
  masked = model_inputs(batch, jnp.float32)["attention_mask"]
  assert (masked[0] == batch["attention_mask"][0]).all()
  assert (masked[1][batch["token_type_ids"][1] == 1] == 0).all()


# ---- training --------------------------------------------------------------------------


def test_loss_falls(data_dir, tmp_path, capsys):
  result = loop.train_and_evaluate(tiny_config(data_dir, steps=30, log_every=1),
                                   str(tmp_path), evaluate_at_end=False)
  assert "data: demo (192 samples, weight 1.00)" in capsys.readouterr().out
  losses = [result["losses"][s] for s in sorted(result["losses"])]
  assert len(losses) == 30 and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
  lines = [json.loads(l) for l in open(tmp_path / metric_writers.METRICS_FILE)]
  assert [l["step"] for l in lines] == list(range(1, 31))
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "images_per_s", "step_time_ms"} <= set(
      lines[0])


def test_stage1_trains_only_visual_experts_and_adapter(data_dir):
  config = tiny_config(data_dir)
  _run = run_config.resolve_config(config)
  model_cfg, mesh = _run.model_config, _run.mesh
  setup = build_setup(model_cfg, "stage1", config.optim, 10, mesh)
  state = init_train_state(setup, seed=0)

  trainable = {p for p, _ in _flat(state.params)}
  frozen = {p for p, _ in _flat(state.frozen)}
  assert trainable and all(is_visual_expert(p) or is_adapter(p) for p in trainable)
  assert any(p[0] == "layers" and "vision_mlp" in p for p in trainable)
  assert any("vision_expert_query_key_value" in p for p in trainable)
  assert any("vision_expert_dense" in p for p in trainable)
  assert any(p[0] == "vision" for p in frozen) and ("embed_tokens",) in frozen
  assert any("language_mlp" in p for p in frozen) and ("lm_head",) in frozen
  # Optimizer state exists only for the trainable params: each leaf is a step counter or
  # lies at a trainable param's path (adam's mu / nu).
  for path, leaf in _flat(state.opt_state):
    assert leaf.ndim == 0 or any(path[i:] in trainable for i in range(len(path))), path
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_opt <= 2 * n_trainable + 8  # adam mu + nu (+ step counters)

  before_frozen = jax.device_get(state.frozen)
  before_params = jax.device_get(state.params)
  batches = demo_batches(config, 3)
  spec = abstract_batch(setup, batches[0])
  step = compile_train_step(setup, spec)
  for batch in batches:
    state, metrics = step(state, put_batch(batch, spec))
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), before_frozen)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                         before_params)
  assert all(jax.tree.leaves(changed))


@pytest.mark.slow
def test_resume_gives_identical_losses(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=6, log_every=1, checkpoint_every=2)
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"),
                                     evaluate_at_end=False)["losses"]
  assert sorted(straight) == [1, 2, 3, 4, 5, 6]
  # Stopped after step 4, then the files of step 4 damaged (half of its weights' files
  # truncated, its optimizer state's data deleted): the rerun reports it, moves it aside and
  # resumes from the (async, mid-run) checkpoint of step 2, saved while the loop went on.
  workdir = tmp_path / "resumed"
  first = loop.train_and_evaluate(config, str(workdir), stop_after_steps=4,
                                  evaluate_at_end=False)
  assert first["steps"] == 4
  ckpts = workdir / checkpoint.CHECKPOINTS_DIR
  files = sorted(p for p in (ckpts / "4" / "params").rglob("*") if p.is_file())
  for path in files[::2]:
    os.truncate(path, path.stat().st_size // 2)
  for path in (ckpts / "4" / "opt_state").rglob("d/*"):
    path.unlink()
  second = loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  assert sorted(second["losses"]) == [3, 4, 5, 6]
  broken = [n for n in os.listdir(ckpts) if n.startswith("4.broken-")]
  assert len(broken) == 1 and (ckpts / broken[0] / "params").is_dir()  # kept, not deleted
  # Bit-identical: same params, optimizer state, step, rng and data position.
  assert first["losses"] == {s: straight[s] for s in (1, 2, 3, 4)}
  assert second["losses"] == {s: straight[s] for s in (3, 4, 5, 6)}
  # One metrics.jsonl record per step: the replayed steps 3-4 replaced, not appended again.
  records = metric_writers.read_records(str(workdir / metric_writers.METRICS_FILE))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records] == [straight[s] for s in range(1, 7)]
  # A finished run resumes to "nothing to do"; another recipe or model is refused.
  again = loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  assert again["steps"] == 6 and again["losses"] == {}
  config.recipe = "stage1"
  with pytest.raises(run_config.ConfigError, match="recipe 'full' != 'stage1'"):
    loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)


def test_checkpoint_of_another_layout_is_refused_clearly(data_dir, tmp_path, monkeypatch):
  """A checkpoint written before the data counts were saved (an older cogvlm_jax): a
  ConfigError that says what to do, not an Orbax traceback."""
  import orbax.checkpoint as ocp
  real_save = ocp.args.StandardSave

  def old_layout(item, *args, **kwargs):
    if isinstance(item, dict) and "data_counts" in item:
      item = {k: v for k, v in item.items() if k != "data_counts"}
    return real_save(item, *args, **kwargs)

  config = tiny_config(data_dir, steps=2, checkpoint_every=2)
  monkeypatch.setattr(ocp.args, "StandardSave", old_layout)
  loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)
  monkeypatch.setattr(ocp.args, "StandardSave", real_save)
  config.train.steps = 4
  with pytest.raises(run_config.ConfigError,
                     match=r"cannot resume from .*no checkpoint restores \(step 2: .*init_from"):
    loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)
  # Not moved aside: a step no fallback can replace is not ours, not broken.
  assert os.listdir(tmp_path / checkpoint.CHECKPOINTS_DIR) == ["2"]


def test_end_to_end_with_evaluation(data_dir, tmp_path, capsys):
  """The end-of-run evaluation is eval/'s demo task: the numbers eval.py gives for the same
  checkpoint, with each task beside its baseline."""
  from cogvlm_jax.eval import demo as demo_eval
  from cogvlm_jax.eval.tasks import run_eval

  config = tiny_config(data_dir, steps=4)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  ev = result["eval"]
  for kind in ("caption", "vqa", "grounding"):
    assert kind in ev and kind in ev["baseline"], kind
  assert np.isfinite(ev["vqa"]["accuracy"]) and np.isfinite(ev["grounding"]["mean_iou"])
  assert ev["num_samples"] == 12  # 4 per task
  assert json.load(open(tmp_path / "run" / loop.EVAL_FILE))["vqa"] == ev["vqa"]
  assert "baseline" in capsys.readouterr().out  # the printed table
  assert sorted(os.listdir(tmp_path / "run" / checkpoint.CHECKPOINTS_DIR)) == ["4"]

  # README's chat line on the workdir alone: it carries its tokenizer; the colour question
  # in the template the demo trained questions with.
  from cogvlm_jax import chat
  out = io.StringIO()
  image = os.path.join(data_dir, "eval", "000000.png")
  assert chat.main(["--checkpoint", str(tmp_path / "run"), "--image", image, "--template",
                    "vqa", "--query", "What color is the square?", "--max-new-tokens", "3"],
                   stdout=out) == 0
  assert out.getvalue().endswith("\n")

  # eval.py's path on the saved checkpoint: the same predictions, the same numbers.
  eval_config = loop._demo_eval_config(config, run_config.resolve_config(config),
                                       str(tmp_path / "run"))
  again = run_eval(eval_config, str(tmp_path / "eval_py"), progress=False)
  for kind in ("caption", "vqa", "grounding"):
    assert again[kind] == ev[kind], kind
  assert demo_eval.format_table(again) == demo_eval.format_table(ev)


# ---- settings --------------------------------------------------------------------------


def test_invalid_settings_fail_before_compiling(data_dir):
  config = tiny_config(data_dir)
  _run = run_config.resolve_config(config)
  model_cfg, _ = _run.model_config, _run.mesh
  two_way = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 1})
  config.train.batch_size = 7
  with pytest.raises(run_config.ConfigError, match="train.batch_size .7. must be a positive multiple"):
    run_config.validate_config(config, model_cfg, two_way)
  config = tiny_config(data_dir)
  config.model.vision.image_size = 20
  with pytest.raises(run_config.ConfigError, match="not a multiple of patch_size"):
    run_config.resolve_config(config)
  config = tiny_config(data_dir)
  config.recipe = "stage3"
  with pytest.raises(run_config.ConfigError, match="recipe"):
    run_config.resolve_config(config)


def test_train_py_reports_bad_settings(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config",
       os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(tmp_path),
       "--config.train.batch_size=0"], capture_output=True, text=True, cwd=tmp_path,
      timeout=120)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: train.batch_size (0) must be a positive multiple")
  assert not os.path.exists(tmp_path / "data")  # failed before generating anything


def _key(k):
  return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def _flat(tree):
  return [(tuple(str(_key(k)) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.slow
def test_kill_9_during_a_save_resumes_exactly(data_dir, tmp_path):
  """SIGKILL while Orbax writes a checkpoint: the rerun starts from the last complete one
  (the half-written one is ignored) and gives the uninterrupted run's losses."""
  import signal
  import time

  settings = dict(steps=16, log_every=1, checkpoint_every=1, max_checkpoints=3)
  straight = loop.train_and_evaluate(tiny_config(data_dir, **settings), str(tmp_path / "a"),
                                     evaluate_at_end=False)["losses"]
  workdir = tmp_path / "b"
  script = tmp_path / "run.py"
  script.write_text(
      f"import sys; sys.path.insert(0, {ROOT!r})\n"
      "from tests.helpers import tiny_config\n"
      "from cogvlm_jax.training import loop\n"
      f"loop.train_and_evaluate(tiny_config({data_dir!r}, **{settings!r}), {str(workdir)!r},\n"
      "                         evaluate_at_end=False)\n")
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / checkpoint.CHECKPOINTS_DIR
  caught = False
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    # Wait for a save in progress after a few complete ones, then kill -9 mid-write.
    names = os.listdir(ckpts) if ckpts.exists() else []
    if any("tmp" in n for n in names) and len([n for n in names if n.isdigit()]) >= 2:
      proc.send_signal(signal.SIGKILL)
      caught = True
      break
    time.sleep(0.002)
  proc.wait()
  assert caught, "the run ended before a save could be interrupted"
  resumed = loop.train_and_evaluate(tiny_config(data_dir, **settings), str(workdir),
                                    evaluate_at_end=False)["losses"]
  assert resumed and max(resumed) == 16
  assert resumed == {s: straight[s] for s in resumed}
