"""Peak host memory and throughput of `python -m cogvlm_jax.convert` on a multi-GB checkpoint.

    python benchmarks/convert_memory.py                 # ~2.2 GB bf16, 5 shards
    python benchmarks/convert_memory.py --layers 16     # bigger

1. Generates a Hugging Face CogVLM folder with the real tensor names and layout (a scaled-down
   CogVLM: hidden 2048, 8 decoder layers, 8 ViT layers, vocab 32000 by default), random bf16
   weights, sharded at --shard-size with `model.safetensors.index.json`.
2. Runs, each in a fresh child process that reports its own peak RSS (VmHWM):
   * ``baseline``  — the converter's imports only (Python + JAX + Orbax), no work;
   * ``plain read`` — `safetensors.safe_open(..., "pt")` reading every tensor of the same files;
   * ``plain copy`` — copying the same files with 64 MB reads and writes (read + write floor);
   * ``to-jax``    — the converter, HF -> cogvlm_jax checkpoint;
   * ``to-hf``     — the converter, back to a Hugging Face folder.
3. Checks the round trip is bit-exact (tensor by tensor) and prints peak RSS / checkpoint size
   (goal <= 0.35) and MB/s next to the plain read.

All files were just written, so every job reads from the page cache; the comparison between
jobs is fair, absolute MB/s on a cold disk will be lower. The plain read's RSS includes the
file pages it memory-maps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import ROOT, machine_line  # noqa: E402  (puts the repository root on sys.path)

# The child: run one job, then print its peak RSS (bytes) and wall time as the last line.
# Linux only (/proc/self/status).
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
job, args = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
if job == "baseline":
  import jax, orbax.checkpoint, cogvlm_jax.convert.pipeline  # noqa: F401
  t0 = time.perf_counter()
elif job == "plain":
  import safetensors, torch  # noqa: F401  (safe_open(..., "pt") needs torch)
  nbytes = 0
  t0 = time.perf_counter()
  for path in args:
    with safetensors.safe_open(path, framework="pt") as f:
      for name in f.keys():
        # get_tensor may hand out a lazy view of the memory map; clone() reads every byte.
        t = f.get_tensor(name).clone()
        nbytes += t.numel() * t.element_size()
        del t
elif job == "copy":
  # Read + write the same bytes with 64 MB buffers: the floor for any conversion here.
  t0 = time.perf_counter()
  dst = args[0]
  os.makedirs(dst)
  for path in args[1:]:
    with open(path, "rb", buffering=0) as f, open(os.path.join(dst, os.path.basename(path)),
                                                  "wb", buffering=0) as g:
      while chunk := f.read(64 << 20):
        g.write(chunk)
else:
  import cogvlm_jax.convert.pipeline  # noqa: F401  (import time is not conversion time)
  from cogvlm_jax.convert.__main__ import main
  t0 = time.perf_counter()
  rc = main([job] + args + ["--quiet"])
  if rc:
    sys.exit(rc)
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak RSS. (ru_maxrss is not reset by exec on Linux, so a child
# would report at least its parent's RSS at fork time.)
with open("/proc/self/status") as f:
  hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({{"peak_rss": hwm, "seconds": seconds}}))
"""


def bench_config(layers: int, vision_layers: int):
  from cogvlm_jax.config import preset

  return preset("cogvlm-chat-17b", hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                vision=dict(hidden_size=1024, num_hidden_layers=vision_layers, num_heads=16,
                            intermediate_size=4096, image_size=224))


def generate(folder: str, cfg, shard_size: int, seed: int = 0) -> int:
  """Writes config.json + sharded bf16 safetensors in the original order; returns bytes."""
  import ml_dtypes

  from cogvlm_jax.convert.mapping import tensor_rules
  from cogvlm_jax.convert.safetensors_io import ShardedSafetensorsWriter

  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(torch_dtype="bfloat16"), f, indent=2)
  rules = tensor_rules(cfg)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  writer = ShardedSafetensorsWriter(folder, [(r.hf_name, r.hf_shape, bf16) for r in rules],
                                    shard_size)
  rng = np.random.default_rng(seed)
  for r in rules:
    # Random bf16 bit patterns with magnitudes ~1e-3..1 and random signs (fast to make).
    bits = rng.integers(0x3A80, 0x3F80, size=r.hf_shape, dtype=np.uint16)
    bits |= (rng.integers(0, 2, size=r.hf_shape, dtype=np.uint16) << 15)
    writer.write(r.hf_name, bits.view(bf16))
    del bits
  writer.close()
  return sum(int(np.prod(r.hf_shape)) * 2 for r in rules)


def run_child(job: str, args: list[str]) -> dict:
  proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), job, *args],
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{job} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(a: str, b: str) -> int:
  """Bit-exact comparison of two Hugging Face folders, one tensor at a time."""
  from cogvlm_jax.convert.safetensors_io import SafetensorsCheckpoint

  x, y = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
  assert sorted(x.names()) == sorted(y.names()), "tensor names differ"
  for name in x.names():
    p, q = x.get(name), y.get(name)
    assert p.dtype == q.dtype and p.shape == q.shape, name
    assert p.tobytes() == q.tobytes(), f"{name} differs"
  x.close()
  y.close()
  return len(x.names())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=8, help="decoder layers")
  parser.add_argument("--vision-layers", type=int, default=8, help="ViT layers")
  parser.add_argument("--shard-size", default="500MB", help="shard size of the generated input")
  parser.add_argument("--workdir", default=None, help="where to generate (default: a tmp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the generated files")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny-cogvlm instead (a smoke test of this script, not a benchmark)")
  args = parser.parse_args()
  print(machine_line())

  from cogvlm_jax.config import preset
  from cogvlm_jax.convert.safetensors_io import parse_size

  cfg = preset("tiny-cogvlm") if args.tiny else bench_config(args.layers, args.vision_layers)
  work = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
  os.makedirs(work, exist_ok=True)
  src, jax_dir, back = (os.path.join(work, n) for n in ("hf", "jax", "hf_back"))
  for d in (src, jax_dir, back, os.path.join(work, "copy")):
    shutil.rmtree(d, ignore_errors=True)
  try:
    t0 = time.perf_counter()
    size = generate(src, cfg, parse_size(args.shard_size))
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    print(f"generated {size / 1e9:.2f} GB in {len(shards)} shards ({time.perf_counter() - t0:.0f}s)"
          f": {cfg.num_hidden_layers} decoder layers, hidden {cfg.hidden_size}, "
          f"{cfg.vision.num_hidden_layers} ViT layers -> {src}")
    if size < 2e9 and not args.tiny:
      print("WARNING: below the 2 GB the benchmark is meant for; raise --layers")

    results = {
        "baseline": run_child("baseline", []),
        "plain read": run_child("plain", [os.path.join(src, s) for s in shards]),
        "plain copy": run_child("copy", [os.path.join(work, "copy")] +
                                [os.path.join(src, s) for s in shards]),
        "to-jax": run_child("to-jax", ["--src", src, "--dst", jax_dir]),
        "to-hf": run_child("to-hf", ["--src", jax_dir, "--dst", back]),
    }
    n = verify(src, back)
    print(f"round trip bit-exact: {n} tensors")

    base = results["baseline"]["peak_rss"]
    plain_rate = size / 1e6 / results["plain read"]["seconds"]
    print(f"\ncheckpoint: {size / 1e6:,.0f} MB; baseline RSS (imports only): {base / 1e6:,.0f} MB")
    print(f"{'job':<11} {'time s':>7} {'MB/s':>8} {'vs plain':>8} {'peak RSS MB':>12} "
          f"{'RSS/ckpt':>9} {'(RSS-base)/ckpt':>16}")
    for job, r in results.items():
      if job == "baseline":
        continue
      rate = size / 1e6 / r["seconds"]
      print(f"{job:<11} {r['seconds']:7.1f} {rate:8.0f} {rate / plain_rate:8.2f} "
            f"{r['peak_rss'] / 1e6:12,.0f} {r['peak_rss'] / size:9.3f} "
            f"{(r['peak_rss'] - base) / size:16.3f}")
    worst = max(results[j]["peak_rss"] for j in ("to-jax", "to-hf")) / size
    print(f"\npeak RSS / checkpoint size: {worst:.3f} (goal <= 0.35): "
          f"{'OK' if worst <= 0.35 else 'ABOVE GOAL'}")
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
