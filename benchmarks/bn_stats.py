"""How fast BatchNorm's training statistics are computed, against the memory bandwidth.

    python -m benchmarks.bn_stats --model resnet50 --batch 256 --dtype bf16
    python -m benchmarks.bn_stats --model resnet50 --batch 256 --dtype bf16 \\
        --ways flax,two_stage,pallas --shape_ways xla,two_stage,pallas

The H100 profile (RESULTS.md) shows the forward statistics of ResNet-50's BNs taking
about 3x the time of one read of their inputs. This times, for every BN input of the
model at `--batch` (random data, resident on the device), the per-channel mean and mean
of squares in float32 written in several equivalent ways, and reports ms for all BNs
together, the GB/s read and the largest relative difference from the first way:

- `flax`: what flax.linen.BatchNorm does (float32 mean of x and of x*x over N, H, W);
- `spatial_first`: sums over H and W per example, then over the batch;
- `blockedB`: the N*H*W rows split into blocks of B rows (each of `--blocks`), summed per
  block, then over the blocks (a two-stage tree the compiler may map better onto a GPU);
- `two_stage` and `pallas`: `resnet_jax.models.ops.channel_stats`'s ways, blocks of rows sized from
  each shape, and a Pallas kernel (Triton on a GPU, interpret mode on a CPU: slow).

First, as the ceiling, `read_ceiling`: one float32 sum of all of each input, a reduction
that only has to read. `--ways` picks the ways. Prints one `RESULT {json}` line per way.

Then, with `--shape_ways` (any of xla, two_stage, pallas), one row per distinct BN input
shape and way, that input's statistics alone: `shape`, `bn_layers` (BNs of that shape),
ms, GB/s, `speedup_vs_xla` and `max_rel_diff` against `xla`, and the Pallas `blocks`.
"""

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_throughput as tt
from resnet_jax import models
from resnet_jax.models.ops import channel_stats

Stats = tuple[jax.Array, jax.Array]
WAYS = ('read_ceiling', 'flax', 'spatial_first', 'blocked', 'two_stage', 'pallas')
DEFAULT_WAYS = 'read_ceiling,flax,spatial_first,blocked'


def layer_calls(model: models.ResNet, image: tuple[int, int, int]) -> list[tuple[nn.Module, tuple]]:
  """(module, shape of its input) of every module call in one training forward pass of
  `model` on one `image`-shaped example, in call order; traced, not computed."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      calls.append((context.module, args[0].shape))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, *image))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), variables)
  return calls


def bn_input_shapes(model: models.ResNet, shape: tuple[int, int, int], batch: int) -> list:
  """The shape of every BatchNorm's input in one training forward pass, at `batch`."""
  calls = layer_calls(model, shape)
  return [(batch, *x[1:]) for m, x in calls if isinstance(m, nn.BatchNorm)]


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


def time_ms(fn: Callable, xs: Any, windows: int, reps: int) -> float:
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


def make_ways(names: Sequence[str], blocks: Sequence[int]) -> dict[str, Callable]:
  """The ways named in `names` (of WAYS), `blocked` as one way per size in `blocks`."""
  fixed = {
    'read_ceiling': lambda x: (jnp.sum(x, dtype=jnp.float32)[None],) * 2,
    'flax': flax_stats,
    'spatial_first': spatial_first_stats,
    'two_stage': functools.partial(channel_stats.channel_means, impl='two_stage'),
    'pallas': functools.partial(channel_stats.channel_means, impl='pallas'),
  }
  ways = {}
  for name in names:
    if name == 'blocked':
      ways.update({f'blocked{b}': functools.partial(blocked_stats, block=b) for b in blocks})
    else:
      ways[name] = fixed[name]
  return ways


def activation(key: jax.Array, shape: tuple, dtype: jnp.dtype) -> jax.Array:
  # Means and spreads like a conv's output: the mean-square trick must cope with mean**2.
  return (1.0 + jax.random.normal(key, shape)).astype(dtype)


def max_rel_diff(flat: np.ndarray, reference: np.ndarray | None) -> float | None:
  if reference is None:
    return None
  return float(np.max(np.abs(flat - reference) / (np.abs(reference) + 1e-6)))


def all_bn_rows(
  shapes: list, dtype: jnp.dtype, ways: dict, a: argparse.Namespace
) -> Iterator[dict]:
  """One row per way: the statistics of every BN input together, in one jitted call."""
  keys = jax.random.split(jax.random.key(0), len(shapes))
  xs = [activation(k, s, dtype) for k, s in zip(keys, shapes, strict=True)]
  read_bytes = sum(x.size * x.dtype.itemsize for x in xs)
  reference = None
  for name, way in ways.items():
    fn = jax.jit(lambda xs, f=way: [f(x) for x in xs])
    ms = time_ms(fn, xs, a.windows, a.reps)
    stats = jax.device_get(fn(xs))
    flat = np.concatenate([np.concatenate(s) for s in stats])
    if name != 'read_ceiling':
      reference = flat if reference is None else reference
    yield {
      'way': name,
      'bn_layers': len(shapes),
      'read_gb': round(read_bytes / 1e9, 3),
      'ms': round(ms, 3),
      'gb_per_s': round(read_bytes / 1e9 / (ms / 1e3), 1),
      'max_rel_diff': max_rel_diff(flat, reference),
    }


def shape_rows(
  shapes: list, dtype: jnp.dtype, impls: Sequence[str], a: argparse.Namespace
) -> Iterator[dict]:
  """One row per distinct BN input shape and channel_stats impl, `xla` first as the base."""
  impls = sorted(impls, key=channel_stats.IMPLS.index)
  counts = collections.Counter(shapes)
  keys = jax.random.split(jax.random.key(1), len(counts))
  for key, (shape, count) in zip(keys, counts.items(), strict=True):
    x = activation(key, shape, dtype)
    read_bytes = x.size * x.dtype.itemsize
    blocks = channel_stats.choose_blocks(x.size // shape[-1], shape[-1])
    xla_ms = reference = None
    for impl in impls:
      fn = jax.jit(functools.partial(channel_stats.channel_means, impl=impl))
      ms = time_ms(fn, x, a.windows, a.reps)
      flat = np.concatenate(jax.device_get(fn(x)))
      if impl == 'xla':
        xla_ms, reference = ms, flat
      yield {
        'way': impl,
        'shape': list(shape),
        'bn_layers': count,
        'read_gb': round(read_bytes / 1e9, 6),
        'ms': round(ms, 4),
        'gb_per_s': round(read_bytes / 1e9 / (ms / 1e3), 1),
        'speedup_vs_xla': None if xla_ms is None else round(xla_ms / ms, 3),
        'max_rel_diff': max_rel_diff(flat, reference),
        'blocks': None if impl == 'xla' else dataclasses.asdict(blocks),
      }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image_size', type=int, default=None, help='default: models.default_input')
  p.add_argument('--dtype', choices=sorted(tt.DTYPES), default='bf16')
  p.add_argument('--ways', default=DEFAULT_WAYS, help=f'all BNs together: any of {WAYS}')
  p.add_argument('--blocks', default='256,2048,16384', help='rows per block, per blocked way')
  p.add_argument('--shape_ways', default='', help=f'per BN shape: any of {channel_stats.IMPLS}')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--reps', type=int, default=10)
  a = p.parse_args(argv)
  a.ways = _names(p, '--ways', a.ways, WAYS)
  a.shape_ways = _names(p, '--shape_ways', a.shape_ways, channel_stats.IMPLS)
  a.blocks = [int(b) for b in a.blocks.split(',')]
  return a


def _names(p: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> list:
  names = [n for n in text.split(',') if n]
  unknown = [n for n in names if n not in allowed]
  if unknown:
    p.error(f'{flag}: unknown {", ".join(unknown)}; use some of {", ".join(allowed)}')
  return names


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: RESULT lines for all BNs per way, then per shape and way."""
  a = parse_args(argv)
  dtype = jnp.dtype(tt.DTYPES[a.dtype])
  size, channels = models.default_input(a.model)
  size = a.image_size or size
  shapes = bn_input_shapes(models.build_model(a.model), (size, size, channels), a.batch)
  run = {'who': 'bn_stats', 'model': a.model, 'batch': a.batch, 'dtype': str(dtype)}
  device = {'device_kind': jax.devices()[0].device_kind}
  ways = make_ways(a.ways, a.blocks)
  rows = itertools.chain(
    all_bn_rows(shapes, dtype, ways, a) if ways else (),
    shape_rows(shapes, dtype, a.shape_ways, a),
  )
  for row in rows:
    print('RESULT ' + json.dumps({**run, **row, **device}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
