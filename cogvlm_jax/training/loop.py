"""The training loop, top to bottom: `train_and_evaluate(config, workdir)` is what train.py runs.

    config --resolve_config--> model config, mesh, rules, phases      (run_config.py)
           --prepare_data----> tokenizer, demo data, Grain iterator   (input_pipeline.py)
           --build_setup-----> trainable / frozen split, optimizer    (state.py)
           --restore or init-> the train state                        (checkpointing.py,
                                                                       init_weights.py)
           --compile---------> the AOT train step                     (step.py)
    loop:  batch -> step -> metrics (metrics.py) -> checkpoint on Orbax's interval,
           preemption (preemption.py), the resolution switch of stage 2
    end:   the demo task of eval/ on the held-out split (the code eval.py runs)

Rerunning the same command resumes from the newest checkpoint and gives the same losses as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Optional

import jax
import ml_collections
import numpy as np

from cogvlm_jax.batch_layout import HOST_ONLY_KEYS
from cogvlm_jax import fileio
from cogvlm_jax.fileio import workdir_lock
from cogvlm_jax.metric_writers import create_writer, drop_records_after
from cogvlm_jax.training import checkpointing, init_weights, input_pipeline, metrics
from cogvlm_jax.training.flops import device_peak_flops, train_step_flops
from cogvlm_jax.training.preemption import PreemptionFlag
from cogvlm_jax.training.run_config import (Phase, RunConfig, phase_at, phase_of_state,
                                            resolve_config)
from cogvlm_jax.training.state import TrainSetup, build_setup, init_train_state
from cogvlm_jax.training.step import abstract_batch, compile_train_step, put_batch

EVAL_DIR = "eval"  # WORKDIR/eval: the end-of-run evaluation's predictions, metrics, report
EVAL_FILE = "eval.json"  # WORKDIR/eval.json: its metrics


class NonFiniteLossError(FloatingPointError):
  """Too many steps had a non-finite loss or gradient norm (their updates were skipped)."""


def log(msg: str) -> None:
  print(msg, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None, evaluate_at_end: bool = True,
                       lease: Optional[bool] = None, lease_options: Optional[dict] = None
                       ) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates.

  Args:
    config: the run config (configs/base.py lists every field).
    workdir: checkpoints, metrics.jsonl, TensorBoard events and the evaluation go here; a
      local folder or a remote one (gs://bucket/run, kept exactly as given: everything is
      written through etils.epath / Orbax).
    stop_after_steps: stop (after saving a checkpoint) once this global step is reached, as
      if the job had been preempted; rerunning resumes. For tests and experiments.
    evaluate_at_end: run the held-out evaluation when training is done.
    lease, lease_options: the workdir lock's (fileio.workdir_lock): None takes the lease on a
      remote workdir and flock on a local one; True forces the lease (a shared NFS folder,
      tests). The loop checks the lease at each log step and before each save: once
      another run took it over, WorkdirBusyError (train.py: exit 5).
  Returns:
    {"steps": last step, "losses": {step: loss} of the steps run here, "eval": metrics or
    None, "preempted", "skipped_steps", "data": bad-sample totals}.
  """
  workdir = fileio.resolve_path(workdir)  # gs://... stays remote; local made absolute
  run = resolve_config(config)
  checkpointing.check_remote_workdir(workdir)  # gs:// without its packages: one line
  # One writer per workdir: a second train.py (or eval.py) on it is refused at once.
  lock = (workdir_lock(workdir, "train.py", lease=lease, **(lease_options or {}))
          if jax.process_index() == 0 else nullcontext())
  with lock as held:  # a WorkdirLease (remote / forced), else None
    manager = checkpointing.checkpoint_manager(workdir, config)
    try:
      return _train_and_evaluate(config, run, workdir, manager, stop_after_steps,
                                 evaluate_at_end, held)
    finally:
      # Whatever failed (resuming included): an unclosed manager's background threads die
      # at interpreter exit with dozens of "Event loop is closed" tracebacks.
      manager.wait_until_finished()
      manager.close()


def _train_and_evaluate(config, run: RunConfig, workdir: str, manager,
                        stop_after_steps: Optional[int], evaluate_at_end: bool,
                        lease: Optional[fileio.WorkdirLease] = None) -> dict:
  run_start = time.perf_counter()
  folder, tokenizer = input_pipeline.prepare_data(config, run.model_config)
  if jax.process_index() == 0:  # the workdir carries its tokenizer (chat / eval find it)
    input_pipeline.copy_tokenizer(input_pipeline.tokenizer_path(config, folder), workdir)
  sources = input_pipeline.training_sources(config, folder)
  data_counts = input_pipeline.DataCounts()
  # The newest step that restores (broken newer ones moved aside), with the setup and data
  # stream of its phase: the image size it was saved at.
  restored, inputs = _resume(config, run, manager, folder, tokenizer, sources, data_counts)
  phase, setup = inputs.phase, inputs.setup
  data_iter, builder, local_rows = inputs.data_iter, inputs.builder, inputs.local_rows
  trainable, total = setup.num_params()
  log(f"model: {total:,} params, {trainable:,} trainable (recipe {config.recipe!r}); "
      f"mesh {dict(run.mesh.shape)} on {run.mesh.devices.size} {jax.default_backend()} "
      f"device(s)")
  if restored is not None:
    state, data_counts.counts, latest = restored
    if jax.process_index() == 0:
      drop_records_after(workdir, latest)  # the steps after it are trained (logged) again
    log(f"resumed from {manager.directory} at step {latest}")
  else:
    state = init_train_state(setup, config.seed)
    if config.train.init_from:
      state = init_weights.load_initial_weights(state, setup, config.train.init_from)

  total_steps = int(config.train.steps)
  start = int(jax.device_get(state.step))
  end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
  writer = create_writer(workdir, tensorboard=config.train.tensorboard)
  losses: dict[int, float] = {}
  skipped, preempted = 0, False
  try:
    if start < end:
      step_fn, batch_spec, flops = _compile(config, setup, builder, run, phase, start, end)
      peak, _ = device_peak_flops(float(config.train.peak_flops_per_device))
      pending: list[dict] = []
      interval_start = time.perf_counter()
      with PreemptionFlag() as preemption:
        for step in range(start, end):
          if phase_at(run.phases, step) is not phase:  # stage 2's resolution switch
            phase = phase_at(run.phases, step)
            state, setup, data_iter, builder, local_rows = _switch_phase(
                config, run, phase, state, setup, data_iter, folder, tokenizer, sources)
            log(f"step {step}: switching to {phase.model_config.vision.image_size} px images")
            step_fn, batch_spec, flops = _compile(config, setup, builder, run, phase, start, end)
            interval_start = time.perf_counter()

          host_batch = local_rows(next(data_iter))  # BadDataError: too many bad samples
          data_counts.add(host_batch)
          state, step_metrics = step_fn(state, put_batch(host_batch, batch_spec))
          pending.append(step_metrics)
          done = step + 1
          preempted = preemption.reached(done, manager)

          if done % config.train.log_every == 0 or done == end or preempted:
            # The lease is checked (every process) right before the record is written: a
            # lost one must stop all processes there, not process 0 alone in the write.
            summary = _log_interval(pending, done, interval_start, flops, peak, config,
                                    data_counts, writer, losses, skipped,
                                    before_write=lambda: _check_lease(lease))
            skipped = summary["skipped_steps_total"]
            pending, interval_start = [], time.perf_counter()
            _stop_if_nonfinite(skipped, done, config, manager)

          if done == end or preempted or manager.should_save(done):
            _check_lease(lease)  # never a checkpoint into a workdir another run took over
            t_save = time.perf_counter()
            writer.flush()  # metrics.jsonl holds every step saved (remote: rewritten now)
            data_counts.sync()  # the counts saved are those of the steps saved (a collective)
            checkpointing.save_checkpoint(
                manager, state, data_iter,
                checkpointing.stored_run_config(config, setup.model_config), data_counts.counts)
            interval_start += time.perf_counter() - t_save  # keep saving out of the step time
          if preempted:
            log(f"preempted: saved step {done}; rerun the same command to resume")
            break
  finally:
    # Any failure (bad data, non-finite losses, Ctrl-C, a bug) too: stop the data threads /
    # worker processes, flush the metrics and finish the checkpoint being written.
    try:
      writer.close()  # remote: the last rewrite (refused if the lease was lost)
    finally:
      manager.wait_until_finished()
      _close_iterator(data_iter)

  if losses:
    first, last = min(losses), max(losses)
    log(f"trained steps {first}..{last}: loss {losses[first]:.4f} -> {losses[last]:.4f}")
  step_reached = int(jax.device_get(state.step))
  result = {"steps": step_reached, "losses": losses, "eval": None, "preempted": preempted,
            "skipped_steps": skipped, "data": data_counts.summary()}
  if evaluate_at_end and step_reached >= total_steps and not preempted:
    result["eval"] = _evaluate(config, run, setup, state, folder, tokenizer, workdir,
                               step_reached)
  log(f"done in {time.perf_counter() - run_start:.0f}s (workdir {workdir})")
  return result


# ---- the loop's parts ------------------------------------------------------------------------


@dataclasses.dataclass
class _PhaseInputs:
  """What training in one phase needs: its setup (shapes at its image size) and the data
  stream at that size (iterator, ExampleBuilder, keep-my-rows function)."""
  phase: Phase
  setup: TrainSetup
  data_iter: object
  builder: object
  local_rows: object


def _phase_inputs(config, run: RunConfig, phase: Phase, folder, tokenizer,
                  sources) -> _PhaseInputs:
  data_iter, builder, local_rows = input_pipeline.training_data(
      config, phase.model_config, folder, tokenizer, phase.max_length, sources)
  return _PhaseInputs(phase, _make_setup(config, run, phase), data_iter, builder, local_rows)


def _resume(config, run: RunConfig, manager, folder, tokenizer, sources, data_counts):
  """(restore_latest's (state, counts, step) or None for a fresh run, the _PhaseInputs of
  the phase that state is in).

  The inputs are first built for the newest step's phase. A fallback to a step of another
  phase (stage 2: the newest step, after the resolution switch, is broken and the previous
  complete one is from before it) rebuilds them at that step's image size, so the older
  step restores with its own shapes; the loop then switches again at the switch step.
  """
  latest = manager.latest_step()
  inputs = _phase_inputs(config, run, phase_of_state(run.phases, latest or 0), folder,
                         tokenizer, sources)
  if latest is None:
    return None, inputs

  def inputs_for(step: int):
    nonlocal inputs
    phase = phase_of_state(run.phases, step)
    if phase is not inputs.phase:
      _close_iterator(inputs.data_iter)
      inputs = _phase_inputs(config, run, phase, folder, tokenizer, sources)
      log(f"step {step} was saved at {phase.model_config.vision.image_size} px images "
          f"(before the resolution switch): restoring it at that size")
    return inputs.setup, inputs.data_iter

  try:
    restored = checkpointing.restore_latest(manager, inputs_for, data_counts.counts, config,
                                            log)
  except BaseException:
    _close_iterator(inputs.data_iter)
    raise
  return restored, inputs


def _make_setup(config: ml_collections.ConfigDict, run: RunConfig, phase: Phase) -> TrainSetup:
  return build_setup(phase.model_config, config.recipe, config.optim, int(config.train.steps),
                     run.mesh, rules=run.rules, seed=config.seed,
                     frozen_dtype=config.train.frozen_dtype or None,
                     lora=config.train.get("lora"))


def _compile(config, setup: TrainSetup, builder, run: RunConfig, phase: Phase, start: int,
             end: int):
  """(compiled train step, batch spec, FLOPs per step) of a phase; logs what it compiled."""
  t0 = time.perf_counter()
  batch_size = config.train.batch_size
  example = {k: v for k, v in builder.placeholder().items() if k not in HOST_ONLY_KEYS}
  batch_spec = abstract_batch(setup, {k: np.stack([v] * batch_size) for k, v in example.items()})
  accum = phase.grad_accum_steps
  step_fn = compile_train_step(setup, batch_spec, microbatches=accum,
                               z_loss=float(config.train.z_loss))
  flops = train_step_flops(setup, batch_spec)
  peak, peak_source = device_peak_flops(float(config.train.peak_flops_per_device))
  last = min(end, *[p.start for p in run.phases if p.start > phase.start] or [end])
  log(f"compiled the train step in {time.perf_counter() - t0:.1f}s; training steps "
      f"{max(start, phase.start) + 1}..{last} of {config.train.steps} (batch {batch_size}"
      f"{f' in {accum} microbatches' if accum > 1 else ''}, seq {phase.max_length}, "
      f"images {phase.model_config.vision.image_size} px); {flops / 1e9:.3g} GFLOPs per "
      f"step; MFU relative to {peak / 1e9:.4g} GFLOP/s ({peak_source})")
  return step_fn, batch_spec, flops


def _switch_phase(config, run: RunConfig, phase: Phase, state, setup: TrainSetup, data_iter,
                  folder, tokenizer, sources):
  """The state, setup and data stream of the next phase (another image size): the same
  weights and optimizer state, the same sample stream at the new size."""
  new_setup = _make_setup(config, run, phase)
  state = init_weights.switch_resolution(state, setup, new_setup)
  position = data_iter.get_state()
  _close_iterator(data_iter)
  data_iter, builder, local_rows = input_pipeline.training_data(
      config, phase.model_config, folder, tokenizer, phase.max_length, sources)
  data_iter.set_state(position)
  return state, new_setup, data_iter, builder, local_rows


def _log_interval(pending: list, done: int, interval_start: float, flops: float, peak: float,
                  config, data_counts, writer, losses: dict, skipped_before: int, *,
                  before_write=None) -> dict:
  """Fetches the interval's step metrics, records the losses, logs and writes one record
  (with the run's total of skipped non-finite steps); `before_write()` is called (by every
  process) just before the record is written."""
  host = jax.device_get(pending)
  for i, m in enumerate(host):
    losses[done - len(host) + i + 1] = float(m["loss"])
  summary = metrics.summarise(host, time.perf_counter() - interval_start,
                              config.train.batch_size, flops, peak)
  summary["skipped_steps_total"] = skipped_before + summary["skipped_steps"]
  data_counts.sync()
  summary.update(data_counts.summary())
  log(metrics.log_line(done, summary))
  if before_write is not None:
    before_write()
  writer.write(done, summary, tensorboard_prefix="train/")
  return summary


def _stop_if_nonfinite(skipped: int, done: int, config, manager) -> None:
  max_nan = int(config.train.max_nan_steps)
  if skipped >= max_nan:
    raise NonFiniteLossError(
        f"stopping at step {done}: {skipped} steps had a non-finite loss or gradient norm "
        f"(train.max_nan_steps = {max_nan}); their updates were skipped. The last checkpoint "
        f"in {manager.directory} predates them. Lower optim.lr, raise optim.warmup_steps or "
        f"check the data, then rerun to resume.")


def _check_lease(lease: Optional[fileio.WorkdirLease]) -> None:
  """WorkdirBusyError once the workdir's lease was lost (another run took it over after ours
  stalled past its TTL): this run must stop writing. Cheap: reads the heartbeat's flag.

  Only process 0 holds the lease; with several processes its verdict is broadcast (called
  by every process at the same steps), so all of them stop together rather than the others
  waiting in the next step's collectives for a process 0 that has left."""
  error = None
  if lease is not None:
    try:
      lease.check()
    except fileio.WorkdirBusyError as e:  # names the new holder
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if lost and error is None:
      raise fileio.WorkdirBusyError("process 0 lost this run's workdir lease (another run "
                                    "took the workdir over); stopping")
  if error is not None:
    raise error


def _close_iterator(data_iter) -> None:
  """Stops the iterator's threads / worker processes now rather than at interpreter exit."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def _evaluate(config, run: RunConfig, setup: TrainSetup, state, folder, tokenizer,
              workdir: str, step: int) -> Optional[dict]:
  """The demo task of eval/ on the held-out split, with the trained model in memory: the
  numbers `eval.py --config configs/eval/demo.py --config.checkpoint=WORKDIR` prints."""
  if folder is None:
    log("no held-out evaluation in train.py for data.source='mixture': run eval.py with "
        f"a configs/eval/ config and --config.checkpoint={workdir}")
    return None
  from cogvlm_jax.eval import demo as demo_task
  from cogvlm_jax.fileio import write_json_atomic
  from cogvlm_jax.training.state import model_from_state

  t0 = time.perf_counter()
  eval_config = _demo_eval_config(config, run, workdir)
  model = model_from_state(setup, state)
  eval_dir = fileio.join(workdir, EVAL_DIR)
  if jax.process_index() == 0:  # predictions of an earlier end (another step) are not reused
    fileio.rmtree(eval_dir)
  results = demo_task.run(eval_config, eval_dir, model=model, tokenizer=tokenizer,
                          mesh=run.mesh, progress=False)
  if jax.process_index() == 0:
    results["eval_time_s"] = time.perf_counter() - t0
    write_json_atomic(fileio.join(workdir, EVAL_FILE), results)
    log("held-out evaluation (the demo task of eval.py):\n" + demo_task.format_table(results))
  return results


def _demo_eval_config(config, run: RunConfig, workdir: str) -> ml_collections.ConfigDict:
  """configs/eval/demo.py for this run: its checkpoint, data folder, mesh and dtype, and the
  train config's eval.* where set."""
  from configs.eval import demo as demo_eval

  c = demo_eval.get_config()
  c.checkpoint = workdir
  c.data.dir = config.data.dir
  c.dtype = run.model_config.dtype
  c.mesh = ml_collections.ConfigDict(dict(config.mesh))
  for field in ("batch_size", "max_new_tokens"):
    if config.eval[field]:
      c[field] = config.eval[field]
  if config.eval.max_examples_per_task:
    c.data.max_examples_per_task = config.eval.max_examples_per_task
  return c

