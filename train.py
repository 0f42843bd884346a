"""Train a CogVLM: `python train.py --config configs/demo.py --workdir runs/demo`.

Rerunning the same command resumes from the latest checkpoint in --workdir. On SIGTERM
(preemption) the run saves a checkpoint after the current step and exits 0; too many steps with
a non-finite loss (train.max_nan_steps) exit 3; too many bad samples in the data
(data.max_bad_ratio) exit 4, naming the worst shards; a workdir another run is using is
refused (exit 5) naming its host and PID. Any config field
can be overridden: `--config.train.steps=300 --config.recipe=stage1`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  # Imported after flag parsing (JAX is slow to import; --help stays fast).
  from cogvlm_jax.data.bad_samples import BadDataError
  from cogvlm_jax.fileio import WorkdirBusyError
  from cogvlm_jax.training.loop import NonFiniteLossError, train_and_evaluate
  from cogvlm_jax.training.run_config import ConfigError
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    print(f"train.py: invalid configuration: {e}", file=sys.stderr)
    sys.exit(2)
  except WorkdirBusyError as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(5)
  except NonFiniteLossError as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(3)
  except BadDataError as e:
    print(f"train.py: stopping: the training data is bad: {e}", file=sys.stderr)
    sys.exit(4)


if __name__ == "__main__":
  app.run(main)
