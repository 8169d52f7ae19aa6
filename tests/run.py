"""The test suite as CI runs it: `python tests/run.py [pytest options]`.

Each part runs in a pytest process of its own, since the number of host devices and
oneDNN's instruction set are fixed when a process starts:

1. every test not marked `mesh`, on one host device, where `conv_impl=auto` runs oneDNN's
   convolutions (over several devices in one process it keeps XLA's, 2-4x slower);
2. the tests marked `mesh` (sharded steps, meshes, device-count changes) on 8 devices;
3. the oneDNN tests (marked `onednn`) again under ONEDNN_MAX_CPU_ISA=AVX2 and SSE41, so a
   machine with AVX-512 also runs the kernels that an AVX2 laptop and an SSE4.1 CPU get.

Each part spreads its tests over one pytest-xdist worker per core. Options (e.g. `-q`,
`-x`, `-k conv`, `-n 1` for one worker) go to every part. A part that fails, or collects no
test, fails the run; every part runs either way.

The parts share one persistent XLA compilation cache (fresh per run, removed after it), so
a part loads what an earlier part with its device count compiled (the oneDNN parts: the
8-device part's and each other's programs). That is sound across ISAs: a cached program
calls oneDNN by name, and oneDNN picks its kernels for the part's ISA when it is traced.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from process_env import xla_flags  # tests/, this script's folder, is first on sys.path

PARTS = (
  ('one device', 'not mesh', {'XLA_FLAGS': xla_flags(1)}),
  ('8 devices', 'mesh', {'XLA_FLAGS': xla_flags(8)}),
  *(
    (f'oneDNN at {isa}', 'onednn', {'XLA_FLAGS': xla_flags(8), 'ONEDNN_MAX_CPU_ISA': isa})
    for isa in ('AVX2', 'SSE41')
  ),
)  # fmt: skip
NO_TESTS = 5  # pytest's exit status when it collected nothing
# pytest-xdist workers per part, one per core: most tests wait on one compiling or starting
# thread (a main.py subprocess, XLA's compiler), so two run at once on 2 cores. A worker
# that runs out of tests takes some of another's (worksteal), instead of idling while the
# other works through its share.
WORKERS = ('-n', 'auto', '--dist', 'worksteal')


def main(args: list[str]) -> int:
  cache = None
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # else the caller's cache is used
    cache = tempfile.mkdtemp(prefix='resnet_jax_test_xla_')
  try:
    return _run_parts(args, {'JAX_COMPILATION_CACHE_DIR': cache} if cache else {})
  finally:
    if cache:
      shutil.rmtree(cache, ignore_errors=True)


def _run_parts(args: list[str], cache_env: dict[str, str]) -> int:
  failed = []
  for name, markers, env in PARTS:
    print(f'== {name}: pytest -m "{markers}"', flush=True)
    start = time.monotonic()
    cmd = [sys.executable, '-m', 'pytest', '-m', markers, *WORKERS, *args]
    status = subprocess.run(cmd, env={**os.environ, **cache_env, **env}, check=False).returncode
    outcome = 'passed' if status == 0 else f'FAILED (pytest exit status {status})'
    if status == NO_TESTS:
      outcome = 'FAILED: no tests collected'
    print(f'== {name}: {outcome} in {time.monotonic() - start:.0f} s', flush=True)
    if status != 0:
      failed.append(name)
  if failed:
    print(f'== failed: {", ".join(failed)}', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
