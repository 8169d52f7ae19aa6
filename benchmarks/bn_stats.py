"""How fast BatchNorm's training statistics are computed, against the memory bandwidth.

    python -m benchmarks.bn_stats --model resnet50 --batch 256 --dtype bf16

The H100 profile (RESULTS.md) shows the forward statistics of ResNet-50's BNs taking
about 3x the time of one read of their inputs. This times, for every BN input of the
model at `--batch` (random data, resident on the device), the per-channel mean and mean
of squares in float32 written in several equivalent ways, and reports ms for all BNs
together, the GB/s read and the largest relative difference from the first way:

- `flax`: what flax.linen.BatchNorm does (float32 mean of x and of x*x over N, H, W);
- `spatial_first`: sums over H and W per example, then over the batch;
- `blockedB`: the N*H*W rows split into blocks of B rows (each of `--blocks`), summed per
  block, then over the blocks (a two-stage tree the compiler may map better onto a GPU).

First, as the ceiling, `read_ceiling`: one float32 sum of all of each input, a reduction
that only has to read. Prints one `RESULT {json}` line per way.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_throughput as tt
from resnet_jax import models

Stats = tuple[jax.Array, jax.Array]


def bn_input_shapes(model: models.ResNet, shape: tuple[int, int, int], batch: int) -> list:
  """The shape of every BatchNorm's input in one training forward pass, at `batch`."""
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      shapes.append((batch, *args[0].shape[1:]))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, *shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), variables)
  return shapes


def flax_stats(x: jax.Array) -> Stats:
  x = x.astype(jnp.float32)
  return jnp.mean(x, axis=(0, 1, 2)), jnp.mean(x * x, axis=(0, 1, 2))


def spatial_first_stats(x: jax.Array) -> Stats:
  x = x.astype(jnp.float32)
  count = x.shape[0] * x.shape[1] * x.shape[2]
  s1, s2 = jnp.sum(x, axis=(1, 2)), jnp.sum(x * x, axis=(1, 2))
  return jnp.sum(s1, axis=0) / count, jnp.sum(s2, axis=0) / count


def blocked_stats(x: jax.Array, block: int) -> Stats:
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  block = next(b for b in range(min(block, rows.shape[0]), 0, -1) if rows.shape[0] % b == 0)
  blocks = rows.reshape(-1, block, rows.shape[-1])
  s1, s2 = jnp.sum(blocks, axis=1), jnp.sum(blocks * blocks, axis=1)
  return jnp.sum(s1, axis=0) / rows.shape[0], jnp.sum(s2, axis=0) / rows.shape[0]


def time_ms(fn: Callable, xs: list, windows: int, reps: int) -> float:
  """Median over `windows` of the mean ms of `reps` calls, after a warm-up call."""
  jax.block_until_ready(fn(xs))
  times = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(xs)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps * 1e3)
  return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: one RESULT line per way of computing the statistics."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image_size', type=int, default=None, help='default: models.default_input')
  p.add_argument('--dtype', choices=sorted(tt.DTYPES), default='bf16')
  p.add_argument('--blocks', default='256,2048,16384', help='rows per block, per blocked way')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--reps', type=int, default=10)
  a = p.parse_args(argv)
  ways = {
    'read_ceiling': lambda x: (jnp.sum(x, dtype=jnp.float32)[None],) * 2,
    'flax': flax_stats,
    'spatial_first': spatial_first_stats,
  }
  for block in map(int, a.blocks.split(',')):
    ways[f'blocked{block}'] = lambda x, block=block: blocked_stats(x, block)
  dtype = jnp.dtype(tt.DTYPES[a.dtype])
  size, channels = models.default_input(a.model)
  size = a.image_size or size
  shapes = bn_input_shapes(models.build_model(a.model), (size, size, channels), a.batch)
  keys = jax.random.split(jax.random.key(0), len(shapes))
  # Means and spreads like a conv's output: the mean-square trick must cope with mean**2.
  xs = [(1.0 + jax.random.normal(k, s)).astype(dtype) for k, s in zip(keys, shapes, strict=True)]
  read_bytes = sum(x.size * x.dtype.itemsize for x in xs)
  reference = None
  for name, way in ways.items():
    fn = jax.jit(lambda xs, f=way: [f(x) for x in xs])
    ms = time_ms(fn, xs, a.windows, a.reps)
    stats = jax.device_get(fn(xs))
    flat = np.concatenate([np.concatenate(s) for s in stats])
    if name != 'read_ceiling':
      reference = flat if reference is None else reference
    row = {
      'who': 'bn_stats',
      'way': name,
      'model': a.model,
      'batch': a.batch,
      'dtype': str(dtype),
      'bn_layers': len(shapes),
      'read_gb': round(read_bytes / 1e9, 3),
      'ms': round(ms, 3),
      'gb_per_s': round(read_bytes / 1e9 / (ms / 1e3), 1),
      'max_rel_diff': None
      if reference is None
      else float(np.max(np.abs(flat - reference) / (np.abs(reference) + 1e-6))),
      'device_kind': jax.devices()[0].device_kind,
    }
    print('RESULT ' + json.dumps(row), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
