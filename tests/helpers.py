"""What several test files need: a fresh Python process on the CPU, its RESULT rows, a
training process's progress, a directory built once per test session, and the Triton
custom calls of a function lowered for CUDA on this GPU-less machine."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jax.experimental.pallas import triton as pltriton

from resnet_jax.training.metrics import read_metrics
from tests.process_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
TRITON_TARGET = getattr(pltriton, 'CUSTOM_CALL_TARGET_NAME', '__gpu$xla.gpu.triton')


def run_python(
  code: str, devices: int = 1, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess:
  """`code` in a fresh interpreter at the repo root, with exactly `devices` CPU devices."""
  # Set explicitly: the test session's XLA_FLAGS (8 devices) would otherwise be inherited.
  full_env = {
    **os.environ,
    'XLA_FLAGS': xla_flags(devices),
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': str(REPO),
    **env,
  }
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def result_rows(stdout: str) -> list[dict]:
  """The JSON rows of a benchmark's `RESULT {json}` lines."""
  return [
    json.loads(line[len('RESULT ') :]) for line in stdout.splitlines() if line.startswith('RESULT ')
  ]


def wait_for_step(
  workdir: str | Path, step: int, proc: subprocess.Popen, timeout: float = 120
) -> None:
  """Returns once `proc`, training into `workdir`, has logged a metrics row at `step` or
  later; fails if it exits first. Polls (every 50 ms, leaving the cores to `proc`), reading
  only complete rows: `proc` may be writing the last one."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()
    if any(row['step'] >= step for row in read_metrics(str(workdir))):
      return
    time.sleep(0.05)
  raise TimeoutError(f'step {step} not reached')


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
  """Directory NAME, filled by `build` once per test session and then only read.

  A session fixture runs once per pytest-xdist worker; the trained workdirs several test
  files read cost a minute each, so the workers share one: the first builds it under a
  lock, the others wait and reuse it.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # the session's folder, above each worker's own
  path = root / name
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f'{name}.built').exists():
      shutil.rmtree(path, ignore_errors=True)  # what a failed build left
      path.mkdir()
      build(path)
      (root / f'{name}.built').touch()
  return path


def triton_calls(fn, *args) -> int:
  """How many Triton custom calls jitted `fn` has when lowered for CUDA with `args`.

  Lowering for CUDA on a CPU machine builds the Triton IR, which catches unsupported
  primitives and non-power-of-two loads; only compiling it to PTX needs the GPU. Skips
  the test where this jax lowers Pallas to Triton only with a GPU present.
  """
  try:
    text = fn.trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  except RuntimeError as e:
    if 'No supported GPU devices' in str(e):
      pytest.skip('this jax lowers Pallas to Triton only with a GPU present')
    raise
  return text.count(f'@{TRITON_TARGET}(')
