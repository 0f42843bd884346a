"""The same training run on 1 device, on 8 devices, and on 2 processes x 4 CPU devices
(gloo collectives on localhost) gives the same losses.

Run as a script, this file is one worker: `python test_train_multiprocess.py DATA WORKDIR
NUM_DEVICES [PROCESS_ID NUM_PROCESSES PORT]`; it prints the losses as JSON.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _worker(data_dir, workdir, num_devices, pid=0, nproc=1, port=0):
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)
  import jax
  if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
  from cogvlm_jax.training import loop
  from tests.helpers import tiny_config
  # host_data="rows": every process reads the global batch stream and keeps its rows, so
  # the batches do not depend on the process count.
  config = tiny_config(data_dir, steps=STEPS, log_every=1, checkpoint_every=100,
                       tensorboard=False, host_data="rows")
  result = loop.train_and_evaluate(config, workdir, evaluate_at_end=False)
  if jax.process_index() == 0:
    print("LOSSES " + json.dumps({str(k): v for k, v in result["losses"].items()}), flush=True)


def _run(args, **popen):
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          **popen)


def _losses(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  line = next(l for l in out.splitlines() if l.startswith("LOSSES "))
  return {int(k): v for k, v in json.loads(line[len("LOSSES "):]).items()}


@pytest.mark.slow
def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
  import numpy as np
  from tests.helpers import SMALL_SPEC
  from cogvlm_jax.data import demo
  data_dir = str(tmp_path / "data")
  demo.ensure_demo_data(data_dir, demo.DemoSpec(**SMALL_SPEC), verbose=False)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = {
      "1x1": [_run([data_dir, tmp_path / "one", 1])],
      "1x8": [_run([data_dir, tmp_path / "eight", 8])],
      "2x4": [_run([data_dir, tmp_path / "two", 4, pid, 2, port]) for pid in (0, 1)],
  }
  losses = {}
  for name, ps in procs.items():
    losses[name] = _losses(ps[0])
    for p in ps[1:]:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
  assert sorted(losses["1x8"]) == list(range(1, STEPS + 1))
  for name in ("1x1", "2x4"):
    assert sorted(losses[name]) == sorted(losses["1x8"])
    np.testing.assert_allclose([losses[name][s] for s in sorted(losses[name])],
                               [losses["1x8"][s] for s in sorted(losses["1x8"])], rtol=2e-5,
                               err_msg=name)


if __name__ == "__main__":
  a = sys.argv[1:]
  _worker(a[0], a[1], int(a[2]), *(int(x) for x in a[3:]))
