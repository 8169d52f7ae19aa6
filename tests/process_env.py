"""XLA_FLAGS for the processes of the test suite (imports nothing: conftest reads it
before jax starts)."""

# XLA's CPU backend compiles at LLVM -O3 unless told otherwise. The suite compiles ~120
# train and eval steps and runs a few steps of each; at -O2 a cold start compiles with
# less CPU, and a step takes as long (benchmarks/RESULTS.md). No -O level turns on
# fast-math, so results are the same to the bit.
OPT_LEVEL = '--xla_backend_optimization_level=2'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {OPT_LEVEL}'
