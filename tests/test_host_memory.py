"""resnet_jax.host_memory: a process that keeps freed host memory gives a large XLA buffer
the pages of the previous one instead of faulting in new ones every call."""

import sys

import pytest

from tests.helpers import run_python

# A small ResNet's gradient, whose 61 MB of temporaries XLA:CPU allocates as one block per
# call and frees at its end, as a train step's: the fewest minor page faults of a call
# after warm-up (the fewest: other allocations of a loaded machine can land in the freed
# block now and then, and one such call refaults part of it).
FAULTS_PER_CALL = """
import resource
from resnet_jax import commands  # the training command's package: sets up malloc first
import jax, jax.numpy as jnp
from resnet_jax import models

model = models.build_model('cifar_resnet20', stage_sizes=(1, 1, 1), conv_impl='xla')
x = jnp.ones((64, 32, 32, 3))
variables = model.init(jax.random.key(0), x[:1])

def loss(params):
  logits, _ = model.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
  return logits.sum()

grad = jax.jit(jax.grad(loss))
temp = grad.lower(variables['params']).compile().memory_analysis().temp_size_in_bytes
jax.block_until_ready(grad(variables['params']))
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(variables['params']))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(temp // 4096, min(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux')
def test_freed_xla_buffers_are_reused_not_refaulted():
  kept = run_python(FAULTS_PER_CALL)
  default = run_python(FAULTS_PER_CALL, RESNET_JAX_REUSE_HOST_MEMORY='0')
  assert kept.returncode == 0 and default.returncode == 0, kept.stderr + default.stderr
  pages, kept_faults = map(int, kept.stdout.split()[-2:])
  default_faults = int(default.stdout.split()[-1])
  # glibc's default maps the block afresh every call (a fault per 4 KiB page written);
  # kept memory is reused, so a call faults in almost nothing.
  assert default_faults > pages // 2, (default_faults, pages)
  assert kept_faults < pages // 8, (kept_faults, pages)


# A 2.5 GiB block written, freed and written again. Freed at the top of the heap, a block
# this large passes any positive trim threshold (mallopt takes an int, at most 2 GiB); the
# three 830 MB blocks that cifar_resnet56's steps left there were trimmed and refaulted so.
BIG_BLOCK_FAULTS = """
import ctypes, resource
from resnet_jax import commands  # the training command's package: sets up malloc first

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 5 << 29
faults = []
for _ in range(2):
  block = libc.malloc(size)
  assert block, 'malloc returned NULL'
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(block, 1, size)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(block)
print(size // 4096, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux')
def test_freed_memory_beyond_2_gib_is_kept():
  result = run_python(BIG_BLOCK_FAULTS)
  assert result.returncode == 0, result.stderr
  pages, first, second = map(int, result.stdout.split()[-3:])
  assert first > pages // 2, (first, pages)  # the first write faults the block in
  assert second < pages // 100, (second, pages)  # the second reuses it
