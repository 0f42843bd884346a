"""Train a CogVLM: `python train.py --config configs/demo.py --workdir runs/demo`.

Rerunning the same command resumes from the latest checkpoint in --workdir. On SIGTERM
(preemption) the run saves a checkpoint after the current step and exits 0; too many steps with
a non-finite loss (train.max_nan_steps) exit 3; too many bad samples in the data
(data.max_bad_ratio) exit 4, naming the worst shards; a workdir another run is using is
refused (exit 5) naming its host and PID, and so is a run whose lease on a gs:// workdir
(or with --workdir_lease) another run took over; a bad setting or unreadable input exits 2. Every error
is one line `error: ...` on stderr (--debug shows the traceback). Any config field can be
overridden: `--config.train.steps=300 --config.recipe=stage1`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and eval.json.")
flags.DEFINE_bool("workdir_lease", False,
                  "Lock --workdir with a lease (a lock file renewed by a heartbeat), as a "
                  "gs:// workdir always is, instead of flock: for a folder shared by several "
                  "hosts where flock does not hold (NFS).")
flags.DEFINE_bool("debug", False, "Show the Python traceback of an error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  # Imported after flag parsing (JAX is slow to import; --help stays fast).
  from cogvlm_jax import cli
  from cogvlm_jax.data.bad_samples import BadDataError
  from cogvlm_jax.fileio import WorkdirBusyError
  from cogvlm_jax.training.loop import NonFiniteLossError
  from cogvlm_jax.training.run_config import ConfigError

  codes = ((ConfigError, 2), (WorkdirBusyError, 5), (NonFiniteLossError, 3),
           (BadDataError, 4))
  sys.exit(cli.run_main(_train, debug=FLAGS.debug, codes=codes))


def _train() -> None:
  """The run (its result dict is for tests and notebooks; the log has said it all)."""
  from cogvlm_jax.training.loop import train_and_evaluate
  train_and_evaluate(FLAGS.config, FLAGS.workdir, lease=FLAGS.workdir_lease or None)


if __name__ == "__main__":
  app.run(main)
