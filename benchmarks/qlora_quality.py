"""QLoRA's quality cost on the demo: the same LoRA run on a float base and on an int8 base.

    python benchmarks/qlora_quality.py --init-from WORKDIR [--steps 200] [--base-dtypes int8]

WORKDIR is a finished demo main job (`train.py --config configs/demo.py --workdir WORKDIR`).
Every run here starts from its weights, in one process, one after another, with the same
LoRA settings, seed and batches (the data order is the config's, so the rows of step k are
the same in each run); only `train.lora.base_dtype` differs: "" (the float base as stored)
and each of --base-dtypes. The model, data folder and tasks come from WORKDIR's stored run
config (nothing about the demo's tasks is assumed here). Prints, per run, the loss of the
first and the last step and the mean over the last --tail steps, and each quantized run's
ratio to the float one (1.0 = no quality cost). Training losses of the same batches; no
timing is reported (the runs share a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from _common import machine_line  # noqa: E402  (puts the repository root on sys.path)

ALL_DECODER = ["vision_expert_query_key_value", "language_expert_query_key_value",
               "vision_expert_dense", "language_expert_dense", "vision_mlp", "language_mlp"]


def run_config_for(init_from: str, steps: int, rank: int, base_dtype: str, config_path: str):
  """The LoRA run config: `config_path`'s, with WORKDIR's model and data folder."""
  import importlib.util

  import ml_collections

  from cogvlm_jax import checkpoint

  spec = importlib.util.spec_from_file_location("bench_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  stored = checkpoint.read_checkpoint_config(init_from)
  c.model = ml_collections.ConfigDict(stored["model"])  # the weights' model, as trained
  data = stored.get("data") or {}
  for key in ("dir", "num_train_scenes", "num_eval_scenes", "render_size", "generator_seed",
              "max_length"):
    if key in data and key in c.data:
      c.data[key] = data[key]
  c.train.init_from = os.path.abspath(init_from)
  c.train.steps = steps
  c.train.log_every = 1
  c.train.checkpoint_every = steps
  c.train.tensorboard = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = max(1, steps // 20)
  c.train.lora = dict(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=ALL_DECODER,
                      base_dtype=base_dtype)
  return c


def train(config, workdir: str) -> dict[int, float]:
  from cogvlm_jax.training import loop

  return loop.train_and_evaluate(config, workdir, evaluate_at_end=False)["losses"]


def summary(losses: dict[int, float], tail: int) -> tuple[float, float, float]:
  """(first step's loss, last step's, mean of the last `tail` steps')."""
  steps = sorted(losses)
  last = steps[-tail:]
  return losses[steps[0]], losses[steps[-1]], sum(losses[s] for s in last) / len(last)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--init-from", required=True, help="the demo main job's workdir")
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..",
                                                       "configs", "demo.py"))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--tail", type=int, default=20, help="steps averaged at the end")
  parser.add_argument("--base-dtypes", default="int8", help="comma-separated (int8)")
  args = parser.parse_args(argv)
  print(machine_line(), flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for base_dtype in [""] + args.base_dtypes.split(","):
      config = run_config_for(args.init_from, args.steps, args.rank, base_dtype, args.config)
      results[base_dtype] = summary(train(config, os.path.join(tmp, base_dtype or "float")),
                                    args.tail)
  float_tail = results[""][2]
  print(f"\nLoRA rank {args.rank} on {', '.join(ALL_DECODER)}, {args.steps} steps from "
        f"{args.init_from}; loss: first step / last step / mean of the last {args.tail}")
  for base_dtype, (first, last, tail) in results.items():
    ratio = "" if not base_dtype else f"  ratio to float {tail / float_tail:.4f}"
    print(f"  base {base_dtype or 'float':6s} {first:.4f} / {last:.4f} / {tail:.4f}{ratio}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
