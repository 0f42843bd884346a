"""What every benchmark needs first: the repository on `sys.path` and a line naming the machine.

`python benchmarks/X.py` puts `benchmarks/` (not the repository root) on `sys.path`, so
`import _common` at the top of a benchmark makes `cogvlm_jax` and `tests.reference`
importable from a fresh clone without installing anything. The machine line goes first in
every benchmark's output because ratios differ between CPUs (AVX-512 or not changes the
matmul peak of both JAX and PyTorch, not by the same factor).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def cpu_info(text: str) -> tuple[str, bool]:
  """(CPU model name, has AVX-512) from the text of /proc/cpuinfo ("unknown", False if absent)."""
  model, flags = "unknown", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model == "unknown":
      model = " ".join(value.split())
    elif key == "flags" and not flags:
      flags = set(value.split())
  return model, "avx512f" in flags


def machine_line() -> str:
  """One line: CPU model, AVX-512 yes/no, cores usable here and the 1-minute load average."""
  try:
    with open("/proc/cpuinfo") as f:
      model, avx512 = cpu_info(f.read())
  except OSError:  # not Linux
    model, avx512 = "unknown", False
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"machine: {model}, AVX-512 {'yes' if avx512 else 'no'}, {cores} cores, "
          f"load average {load:.1f} at start")
