"""Evaluate a CogVLM checkpoint on a benchmark:

    python eval.py --config configs/eval/vqav2.py --config.checkpoint=PATH --workdir OUT \
        --config.data.questions=... --config.data.annotations=... --config.data.image_root=...

PATH is a training workdir (or one of its checkpoints), a converted checkpoint or a Hugging
Face folder. Writes OUT/predictions.jsonl (one line per sample, appended as it goes; a rerun
skips the samples already there), OUT/metrics.json, TensorBoard scalars (OUT/tensorboard) and
OUT/report.html; OUT may be gs://... (then locked with a lease). Another eval.py (or
train.py) on OUT is refused (exit 5, naming it); bad
input (settings, a missing or broken checkpoint) exits 2 with one line `error: ...` and leaves
no file in OUT (--debug shows the traceback).
Tasks: configs/eval/{demo,coco_caption,vqav2,textvqa,refcoco,gui,pope}.py.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an eval config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (predictions, metrics, report).")
flags.DEFINE_bool("workdir_lease", False,
                  "Lock --workdir with a lease (a lock file renewed by a heartbeat), as a "
                  "gs:// workdir always is, instead of flock: for a folder shared by several "
                  "hosts where flock does not hold (NFS).")
flags.DEFINE_bool("debug", False, "Show the Python traceback of an error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Imported after flag parsing (JAX is slow to import; --help stays fast).
  from cogvlm_jax import cli
  from cogvlm_jax.fileio import WorkdirBusyError
  sys.exit(cli.run_main(_evaluate, debug=FLAGS.debug, codes=((WorkdirBusyError, 5),)))


def _evaluate() -> None:
  """Runs the task (under the workdir lock) and prints its metrics."""
  from cogvlm_jax.eval.tasks import run_eval
  metrics = run_eval(FLAGS.config, FLAGS.workdir, lease=FLAGS.workdir_lease or None)
  print(json.dumps(metrics, indent=2, sort_keys=True, default=str))

if __name__ == "__main__":
  app.run(main)
