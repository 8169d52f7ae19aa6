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
"""

import os
import subprocess
import sys
import time

PARTS = (
  ('one device', 'not mesh', {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}),
  ('8 devices', 'mesh', {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}),
  *(
    (f'oneDNN at {isa}', 'onednn', {
      'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'ONEDNN_MAX_CPU_ISA': isa,
    })
    for isa in ('AVX2', 'SSE41')
  ),
)  # fmt: skip
NO_TESTS = 5  # pytest's exit status when it collected nothing
# pytest-xdist workers per part, one per core: most tests wait on one compiling or starting
# thread (a main.py subprocess, XLA's compiler), so two run at once on 2 cores.
WORKERS = 'auto'


def main(args: list[str]) -> int:
  failed = []
  for name, markers, env in PARTS:
    print(f'== {name}: pytest -m "{markers}"', flush=True)
    start = time.monotonic()
    cmd = [sys.executable, '-m', 'pytest', '-m', markers, '-n', WORKERS, *args]
    status = subprocess.run(cmd, env={**os.environ, **env}, check=False).returncode
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
