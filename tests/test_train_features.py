"""Train-step and loop features: non-finite guard, preemption (SIGTERM), TensorBoard / MFU
logs, gradient accumulation and z-loss. CPU, toy model, the demo data of test_train_demo."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.training import loop
from cogvlm_jax import checkpoint
from cogvlm_jax import metric_writers
from cogvlm_jax.training import run_config
from cogvlm_jax.training import state as train_state
from cogvlm_jax.training.flops import device_peak_flops, train_step_flops
from cogvlm_jax.training.state import build_setup, init_train_state
from cogvlm_jax.training.step import (abstract_batch, compile_train_step, make_train_step,
                                      put_batch, split_microbatches)
from tests.helpers import demo_batches, tiny_config


def _setup_and_batches(config, recipe="full", n=2, batch_size=8, mesh=None):
  _run = run_config.resolve_config(config)
  model_cfg, default_mesh = _run.model_config, _run.mesh
  setup = build_setup(model_cfg, recipe, config.optim, 10, mesh or default_mesh)
  config.train.batch_size = batch_size
  return setup, demo_batches(config, n)


def _poison_embedding(state, rows):
  """NaN in the (frozen, stage1) token-embedding rows `rows`: batches using them go NaN."""
  frozen = dict(state.frozen)
  frozen["embed_tokens"] = frozen["embed_tokens"].at[rows].set(jnp.nan)
  return state.replace(frozen=frozen)


def test_nonfinite_step_skips_the_update(data_dir):
  config = tiny_config(data_dir)
  setup, (good, bad) = _setup_and_batches(config, "stage1")
  used = np.unique(good["input_ids"])
  unused = next(i for i in range(3, 512) if i not in used)
  bad = {k: v.copy() for k, v in good.items()}
  text = np.nonzero((bad["token_type_ids"][0] == 0) & (bad["attention_mask"][0] == 1))[0]
  bad["input_ids"][0, text[-1]] = unused
  state = _poison_embedding(init_train_state(setup, seed=0), unused)
  spec = abstract_batch(setup, good)
  step = compile_train_step(setup, spec)

  state, m = step(state, put_batch(good, spec))
  assert float(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))
  before = jax.device_get((state.params, state.opt_state))
  state, m = step(state, put_batch(bad, spec))
  assert float(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
  assert int(state.step) == 2  # the step counter (and the data) moved on
  after = jax.device_get((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)  # nothing was updated
  state, m = step(state, put_batch(good, spec))  # and training goes on
  assert float(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                         before[0])
  assert all(jax.tree.leaves(changed))


def test_too_many_nonfinite_steps_stop_with_a_message(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, steps=10, log_every=1, max_nan_steps=3)
  config.recipe = "stage1"
  init = train_state.init_train_state
  monkeypatch.setattr(loop, "init_train_state",
                      lambda setup, seed: _poison_embedding(init(setup, seed), slice(None)))
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"stopping at step 3: 3 steps had a non-finite loss.*max_nan_steps"):
    loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)
  lines = [json.loads(l) for l in open(tmp_path / metric_writers.METRICS_FILE)]
  assert [l["skipped_steps_total"] for l in lines] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(data_dir, tmp_path, monkeypatch):
  # Also the real recipes' precision: bf16 compute, fp32 trainable, frozen weights in bf16.
  config = tiny_config(data_dir, steps=6, log_every=2, checkpoint_every=100,
                       frozen_dtype="bfloat16")
  config.recipe = "stage1"
  config.model.dtype = "bfloat16"
  calls = []
  put = loop.put_batch

  def put_and_preempt(batch, spec):
    calls.append(1)
    if len(calls) == 3:  # the scheduler preempts the job during step 3
      os.kill(os.getpid(), signal.SIGTERM)
    return put(batch, spec)

  monkeypatch.setattr(loop, "put_batch", put_and_preempt)
  first = loop.train_and_evaluate(config, str(tmp_path))
  assert first["preempted"] and first["steps"] == 3 and first["eval"] is None
  assert sorted(os.listdir(tmp_path / checkpoint.CHECKPOINTS_DIR)) == ["3"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again

  monkeypatch.setattr(loop, "put_batch", put)
  second = loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)
  assert not second["preempted"] and sorted(second["losses"]) == [4, 5, 6]

  # Logs: metrics.jsonl with throughput and MFU, and TensorBoard event files.
  lines = [json.loads(l) for l in open(tmp_path / metric_writers.METRICS_FILE)]
  assert [l["step"] for l in lines] == [2, 3, 4, 6]
  for l in lines:
    assert l["tflops_per_s"] > 0 and 0 < l["mfu"] < 1.5, l
  events = os.listdir(tmp_path / metric_writers.TENSORBOARD_DIR)
  assert events and all(e.startswith("events.out.tfevents") for e in events)
  scalars = _read_scalars(str(tmp_path / metric_writers.TENSORBOARD_DIR))
  assert sorted(s for s, _ in scalars["train/loss"]) == [2, 3, 4, 6]


def _read_scalars(folder):
  """{tag: [(step, value)]} of the event files in `folder` (TFRecord framing, Event protos)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_flops_count_and_peak(data_dir):
  config = tiny_config(data_dir)
  setup, (batch,) = _setup_and_batches(config, n=1)
  spec = abstract_batch(setup, batch)
  flops = train_step_flops(setup, spec)
  trainable, _ = setup.num_params()
  tokens = batch["input_ids"].size
  # Matmul FLOPs ~ 6 * params * tokens (fwd 2, bwd 4; each token meets about half the
  # decoder weights, the image patches the ViT) plus attention: the right order of magnitude.
  assert 0.5 * trainable * tokens < flops < 12 * trainable * tokens, (flops, trainable)
  stage1 = build_setup(setup.model_config, "stage1", config.optim, 10, setup.mesh)
  assert train_step_flops(stage1, spec) < flops  # no weight gradients of frozen weights
  peak, source = device_peak_flops()
  assert peak > 1e8 and "measured" in source
  assert device_peak_flops(2e9)[0] == 2e9 * jax.device_count()


def test_microbatches_interleave_rows():
  x = jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)
  mb = split_microbatches({"x": x}, 2)["x"]
  assert mb.shape == (2, 4, 3)
  np.testing.assert_array_equal(mb[0, :, 0], [0, 2, 4, 6])
  np.testing.assert_array_equal(mb[1, :, 0], [1, 3, 5, 7])


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(data_dir):
  config = tiny_config(data_dir)
  config.optim.warmup_steps = 0  # the first step already moves the params
  setup, (batch,) = _setup_and_batches(config, n=1, batch_size=16)  # 2 rows per device
  spec = abstract_batch(setup, batch)
  init = jax.device_get(init_train_state(setup, seed=0))
  results = {}
  for micro in (1, 2):
    state = jax.device_put(init, setup.shardings)
    step = compile_train_step(setup, spec, microbatches=micro)
    state, m = step(state, put_batch(batch, spec))
    results[micro] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.params))
  np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
  np.testing.assert_allclose(results[2][1], results[1][1], rtol=1e-4)
  # Adam's first step is ~lr * sign(g): where g ~ 0 summation-order noise shows, up to a
  # small fraction of lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * 3e-3),
               results[2][2], results[1][2])


@pytest.mark.slow
def test_z_loss(data_dir):
  config = tiny_config(data_dir)
  config.optim.warmup_steps = 0
  setup, (batch,) = _setup_and_batches(config, n=1)
  spec = abstract_batch(setup, batch)
  state = init_train_state(setup, seed=0)
  b = put_batch(batch, spec)

  def grads_of(z):
    return jax.jit(make_train_step(setup, z_loss=z))(state, b)

  plain, m0 = grads_of(0.0)
  with_z, m1 = grads_of(1e-2)
  assert float(m0["z_loss"]) == 0 and float(m1["z_loss"]) > 0
  np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)  # CE reported
  # The z term is mean(logsumexp^2) over counted tokens.
  from cogvlm_jax.training.state import model_from_state
  from cogvlm_jax.training.step import model_inputs
  logits = model_from_state(setup, state)(**model_inputs(b, jnp.float32))
  lse = jax.nn.logsumexp(logits[:, :-1], axis=-1)
  w = b["loss_mask"][:, 1:]
  np.testing.assert_allclose(float(m1["z_loss"]), float(jnp.sum(lse**2 * w) / jnp.sum(w)),
                             rtol=1e-5)
  assert not np.isclose(float(m1["grad_norm"]), float(m0["grad_norm"]), rtol=1e-6)
  differs = jax.tree.map(lambda a, c: not np.allclose(a, c), jax.device_get(plain.params),
                         jax.device_get(with_z.params))
  assert any(jax.tree.leaves(differs))


def test_a_busy_workdir_is_refused_at_once(data_dir, tmp_path):
  from cogvlm_jax import fileio

  config = tiny_config(data_dir, steps=2)
  with fileio.workdir_lock(str(tmp_path), "eval.py"):
    with pytest.raises(fileio.WorkdirBusyError, match=r"in use by eval.py \(host .*, pid \d+\)"):
      loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)
  assert not os.path.exists(tmp_path / "checkpoints")  # refused before anything was made
  # Released (as after the holder's death: the kernel drops flock locks): the run goes on.
  assert loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False)["steps"] == 2

