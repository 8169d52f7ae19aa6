"""A 1x1 convolution fused with the pending BatchNorm's apply + ReLU and its own BN statistics.

In a ResNet bottleneck a 1x1 convolution is a GEMM [M = N*H*W, Cin] x [Cin, Cout]. Its
input is often the previous BN's output, relu(x * scale + bias) (the BN folded to a
per-channel scale and bias), and its output is the next BN's input, whose training
statistics are per-channel sums over M. Unfused that is three passes over memory (BN
apply, GEMM, statistics); NVIDIA's MLPerf ResNet fuses them into the GEMM, applying the
BN in the A operand's load (the prologue) and summing the output tile in the epilogue.
`conv1x1_bn` does the same as a Pallas kernel (Triton backend on a GPU, interpret mode on
a CPU) with a custom VJP; `reference` is the unfused XLA composition it equals, values
and gradients.

Numerics, the same in the kernel and `reference`: the prologue computes in float32 and
rounds to x's dtype before the dot, as a separate BN-apply + ReLU stores its output; the
dot accumulates in float32 and y is rounded to x's dtype; the statistics are float32
sums of y as stored (rounded), as MLPerf's genstats reads it and as a separate BN reads
its input. The backward therefore uses the stored y too.

The kernel: a grid of (Cout blocks, M blocks) programs, each computing a [Blocks.m,
Blocks.n] tile of y by a loop over Cin in steps of Blocks.k (load the x tile, apply the
BN and ReLU in registers, dot with float32 accumulation), then writing the tile and its
column sum and sum of squares as one row of float32 partials [M blocks, Cout]; an XLA
sum finishes them. Where M is not a multiple of Blocks.m, x is zero-padded (a copy) and
the statistics of the padded rows are masked; ResNet-50 at batch 256 needs neither.

The backward saves only x, scale, bias, w and y, and recomputes the ReLU mask from x.
With g = dy + dsum + 2 * y * dsumsq (rounded to y's dtype), XLA computes dA = g @ w^T
and from it dx = dA * mask * scale, dscale = sum(dA * mask * x), dbias = sum(dA * mask);
dw = relu(x * scale + bias)^T @ g is a second Pallas kernel with the same prologue
(`wgrad='pallas'`: no relu(x * scale + bias) written for a GEMM library to read) or XLA
(`wgrad='xla'`). The wgrad kernel's grid is (Cout blocks, Cin blocks, splits of M): each
program sums its split's rows in steps of Blocks.k into a float32 [m, n] tile of
partials [splits * Cin, Cout], and an XLA sum over the splits finishes them.

Pallas APIs relied on are those of `resnet_jax.models.ops.channel_stats` (in jax 0.10.2 and 0.11.x)
plus `pl.program_id`; the dot is `jnp.dot` with `preferred_element_type`, which the Triton
lowering maps to tt.dot (IEEE float32 for float32 inputs, tensor cores for bfloat16).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from resnet_jax.models.ops import pallas_triton

Outputs = tuple[jax.Array, jax.Array, jax.Array]

# 128x128 output tiles in steps of 64 along K: Triton's usual tensor-core GEMM tile;
# three pipeline stages of the A and B tiles (96 KiB of bfloat16) fit the shared memory.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
# The wgrad's K (M rows) is long and its output small: K is split over up to this many
# programs in all, two waves over an H100's 132 SMs, and no more, since each split adds
# a float32 copy of its dw tiles for XLA to sum.
WGRAD_PROGRAMS = 264
WGRAD_IMPLS = ('pallas', 'xla')


@dataclasses.dataclass(frozen=True)
class Blocks:
  """How a kernel tiles a GEMM [m, k] x [k, n]: [m, n] output tiles, K in steps of k.

  The forward's GEMM is [M, Cin] x [Cin, Cout], the wgrad's [Cin, M] x [M, Cout]. All
  powers of two, as Triton needs, dividing the channels they tile (M is padded). On a
  GPU Triton's tensor-core dot also needs every one of them to be at least 16.
  """

  m: int
  n: int
  k: int
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    pallas_triton.check_powers_of_two(self, 'm', 'n', 'k')


@dataclasses.dataclass(frozen=True)
class WgradBlocks(Blocks):
  """`Blocks` for the wgrad, whose K (the M rows) is split over `splits` programs."""

  splits: int = 1


def choose_blocks(cin: int, cout: int) -> Blocks:
  """Forward tiles for [M, cin] x [cin, cout]: the default sizes, cut to divide the channels."""
  return Blocks(BLOCK_M, min(cout & -cout, BLOCK_N), min(cin & -cin, BLOCK_K))


def choose_wgrad_blocks(rows: int, cin: int, cout: int) -> WgradBlocks:
  """Wgrad tiles for [cin, rows] x [rows, cout], K split into whole steps of rows over at
  most WGRAD_PROGRAMS programs."""
  m, n = min(cin & -cin, BLOCK_M), min(cout & -cout, BLOCK_N)
  tiles = cin // m * (cout // n)
  steps = pl.cdiv(rows, BLOCK_K)
  most = max(1, min(steps, WGRAD_PROGRAMS // tiles))
  splits = next(s for s in range(most, 0, -1) if steps % s == 0)
  return WgradBlocks(m, n, BLOCK_K, splits=splits)


def bn_relu(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """relu(x * scale + bias) in float32, rounded to x's dtype: a folded BN and its ReLU."""
  return jax.nn.relu(x.astype(jnp.float32) * scale + bias).astype(x.dtype)


def reference(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  w: jax.Array,
  *,
  stride: int = 1,
  prologue: bool = True,
) -> Outputs:
  """The unfused composition `conv1x1_bn_nhwc` equals: BN apply + ReLU, conv, statistics.

  x: NHWC; w: [Cin, Cout]. Three XLA ops as a model runs them: `bn_relu` on the whole of
  x (when `prologue`), a 1x1 `lax.conv_general_dilated` (cuDNN on a GPU) accumulating in
  float32 and rounded to x's dtype, then float32 sums of the rounded y over N, H and W.
  """
  a = bn_relu(x, scale, bias) if prologue else x
  y = lax.conv_general_dilated(
    a,
    w[None, None],
    (stride, stride),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    preferred_element_type=jnp.float32,
  ).astype(x.dtype)
  yf = y.astype(jnp.float32)
  return y, jnp.sum(yf, axis=(0, 1, 2)), jnp.sum(yf * yf, axis=(0, 1, 2))


def conv1x1_bn(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  w: jax.Array,
  *,
  prologue: bool = True,
  wgrad: str = 'pallas',
  blocks: Blocks | None = None,
  wgrad_blocks: WgradBlocks | None = None,
  interpret: bool | None = None,
) -> Outputs:
  """y = relu(x * scale + bias) @ w, and float32 per-column sum and sum of squares of y.

  x: [M, Cin]; scale, bias: float32 [Cin] (not read, and may be None, without
  `prologue`: then the A operand is x as is); w: [Cin, Cout] in x's dtype. Returns y:
  [M, Cout] in x's dtype, and the float32 [Cout] sums over M of y as stored. Differentiable
  in x, scale, bias and w; `wgrad` (one of WGRAD_IMPLS) computes dw by a Pallas kernel
  or by XLA, the rest of the backward being XLA's either way. `blocks` and
  `wgrad_blocks` default to `choose_blocks` and `choose_wgrad_blocks`; `interpret`
  (default: whether JAX's default backend is the CPU) runs the kernels in interpret mode.
  """
  if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
    raise ValueError(f'need x [M, Cin] and w [Cin, Cout], got {x.shape} and {w.shape}')
  if w.dtype != x.dtype:
    raise ValueError(f'w must have the dtype of x ({x.dtype}), not {w.dtype}')
  if prologue and (scale is None or bias is None):
    raise ValueError('the prologue needs scale and bias: pass them, or prologue=False')
  if wgrad not in WGRAD_IMPLS:
    raise ValueError(f'unknown wgrad {wgrad!r}: use one of {", ".join(WGRAD_IMPLS)}')
  (rows, cin), cout = x.shape, w.shape[1]
  blocks = _check_tiles(blocks or choose_blocks(cin, cout), cin, cout, 'k')
  if wgrad == 'pallas':
    wgrad_blocks = wgrad_blocks or choose_wgrad_blocks(rows, cin, cout)
    _check_tiles(wgrad_blocks, cin, cout, 'm')
  else:
    wgrad_blocks = None
  interpret = pallas_triton.interpret_mode(interpret)
  if not prologue:
    scale = bias = None
  return _fused(x, scale, bias, w, blocks, wgrad_blocks, interpret)


def conv1x1_bn_nhwc(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  w: jax.Array,
  *,
  stride: int = 1,
  **options,
) -> Outputs:
  """`conv1x1_bn` (with its keyword `options`) of an NHWC x and a stride; y is NHWC."""
  # The BN and ReLU are elementwise, so they commute with the strided slice: the kernel
  # applies them to the kept pixels only.
  x = x[:, ::stride, ::stride, :]
  n, h, w_, cin = x.shape
  y, s1, s2 = conv1x1_bn(x.reshape(-1, cin), scale, bias, w, **options)
  return y.reshape(n, h, w_, -1), s1, s2


def _check_tiles(blocks: Blocks, cin: int, cout: int, cin_field: str) -> Blocks:
  """`blocks`, if its field `cin_field` divides Cin and its n divides Cout."""
  if cin % getattr(blocks, cin_field) or cout % blocks.n:
    raise ValueError(f'{blocks} does not tile Cin={cin}, Cout={cout}')
  return blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(x, scale, bias, w, blocks: Blocks, wgrad_blocks, interpret: bool) -> Outputs:
  return _pallas_forward(x, scale, bias, w, blocks, interpret)


def _fused_fwd(x, scale, bias, w, blocks: Blocks, wgrad_blocks, interpret: bool):
  y, s1, s2 = _pallas_forward(x, scale, bias, w, blocks, interpret)
  # y is saved since the backward needs it as stored; the next BN keeps it anyway.
  return (y, s1, s2), (x, scale, bias, w, y)


def _fused_bwd(blocks: Blocks, wgrad_blocks: WgradBlocks | None, interpret: bool, res, cts):
  """Cotangents of (x, scale, bias, w) from those of (y, sum, sumsq)."""
  del blocks  # The forward's.
  x, scale, bias, w, y = res
  dy, dsum, dsumsq = cts
  # The cotangent of y as stored, rounded to its dtype as the unfused path's is, so both
  # GEMMs take x's dtype and accumulate in float32.
  g = (dy.astype(jnp.float32) + dsum + 2 * y.astype(jnp.float32) * dsumsq).astype(y.dtype)
  if wgrad_blocks is None:
    a = x if scale is None else bn_relu(x, scale, bias)
    dw = jnp.dot(a.T, g, preferred_element_type=jnp.float32)
  else:
    dw = _pallas_wgrad(x, scale, bias, g, wgrad_blocks, interpret)
  return *_dgrad(x, scale, bias, w, g), dw.astype(w.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _dgrad(x, scale, bias, w, g) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """(dx, dscale, dbias) in XLA ops, the ReLU mask recomputed from x."""
  # Rounded to x's dtype as the unfused path's cotangent of A is: half the bytes.
  da = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  if scale is None:
    return da, None, None
  xf = x.astype(jnp.float32)
  # relu's derivative as jax.nn.relu defines it: 0 where its input is 0.
  da = jnp.where(xf * scale + bias > 0, da.astype(jnp.float32), 0.0)
  return (da * scale).astype(x.dtype), jnp.sum(da * xf, axis=0), jnp.sum(da, axis=0)


def _pallas_forward(x, scale, bias, w, blocks: Blocks, interpret: bool) -> Outputs:
  """y and its column sums by the kernel; x padded to whole M blocks where needed."""
  rows, cin = x.shape
  cout = w.shape[1]
  m_blocks = pl.cdiv(rows, blocks.m)
  padded = m_blocks * blocks.m
  if padded != rows:
    x = jnp.pad(x, ((0, padded - rows), (0, 0)))
  prologue = scale is not None
  # Cout blocks first in the grid (the fastest-varying launch index), so programs that
  # read the same rows of x run together and share them through the L2 cache.
  grid = (cout // blocks.n, m_blocks)
  vector_spec = pl.BlockSpec((cin,), lambda j, i: (0,))
  in_specs = [
    pl.BlockSpec((blocks.m, cin), lambda j, i: (i, 0)),
    *([vector_spec, vector_spec] if prologue else []),
    pl.BlockSpec((cin, blocks.n), lambda j, i: (0, j)),
  ]
  partial = jax.ShapeDtypeStruct((m_blocks, cout), jnp.float32)
  partial_spec = pl.BlockSpec((1, blocks.n), lambda j, i: (i, j))
  y, s1, s2 = pl.pallas_call(
    functools.partial(_kernel, blocks=blocks, rows=rows, prologue=prologue),
    out_shape=(jax.ShapeDtypeStruct((padded, cout), x.dtype), partial, partial),
    grid=grid,
    in_specs=in_specs,
    out_specs=(pl.BlockSpec((blocks.m, blocks.n), lambda j, i: (i, j)), partial_spec, partial_spec),
    interpret=interpret,
    compiler_params=pallas_triton.compiler_params(blocks),
    name='conv1x1_bn',
  )(*([x, scale, bias, w] if prologue else [x, w]))
  return y[:rows], jnp.sum(s1, axis=0), jnp.sum(s2, axis=0)


def _kernel(*refs, blocks: Blocks, rows: int, prologue: bool):
  """One [m, n] tile of y: a loop over K with the BN prologue, then the statistics."""
  if prologue:
    x_ref, scale_ref, bias_ref, w_ref, y_ref, s1_ref, s2_ref = refs
  else:
    x_ref, w_ref, y_ref, s1_ref, s2_ref = refs

  def step(k, acc):
    ks = pl.ds(pl.multiple_of(k * blocks.k, blocks.k), blocks.k)
    a = x_ref[:, ks]
    if prologue:
      a = bn_relu(a, scale_ref[ks], bias_ref[ks])
    return acc + jnp.dot(a, w_ref[ks, :], preferred_element_type=jnp.float32)

  acc = jnp.zeros((blocks.m, blocks.n), jnp.float32)
  acc = lax.fori_loop(0, x_ref.shape[1] // blocks.k, step, acc)
  y = acc.astype(y_ref.dtype)
  y_ref[...] = y
  yf = y.astype(jnp.float32)
  if rows % blocks.m:
    # Padded rows have y = relu(bias) @ w, not 0: keep them out of the statistics.
    row = pl.program_id(1) * blocks.m + lax.broadcasted_iota(jnp.int32, yf.shape, 0)
    yf = jnp.where(row < rows, yf, 0.0)
  s1_ref[...] = jnp.sum(yf, axis=0, keepdims=True)
  s2_ref[...] = jnp.sum(yf * yf, axis=0, keepdims=True)


def _pallas_wgrad(x, scale, bias, g, blocks: WgradBlocks, interpret: bool) -> jax.Array:
  """float32 relu(x * scale + bias)^T @ g (x^T @ g without scale) by the wgrad kernel."""
  rows, cin = x.shape
  cout = g.shape[1]
  per_split = pl.cdiv(pl.cdiv(rows, blocks.k), blocks.splits) * blocks.k
  padded = per_split * blocks.splits
  if padded != rows:
    # Zero rows of g make the padded rows add nothing, whatever relu(bias) is.
    x, g = (jnp.pad(t, ((0, padded - rows), (0, 0))) for t in (x, g))
  prologue = scale is not None
  cin_blocks = cin // blocks.m
  # Splits last in the grid (the slowest-varying launch index), so programs that read
  # the same rows of x and g run together.
  grid = (cout // blocks.n, cin_blocks, blocks.splits)
  vector_spec = pl.BlockSpec((blocks.m,), lambda j, i, s: (i,))
  in_specs = [
    pl.BlockSpec((per_split, blocks.m), lambda j, i, s: (s, i)),
    *([vector_spec, vector_spec] if prologue else []),
    pl.BlockSpec((per_split, blocks.n), lambda j, i, s: (s, j)),
  ]
  partials = pl.pallas_call(
    functools.partial(_wgrad_kernel, blocks=blocks, prologue=prologue),
    out_shape=jax.ShapeDtypeStruct((blocks.splits * cin, cout), jnp.float32),
    grid=grid,
    in_specs=in_specs,
    out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda j, i, s: (s * cin_blocks + i, j)),
    interpret=interpret,
    compiler_params=pallas_triton.compiler_params(blocks),
    name='conv1x1_bn_wgrad',
  )(*([x, scale, bias, g] if prologue else [x, g]))
  return jnp.sum(partials.reshape(blocks.splits, cin, cout), axis=0)


def _wgrad_kernel(*refs, blocks: WgradBlocks, prologue: bool):
  """One [m, n] tile of one split's dw: a loop over its rows with the BN prologue."""
  if prologue:
    x_ref, scale_ref, bias_ref, g_ref, dw_ref = refs
    scale, bias = scale_ref[...], bias_ref[...]
  else:
    x_ref, g_ref, dw_ref = refs

  def step(r, acc):
    rs = pl.ds(pl.multiple_of(r * blocks.k, blocks.k), blocks.k)
    a = x_ref[rs, :]
    if prologue:
      a = bn_relu(a, scale, bias)
    return acc + jnp.dot(a.T, g_ref[rs, :], preferred_element_type=jnp.float32)

  acc = jnp.zeros((blocks.m, blocks.n), jnp.float32)
  dw_ref[...] = lax.fori_loop(0, x_ref.shape[0] // blocks.k, step, acc)
