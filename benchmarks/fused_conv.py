"""The fused 1x1 convolution (BN prologue, statistics epilogue) against XLA, per ResNet-50 shape.

    python -m benchmarks.fused_conv --batch 256 --dtype bf16
    python -m benchmarks.fused_conv --batch 2 --dtype fp32 --shapes 2   # a CPU: interpret mode

For every distinct 1x1 convolution of ResNet-50 (v1.5, projections included) at
`--batch`, on random data resident on the device, times ways of computing the conv's
output y and the float32 sum and sum of squares of y per channel that its BN needs:

- `xla`: `resnet_jax.models.ops.fused_conv.reference`, the unfused composition as a model runs it:
  the pending BN's apply + ReLU, `lax.conv_general_dilated` (cuDNN on a GPU), statistics;
- `pallas`: `resnet_jax.models.ops.fused_conv.conv1x1_bn_nhwc`, one Pallas kernel (Triton on a GPU,
  interpret mode on a CPU: slow) and a strided slice first for a stride-2 projection;
  its backward computes dw by a second Pallas kernel, the rest by XLA;
- `pallas_xla_wgrad`: the same with dw by XLA too (`wgrad='xla'`): `fwd_bwd` only.

A conv has a pending BN (`prologue`) where its input is relu(BN(...)) unchanged: the
bottleneck's last 1x1 (`conv3`); the first 1x1 and the projection read the block input.
Passes: `fwd` (the three outputs) and `fwd_bwd` (those and the VJP of all three, random
cotangents, with respect to x, scale, bias and w), each jitted. Prints one
`RESULT {json}` per shape, pass and way: `shape` [M, Cin, Cout], `stride`, `prologue`,
`convs` (that many in the model), ms, TFLOP/s (2*M*Cin*Cout a GEMM, three GEMMs with the
backward), GB/s of the least traffic the pass needs (x, w and y once; with the backward
also x, y and dy read, dx and dw written), `speedup_vs_xla`, `max_rel_diff` (largest
difference of any output from xla's over its largest magnitude) and the Pallas `blocks`
(`fwd` and `wgrad`; `--blocks` and `--wgrad_blocks` override `choose_blocks` and
`choose_wgrad_blocks`).
Imports no tensorflow or ml_collections.
"""

import argparse
import collections
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bn_stats
from benchmarks import train_throughput as tt
from resnet_jax import models
from resnet_jax.models.ops import fused_conv

WAYS = ('xla', 'pallas', 'pallas_xla_wgrad')
PASSES = ('fwd', 'fwd_bwd')


@dataclasses.dataclass(frozen=True)
class Conv1x1:
  """A 1x1 convolution of NHWC input [batch, height, width, cin] with that stride."""

  batch: int
  height: int
  width: int
  cin: int
  cout: int
  stride: int
  prologue: bool

  @property
  def out_shape(self) -> tuple[int, int, int, int]:
    """The NHWC shape of y."""
    return (self.batch, -(-self.height // self.stride), -(-self.width // self.stride), self.cout)

  @property
  def rows(self) -> int:
    """M of the GEMM: the output pixels."""
    return self.batch * self.out_shape[1] * self.out_shape[2]


def conv1x1_shapes(model: models.ResNet, image: tuple[int, int, int], batch: int) -> list:
  """Every 1x1 convolution of one forward pass of `model` at `batch`, in order."""
  convs = []
  for m, shape in bn_stats.layer_calls(model, image):
    if isinstance(m, nn.Conv) and m.kernel_size == (1, 1):
      _, h, w, cin = shape
      stride = m.strides[0] if isinstance(m.strides, Sequence) else m.strides or 1
      convs.append(Conv1x1(batch, h, w, cin, m.features, stride, m.name == 'conv3'))
  return convs


def make_way(name: str, conv: Conv1x1, blocks: dict) -> Callable:
  """(x, scale, bias, w) -> (y, sum, sumsq) computed the way `name`."""
  options = dict(stride=conv.stride, prologue=conv.prologue)
  if name == 'xla':
    return functools.partial(fused_conv.reference, **options)
  wgrad = 'xla' if name == 'pallas_xla_wgrad' else 'pallas'
  return functools.partial(fused_conv.conv1x1_bn_nhwc, wgrad=wgrad, **blocks, **options)


def make_pass(name: str, way: Callable) -> Callable:
  """A jitted function of (inputs, cotangents): the outputs, and for fwd_bwd the VJP."""
  if name == 'fwd':
    return jax.jit(lambda inputs, cts: way(*inputs))

  def fwd_bwd(inputs, cts):
    outputs, vjp = jax.vjp(way, *inputs)
    return outputs, vjp(cts)

  return jax.jit(fwd_bwd)


def random_data(key: jax.Array, conv: Conv1x1, dtype: jnp.dtype) -> tuple[tuple, tuple]:
  """Inputs (x, scale, bias, w) like a trained net's, and cotangents of (y, sum, sumsq)."""
  k = jax.random.split(key, 7)
  inputs = (
    jax.random.normal(k[0], (conv.batch, conv.height, conv.width, conv.cin), dtype),
    1.0 + 0.2 * jax.random.normal(k[1], (conv.cin,)),
    0.2 * jax.random.normal(k[2], (conv.cin,)),
    (jax.random.normal(k[3], (conv.cin, conv.cout)) / np.sqrt(conv.cin)).astype(dtype),
  )
  cts = (
    jax.random.normal(k[4], conv.out_shape, dtype),
    jax.random.normal(k[5], (conv.cout,)) / conv.rows,
    jax.random.normal(k[6], (conv.cout,)) / conv.rows,
  )
  return inputs, cts


def work(conv: Conv1x1, pass_: str, itemsize: int) -> tuple[float, float]:
  """(FLOPs, least bytes moved) of one pass over `conv`."""
  m, cin, cout = conv.rows, conv.cin, conv.cout
  flops = 2 * m * cin * cout
  io = m * cin + cin * cout + m * cout
  if pass_ == 'fwd':
    return flops, io * itemsize
  return 3 * flops, (io + 2 * m * cin + 2 * m * cout + cin * cout) * itemsize


def max_rel_diff(out, reference) -> float:
  """The largest difference of any leaf from the reference's over its largest magnitude."""
  diffs = []
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diffs.append(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  return max(diffs)


def shape_rows(conv: Conv1x1, dtype: jnp.dtype, a: argparse.Namespace) -> Iterator[dict]:
  """Rows for one conv shape: every pass and way, xla first as the base."""
  data = random_data(jax.random.key(0), conv, dtype)
  blocks = {
    'blocks': a.blocks or fused_conv.choose_blocks(conv.cin, conv.cout),
    'wgrad_blocks': a.wgrad_blocks
    or fused_conv.choose_wgrad_blocks(conv.rows, conv.cin, conv.cout),
  }
  for pass_ in a.passes:
    flops, nbytes = work(conv, pass_, dtype.itemsize)
    xla_ms = reference = None
    # pallas_xla_wgrad's forward is pallas's.
    for way in [w for w in a.ways if pass_ == 'fwd_bwd' or w != 'pallas_xla_wgrad']:
      fn = make_pass(pass_, make_way(way, conv, blocks))
      ms = bn_stats.time_ms(lambda d, f=fn: f(*d), data, a.windows, a.reps)
      out = jax.device_get(fn(*data))
      if way == 'xla':
        xla_ms, reference = ms, out
      yield {
        'pass': pass_,
        'way': way,
        'ms': _round(ms),
        'tflops': _round(flops / ms / 1e9),
        'gb_per_s': _round(nbytes / ms / 1e6),
        'speedup_vs_xla': None if xla_ms is None else round(xla_ms / ms, 3),
        'max_rel_diff': None if reference is None else max_rel_diff(out, reference),
        'blocks': _blocks_row(way, blocks),
      }


def _blocks_row(way: str, blocks: dict) -> dict | None:
  """The Pallas blocks a way uses: none for xla, no wgrad's for pallas_xla_wgrad."""
  used = {'xla': (), 'pallas': ('blocks', 'wgrad_blocks')}.get(way, ('blocks',))
  return {name: dataclasses.asdict(blocks[name]) for name in used} or None


def _round(value: float) -> float:
  """Four significant digits: the same precision for a GPU's numbers and a CPU's."""
  return float(f'{value:.4g}')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', choices=sorted(tt.DTYPES), default='bf16')
  p.add_argument('--ways', default=','.join(WAYS), help=f'any of {WAYS}')
  p.add_argument('--passes', default=','.join(PASSES), help=f'any of {PASSES}')
  p.add_argument('--shapes', type=int, default=0, help='only the first this many shapes (0: all)')
  p.add_argument('--blocks', default='', help='M,N,K[,warps,stages] (default: choose_blocks)')
  p.add_argument(
    '--wgrad_blocks', default='', help='M,N,K,warps,stages,splits (default: choose_wgrad_blocks)'
  )
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--reps', type=int, default=10)
  a = p.parse_args(argv)
  a.ways = sorted(_names(p, '--ways', a.ways, WAYS), key=WAYS.index)
  a.passes = _names(p, '--passes', a.passes, PASSES)
  a.blocks = fused_conv.Blocks(*map(int, a.blocks.split(','))) if a.blocks else None
  a.wgrad_blocks = a.wgrad_blocks and fused_conv.WgradBlocks(*map(int, a.wgrad_blocks.split(',')))
  return a


def _names(p: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> list:
  names = [n for n in text.split(',') if n]
  unknown = [n for n in names if n not in allowed]
  if unknown or not names:
    p.error(f'{flag}: unknown {", ".join(unknown) or "(none)"}; use some of {", ".join(allowed)}')
  return names


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: RESULT lines per distinct 1x1 conv shape, pass and way."""
  a = parse_args(argv)
  dtype = jnp.dtype(tt.DTYPES[a.dtype])
  model = models.build_model('resnet50')
  counts = collections.Counter(conv1x1_shapes(model, (a.image_size, a.image_size, 3), a.batch))
  run = {'who': 'fused_conv', 'batch': a.batch, 'dtype': str(dtype)}
  device = {'device_kind': jax.devices()[0].device_kind}
  for conv, count in list(counts.items())[: a.shapes or None]:
    shape = {
      'shape': [conv.rows, conv.cin, conv.cout],
      'stride': conv.stride,
      'prologue': conv.prologue,
      'convs': count,
    }
    for row in shape_rows(conv, dtype, a):
      print('RESULT ' + json.dumps({**run, **shape, **row, **device}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
