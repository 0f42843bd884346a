import os
import sys

# Simulate 8 CPU devices so sharding tests run on a laptop or CI machine. XLA reads this flag
# once, when the JAX backend starts, so it must be set before anything imports jax; pytest
# imports this conftest before any test module. A device count set by the user is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
