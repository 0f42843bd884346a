"""README's full-size TPU table: every recipe compiled by the TPU compiler for 4 slices.

    python benchmarks/tpu_table.py --list              # the exact plan command of each row
    python benchmarks/tpu_table.py [--rows stage1,sft] [--topologies v5e-256] [--eval]
    python benchmarks/tpu_table.py --table             # the table from the results so far
    python benchmarks/tpu_table.py --missing           # the commands of the rows not run yet

Each row is one `python -m cogvlm_jax.plan --config CFG --topology NAME [settings] --json F`
run (libtpu loaded by path; no TPU, no weights), started with `nice -n 19`, one at a time
(a full-size compile holds several GB and both cores of a small machine for minutes), its
output in LOGDIR/<row>__<topology>.log and its numbers in LOGDIR/<row>__<topology>.json. A
row already measured is skipped unless --force. `--table` prints the markdown table of
every JSON found.

Settings: a recipe's `train.grad_accum_steps` is chosen for 64 data-parallel chips (v5p-128,
v4-128). On the 256-chip slices (v5e-256, v6e-256) each chip holds a quarter of the rows, so
a quarter of the microbatches (at least 1) keeps the rows per microbatch per chip
(`--config.train.grad_accum_steps=N`): the table's "settings" column names them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common  # noqa: F401  (the repository on sys.path)

ROOT = _common.ROOT
TOPOLOGIES = ("v5p-128", "v5e-256", "v6e-256", "v4-128")

# name -> (label, config, plan flags, microbatches on 64 chips)
ROWS = {
    "stage1": ("CogVLM stage 1 (224 px, 8192 x 384)", "configs/cogvlm_stage1.py", [], 32),
    "stage2_224": ("CogVLM stage 2 before the switch (224 px, 1024 x 384)",
                   "configs/cogvlm_stage2.py", [], 1),
    "stage2_490": ("CogVLM stage 2 after the switch (490 px, 1024 x 1360)",
                   "configs/cogvlm_stage2.py", ["--after_switch"], 4),
    "sft": ("CogVLM SFT (490 px, 1024 x 2048)", "configs/cogvlm_sft.py", [], 16),
    "grounding": ("CogVLM grounding SFT (490 px, 1024 x 1360)",
                  "configs/cogvlm_grounding_sft.py", [], 16),
    "cogvlm2_sft": ("CogVLM2 SFT (1344 px, 256 x 4096)", "configs/cogvlm2_sft.py", [], 4),
    "cogagent_gui": ("CogAgent GUI SFT (224 + 1120 px, 1024 x 2048)",
                     "configs/cogagent_gui_sft.py", [], 16),
}


def chips(topology: str) -> int:
  from cogvlm_jax import plan
  return plan.parse_topology(topology)["chips"]


def settings(row: str, topology: str) -> list[str]:
  """The plan flags of a row beyond the config: fewer microbatches where a slice has more
  chips than the recipe's 64 (the same rows per microbatch per chip)."""
  _, _, flags, accum = ROWS[row]
  n = chips(topology)
  flags = list(flags)
  if n > 64 and accum > 1:
    new = max(1, accum * 64 // n)
    field = ("train.resolution_switch.grad_accum_steps" if "--after_switch" in flags
             else "train.grad_accum_steps")
    flags.append(f"--config.{field}={new}")
  return flags


def command(row: str, topology: str, logdir: str, with_eval: bool) -> list[str]:
  _, config, _, _ = ROWS[row]
  cmd = ["nice", "-n", "19", sys.executable, "-m", "cogvlm_jax.plan", "--config", config,
         "--topology", topology, *settings(row, topology),
         "--json", os.path.join(logdir, f"{row}__{topology}.json")]
  return cmd + (["--eval"] if with_eval else [])


def table(logdir: str) -> str:
  """Markdown rows of every result JSON in logdir (README's table); an eval / generate
  column when some row ran with --eval."""
  results = []
  for row in ROWS:
    for topology in TOPOLOGIES:
      path = os.path.join(logdir, f"{row}__{topology}.json")
      if os.path.exists(path):
        with open(path) as f:
          results.append((row, topology, json.load(f)))
  with_eval = any("eval" in r for _, _, r in results)
  head = ["recipe", "slice", "settings", "GiB per chip (HBM)", "fits", "compile",
          "ideal step (100% MFU)"] + (["eval / generate"] if with_eval else [])
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row, topology, r in results:
    t = r["train"]
    extra = " ".join(settings(row, topology))
    step = next(iter(r["ideal_step_s"].values()))
    fits = "yes" if t["fits"] else f"no (largest buffer `{t.get('largest_buffer', '?')}`)"
    cells = [ROWS[row][0], topology, f"`{extra}`" if extra else "as the config",
             f"{t['memory_per_device']['total'] / 2**30:.2f} ({r['hbm_gib']})", fits,
             f"{t['compile_s']:.0f} s", f"{step:.2f} s"]
    if with_eval:
      e = r.get("eval")
      cells.append("not run" if e is None else (
          f"{e['memory_per_device']['total'] / 2**30:.2f} GiB, "
          f"{'fits' if e['fits'] else 'does not fit'}, compiled in {e['compile_s']:.0f} s"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--logdir", default="/tmp/tpu_table")
  parser.add_argument("--eval", action="store_true", help="also plan --eval")
  parser.add_argument("--force", action="store_true", help="rerun rows already measured")
  parser.add_argument("--dump", action="store_true", help="XLA dumps of each train step "
                      "(LOGDIR/dump/ROW__TOPOLOGY/*memory-usage-report.txt: its largest buffers)")
  parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--table", action="store_true", help="print the table, run nothing")
  parser.add_argument("--missing", action="store_true",
                      help="print the commands of the rows not measured yet, run nothing")
  args = parser.parse_args(argv)
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
  topologies = [t for t in args.topologies.split(",") if t]
  if args.table:
    print(table(args.logdir))
    return 0
  os.makedirs(args.logdir, exist_ok=True)
  for row in rows:
    for topology in topologies:
      cmd = command(row, topology, args.logdir, args.eval)
      result = os.path.join(args.logdir, f"{row}__{topology}.json")
      if args.list or (args.missing and not os.path.exists(result)):
        print(" ".join(cmd[3:]).replace(sys.executable, "python"))
        continue
      if args.missing:
        continue
      if os.path.exists(result) and not args.force:
        print(f"{row} {topology}: measured ({result})")
        continue
      log = os.path.join(args.logdir, f"{row}__{topology}.log")
      t0 = time.time()
      env = dict(os.environ)
      if args.dump:  # XLA's buffer assignment and memory-usage report of the train step
        dump = os.path.join(args.logdir, "dump", f"{row}__{topology}")
        env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} "
                            "--xla_dump_hlo_module_re=train_step").strip()
      with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT).returncode
      print(f"{row} {topology}: exit {status} in {time.time() - t0:.0f} s ({log})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
