"""Per-channel sums for BatchNorm statistics, three ways: XLA, two-stage XLA, Pallas.

BatchNorm's training statistics are, per channel, the float32 mean and mean of squares
of an NHWC activation over N, H and W: a column reduction of `x` viewed as [rows, C]
(rows = N*H*W). On an H100 XLA runs it at about 1.4 TB/s of the 3.35 TB/s the memory
gives, since a small kept dimension (C = 64..2048) leaves most SMs idle. The ways:

- `xla`: one reduction over the rows, as flax.linen.BatchNorm does;
- `two_stage`: the rows in blocks, a sum per block, then a sum over the blocks;
- `pallas`: a Pallas kernel (Triton backend on a GPU, interpret mode on a CPU) in which
  each program sums `Blocks.tiles` tiles of [Blocks.rows, Blocks.channels] into one row of
  float32 partials [programs, C]; a small XLA sum finishes them.

All accumulate in float32 whatever the input dtype. Rows that do not fill a whole
program (fewer than `Blocks.rows * Blocks.tiles`) are summed by XLA and added, so the
kernel never reads out of bounds and needs no masks. ResNet's shapes leave no such rows:
rows = batch * 49 * 4**k is a multiple of every tile height chosen for it.

Pallas APIs relied on, all in jax 0.10.2 and 0.11.x (checked in both sources):
`pl.pallas_call(..., grid, in_specs, out_specs, interpret, compiler_params)`,
`pl.BlockSpec(block_shape, index_map)`, `pl.ds`, `pl.multiple_of` and
`jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)`. Passing the
Triton `CompilerParams` is what selects the Triton backend: without them both versions
lower to Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True). jax 0.11 deprecates
the Triton backend (a DeprecationWarning when it lowers) but keeps it.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from resnet_jax.errors import UserError
from resnet_jax.models.ops import pallas_triton

IMPLS = ('xla', 'two_stage', 'pallas')
Sums = tuple[jax.Array, jax.Array]

# Elements per tile: two float32 accumulators of this size across 4 warps (128 threads)
# are 64 registers a thread, leaving room for the loads of the next tile.
TILE_ELEMENTS = 4096
MAX_BLOCK_CHANNELS = 256
# Enough programs for several waves over an H100's 132 SMs, without partials so many
# that finishing them costs a noticeable read.
MIN_PROGRAMS = 2048
MAX_TILES = 64


@dataclasses.dataclass(frozen=True)
class Blocks:
  """How the Pallas kernel tiles x viewed as [rows, C].

  `rows` and `channels` are a tile's shape, powers of two as Triton needs, and
  `channels` divides C; each program sums `tiles` consecutive tiles of rows.
  """

  rows: int
  channels: int
  tiles: int
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    pallas_triton.check_powers_of_two(self, 'rows', 'channels')
    if self.tiles < 1:
      raise ValueError(f'Blocks.tiles must be at least 1, not {self.tiles}')


def choose_blocks(rows: int, channels: int) -> Blocks:
  """Tiles for x viewed as [rows, channels]: few rows left over, a moderate grid."""
  block_c = min(channels & -channels, MAX_BLOCK_CHANNELS)
  tile_rows = max(1, min(TILE_ELEMENTS // block_c, _floor_pow2(rows)))
  return Blocks(tile_rows, block_c, _tiles_per_program(rows // tile_rows, channels // block_c))


def channel_sums(
  x: jax.Array, impl: str = 'xla', *, blocks: Blocks | None = None, interpret: bool | None = None
) -> Sums:
  """Per-channel float32 (sum, sum of squares) of `x` over all axes but the last.

  `blocks` (default `choose_blocks`) sets the block of rows of `two_stage` and the tiles
  of `pallas`; `interpret` (default: whether JAX's default backend is the CPU) runs the
  Pallas kernel in interpret mode, the only way it runs on a CPU.
  """
  if impl not in IMPLS:
    raise UserError(f'unknown channel-stats impl {impl!r}: use one of {", ".join(IMPLS)}')
  x2 = x.reshape(-1, x.shape[-1])
  if impl == 'xla':
    return _xla_sums(x2)
  blocks = blocks or choose_blocks(*x2.shape)
  main = _main_rows(x2.shape[0], blocks)
  if main == 0:
    return _xla_sums(x2)
  if impl == 'two_stage':
    s1, s2 = _two_stage_sums(x2[:main], blocks.rows * blocks.tiles)
  else:
    s1, s2 = _pallas_sums(x2, main, blocks, pallas_triton.interpret_mode(interpret))
  if main == x2.shape[0]:
    return s1, s2
  t1, t2 = _xla_sums(x2[main:])
  return s1 + t1, s2 + t2


def channel_means(
  x: jax.Array, impl: str = 'xla', *, blocks: Blocks | None = None, interpret: bool | None = None
) -> Sums:
  """Per-channel float32 (mean, mean of squares) of `x`: BatchNorm's training statistics."""
  s1, s2 = channel_sums(x, impl, blocks=blocks, interpret=interpret)
  count = math.prod(x.shape[:-1])
  return s1 / count, s2 / count


def _floor_pow2(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


def _tiles_per_program(tiles: int, channel_blocks: int) -> int:
  """The most tiles a program sums that still divides `tiles` and gives enough programs."""
  most = min(MAX_TILES, max(1, tiles * channel_blocks // MIN_PROGRAMS))
  return next(t for t in range(most, 0, -1) if tiles % t == 0)


def _main_rows(rows: int, blocks: Blocks) -> int:
  """The rows that fill whole programs; the rest are summed by XLA."""
  per_program = blocks.rows * blocks.tiles
  return rows // per_program * per_program


def _xla_sums(x2: jax.Array) -> Sums:
  xf = x2.astype(jnp.float32)
  return jnp.sum(xf, axis=0), jnp.sum(xf * xf, axis=0)


def _two_stage_sums(x2: jax.Array, block_rows: int) -> Sums:
  blocked = x2.reshape(-1, block_rows, x2.shape[-1]).astype(jnp.float32)
  s1, s2 = jnp.sum(blocked, axis=1), jnp.sum(blocked * blocked, axis=1)
  return jnp.sum(s1, axis=0), jnp.sum(s2, axis=0)


def _pallas_sums(x2: jax.Array, main: int, blocks: Blocks, interpret: bool) -> Sums:
  """Sums of the first `main` rows of `x2`, by the kernel then an XLA sum of its partials."""
  channels = x2.shape[-1]
  if channels % blocks.channels:
    raise ValueError(f'Blocks.channels={blocks.channels} does not divide C={channels}')
  programs = main // (blocks.rows * blocks.tiles)
  # Channel blocks first in the grid, so programs reading the same rows launch together.
  grid = (channels // blocks.channels, programs)
  partial = jax.ShapeDtypeStruct((programs, channels), jnp.float32)
  out_spec = pl.BlockSpec((1, blocks.channels), lambda c, p: (p, c))
  s1, s2 = pl.pallas_call(
    lambda x_ref, s1_ref, s2_ref: _sums_kernel(x_ref, s1_ref, s2_ref, blocks),
    out_shape=(partial, partial),
    grid=grid,
    # The grid covers only the first `main` rows: the input block never runs past them.
    in_specs=[pl.BlockSpec((blocks.rows * blocks.tiles, blocks.channels), lambda c, p: (p, c))],
    out_specs=(out_spec, out_spec),
    interpret=interpret,
    compiler_params=pallas_triton.compiler_params(blocks),
    name='channel_sums',
  )(x2)
  return jnp.sum(s1, axis=0), jnp.sum(s2, axis=0)


def _sums_kernel(x_ref, s1_ref, s2_ref, blocks: Blocks):
  """One program: `blocks.tiles` tiles summed elementwise, then down the rows once."""

  def add_tile(t, acc):
    start = pl.multiple_of(t * blocks.rows, blocks.rows)
    tile = x_ref[pl.ds(start, blocks.rows), :].astype(jnp.float32)
    return acc[0] + tile, acc[1] + tile * tile

  # Elementwise accumulators keep the cross-thread reduction out of the loop.
  zeros = jnp.zeros((blocks.rows, blocks.channels), jnp.float32)
  s1, s2 = lax.fori_loop(0, blocks.tiles, add_tile, (zeros, zeros))
  s1_ref[...] = jnp.sum(s1, axis=0, keepdims=True)
  s2_ref[...] = jnp.sum(s2, axis=0, keepdims=True)
