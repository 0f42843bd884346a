"""Weight conversion between Hugging Face CogVLM/CogVLM2 checkpoints and cogvlm_jax.

    python -m cogvlm_jax.convert to-jax --src HF_DIR --dst OUT_DIR [--dtype bfloat16]
    python -m cogvlm_jax.convert to-hf  --src OUT_DIR_OR_TRAIN_WORKDIR --dst HF_DIR \
        [--dtype bfloat16] [--max-shard-size 5GB]

to-jax reads `config.json` plus `*.safetensors` or PyTorch `*.bin` (single, or sharded with an
index) and writes a cogvlm_jax weights checkpoint (an Orbax step directory, see
`cogvlm_jax/checkpoint.py`) that `from_pretrained`, `load_params` and training read. to-hf
writes `config.json` and sharded `model-*.safetensors` with `model.safetensors.index.json`,
with the original tensor names, shapes and dtypes, from such a checkpoint or from a training
run (a workdir: latest step; or `WORKDIR/checkpoints/<step>`).

Exit status 0 on success, 1 on bad input (with a one-line `error: ...` naming the tensor, file
or field; --debug shows the traceback), 130 when interrupted; nothing is left at the
destination unless the conversion completed, and staging folders of killed earlier runs
(`DST.tmp-PID`) are removed.
"""

from __future__ import annotations

import argparse
import sys

from cogvlm_jax.cli import DEBUG_HELP
from cogvlm_jax.convert import lora as lora_cli
from cogvlm_jax.convert.pipeline import DTYPE_CHOICES


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m cogvlm_jax.convert",
      description="Convert CogVLM/CogVLM2 weights between Hugging Face and cogvlm_jax.")
  sub = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--src", required=True, help="source folder")
  common.add_argument("--dst", required=True, help="destination folder (must not exist)")
  common.add_argument("--overwrite", action="store_true",
                      help="replace an existing destination (only once the new one is done)")
  common.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                      help="cast floating weights to this dtype (default: keep as stored)")
  common.add_argument("--quiet", action="store_true", help="no progress bar")
  common.add_argument("--debug", action="store_true", help=DEBUG_HELP)
  sub.add_parser("to-jax", parents=[common],
                 help="Hugging Face folder -> cogvlm_jax checkpoint")
  to_hf = sub.add_parser("to-hf", parents=[common],
                         help="cogvlm_jax checkpoint or training run -> Hugging Face folder")
  to_hf.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
  lora_cli.add_parsers(sub, common)  # merge-lora, to-peft (convert/lora.py)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  # Imported after parsing so --help is fast (JAX and Orbax take seconds to import).
  from absl import logging as absl_logging

  from cogvlm_jax import cli

  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every step at INFO/WARNING
  return cli.run_main(lambda: _convert(args), debug=args.debug, bad_input_code=1)


def _convert(args) -> None:
  """Runs the conversion `args` ask for and prints its summary line."""
  from cogvlm_jax.convert import pipeline

  if args.command in lora_cli.COMMANDS:
    print(lora_cli.run(args))
    return
  if args.command == "to-jax":
    summary = pipeline.to_jax(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype,
                              progress=not args.quiet)
  else:
    summary = pipeline.to_hf(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, progress=not args.quiet)
  print(summary.line())

if __name__ == "__main__":
  sys.exit(main())
