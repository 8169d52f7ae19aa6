"""Keep freed host memory in the process, so XLA:CPU's per-step buffers are not re-faulted.

XLA:CPU allocates each execution's temporaries as one block (300 MB for the
`cifar_resnet20` step at batch 128) with `posix_memalign` from a worker thread, and frees
it when the step ends. glibc serves a block that large from a fresh `mmap` (a worker
thread's arena cannot hold it) and returns it with `munmap`, so every step touches 300 MB
of new pages: 73,000 page faults a step, a quarter of that step's time on a 2-core Xeon
(285 -> 207 ms with this module; figures in benchmarks/RESULTS.md).

`reuse_freed_memory()` sets glibc's malloc to serve every thread from the main heap,
never to `mmap` a block and not to trim freed memory back to the OS, so the block of the
previous step is handed out again. The process keeps its high-water mark of host memory
instead of returning it between steps; over the first steps the heap grows until its freed
blocks hold a step's temporaries (for `cifar_resnet56` at batch 128, 830 MB blocks, up to
four growths by the 8th step, each faulting its block in). Call it first thing in a
process, before jax (or anything else) starts threads: a thread that has already picked
its own heap keeps it.
Elsewhere than Linux with glibc it does nothing.
"""

import ctypes
import os
import sys

# mallopt(3) parameters, glibc malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# A trim threshold of -1 turns trimming off (mallopt(3)); glibc reads it as SIZE_MAX. The
# largest positive int, 2 GiB, is not enough: cifar_resnet56's step frees an 830 MB block,
# and a heap that held two or three of them trimmed 2.3 GB and faulted it back in.
_NEVER = -1
DISABLE_ENV = 'RESNET_JAX_REUSE_HOST_MEMORY'  # set to 0 to keep glibc's defaults


def reuse_freed_memory() -> bool:
  """Tell glibc's malloc to keep and reuse freed memory (see the module docstring);
  True where it took effect."""
  if not sys.platform.startswith('linux') or os.environ.get(DISABLE_ENV, '1') == '0':
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  return all(mallopt(param, value) == 1 for param, value in settings)
