"""Benchmarks start from a fresh clone as their docstrings say (`python benchmarks/X.py`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _common  # noqa: E402


def test_cpu_info_reads_model_and_avx512():
  text = ("processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
          "flags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
          "flags\t\t: avx512f\n")
  assert _common.cpu_info(text) == ("AMD EPYC 7B13 64-Core Processor", False)
  assert _common.cpu_info("model name : Xeon\nflags : sse avx512f avx512bw\n") == ("Xeon", True)
  assert _common.cpu_info("") == ("unknown", False)


@pytest.mark.parametrize("script", ["decode.py", "train_step.py", "input_pipeline.py",
                                    "convert_memory.py", "qlora_quality.py"])
def test_benchmark_imports_without_pythonpath(script, tmp_path):
  # Run from another folder with no PYTHONPATH: only the script's own path setup can make
  # cogvlm_jax / tests.reference importable. --help exits after the module-level imports.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "usage" in proc.stdout
