"""2-D convolution (NHWC input, HWIO kernel) with its own lowering per shape and direction.

XLA:CPU runs a forward convolution well, but lowers the two gradients (convolutions with
other dimension numbers) with layout copies around them, or to a slow generic loop on
small maps (openxla/xla 34273). `conv_general_dilated(impl)` returns a drop-in for
`lax.conv_general_dilated` whose forward pass, input gradient and weight gradient (a
`custom_vjp`) are each computed by one of these exact formulations:

- `xla`: XLA's own convolution (for a gradient: jax's transpose rule, as without this op);
- `gemm`: patches (the live kernel taps' shifted input slices, side by side) times the
  kernel as one matrix product; for the input gradient the product's columns are added
  back to their pixels (col2im);
- `taps`: one matrix product per live tap, summed (no patches matrix);
- `conv` (input gradient only): the forward convolution of the output gradient (spread out
  by the stride with interior zeros) with the flipped kernel, its in/out channels swapped.
  (The weight gradient as one convolution, the batch as its feature axis, compiles to the
  same HLO as jax's transpose rule on XLA:CPU, so it is not a separate choice.)
- `onednn`: oneDNN's convolution kernels (see `onednn`), as steps of the compiled program,
  where the library loads; float32 only.

A tap is live when some output reads an input pixel through it, not only padding: a 3x3
convolution on a 1x1 map is its centre tap, one matrix product.

`auto` takes each direction's lowering from the table that benchmarks/conv_lowerings.py
measured (`cpu_conv_table.json`), keyed by the convolution's shape without the batch: its
choice with oneDNN as a candidate where oneDNN loads and the program's split of the batch
over devices is known (one device, or a mesh set by `sharding.traced_on`: oneDNN then
runs on each device's rows), its choice among XLA's formulations otherwise. The timings
behind it belong to the CPU they were taken on (XLA's convolution and the matrix products
rank differently on another vendor's cores), so on any other CPU model, and for shapes
the table lacks, `auto` uses oneDNN for every shape without dead taps where it can, keeps
the table's choices for shapes with dead taps (fewer multiply-adds than any convolution,
whatever the CPU), and uses XLA's convolution elsewhere; measure such a CPU with the
benchmark's --write. Any non-CPU backend, and anything but a plain convolution (dilation,
groups, other layouts), use XLA's convolution unchanged.
"""

import functools
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import UserError
from resnet_jax.models.ops import onednn, onednn_check
from resnet_jax.models.ops.cpu_info import cpu_model

IMPLS = ('auto', 'xla', 'gemm', 'taps', 'onednn')  # the model's conv_impl choices
TABLE_FILE = pathlib.Path(__file__).with_name('cpu_conv_table.json')
_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


class Lowering(NamedTuple):
  """The formulation of each direction: forward, input gradient, weight gradient."""

  forward: str = 'xla'
  input_grad: str = 'xla'
  weight_grad: str = 'xla'


XLA = Lowering()
ONEDNN = Lowering('onednn', 'onednn', 'onednn')


class Geometry(NamedTuple):
  """A convolution's static shape: input (N, H, W, C), kernel (KH, KW, C, F), strides and
  explicit (low, high) padding per spatial axis."""

  x_shape: tuple[int, int, int, int]
  w_shape: tuple[int, int, int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]

  @property
  def out_hw(self) -> tuple[int, int]:
    return tuple(
      (size + lo + hi - k) // s + 1
      for size, k, s, (lo, hi) in zip(
        self.x_shape[1:3], self.w_shape[:2], self.strides, self.padding, strict=True
      )
    )

  def live(self, axis: int) -> list[int]:
    """The kernel offsets along spatial `axis` (0: H, 1: W) that read some input pixel."""
    size, k, s = self.x_shape[1 + axis], self.w_shape[axis], self.strides[axis]
    lo, out = self.padding[axis][0], self.out_hw[axis]
    return [i for i in range(k) if any(0 <= o * s + i - lo < size for o in range(out))]

  def taps(self) -> list[tuple[int, int]]:
    return [(i, j) for i in self.live(0) for j in self.live(1)]

  def has_dead_taps(self) -> bool:
    """Whether some kernel taps read only padding (a 3x3 conv on a 1x1 or 2x2 map)."""
    return len(self.taps()) < self.w_shape[0] * self.w_shape[1]

  def key(self, dtype: Any) -> str:
    """The table key: everything but the batch size."""
    (_, h, w, c), (kh, kw, _, f) = self.x_shape, self.w_shape
    (sh, sw), ((t, b), (left, r)) = self.strides, self.padding
    return f'{h}x{w}x{c}->{f} k{kh}x{kw} s{sh}x{sw} p{t},{b},{left},{r} {jnp.dtype(dtype).name}'


# --- The formulations ------------------------------------------------------------------


def _xla(x: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return lax.conv_general_dilated(x, w, g.strides, g.padding, dimension_numbers=_NHWC)


def _tap_slice(x: jax.Array, g: Geometry, tap: tuple[int, int]) -> jax.Array:
  """The input pixels that tap (i, j) reads for every output: [N, OH, OW, C], zeros where
  it reads padding. Only the padding this tap reaches is added."""
  (n, h, w, c), (oh, ow) = g.x_shape, g.out_hw
  starts, pads = [], []
  for size, out, s, (lo, _), i in zip((h, w), (oh, ow), g.strides, g.padding, tap, strict=True):
    first, last = i - lo, i - lo + s * (out - 1)  # input rows read, in unpadded coordinates
    before, after = max(-first, 0), max(last - (size - 1), 0)
    starts.append(first + before)
    pads.append((before, after))
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  (sh, sw) = g.strides
  start = (0, starts[0], starts[1], 0)
  limit = (n, starts[0] + sh * (oh - 1) + 1, starts[1] + sw * (ow - 1) + 1, c)
  return lax.slice(x, start, limit, (1, sh, sw, 1))


def _patches(x: jax.Array, g: Geometry) -> jax.Array:
  """[N, OH, OW, T*C]: the live taps' slices side by side (T = number of live taps)."""
  slices = [_tap_slice(x, g, t) for t in g.taps()]
  return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


def _live_kernel(w: jax.Array, g: Geometry) -> jax.Array:
  """[T*C, F]: the live taps' kernel slices stacked in `_patches`' order."""
  return jnp.concatenate([w[i, j] for i, j in g.taps()], axis=0)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., K] @ b [K, F] in a's dtype."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def _forward_gemm(x: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return _dot(_patches(x, g), _live_kernel(w, g))


def _forward_taps(x: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return sum(_dot(_tap_slice(x, g, (i, j)), w[i, j]) for i, j in g.taps())


def _scatter_tap(piece: jax.Array, g: Geometry, tap: tuple[int, int]) -> jax.Array:
  """The transpose of `_tap_slice`: [N, OH, OW, C] gradients placed on the [N, H, W, C]
  pixels that tap (i, j) read (strides as interior zeros, padding cropped away)."""
  (_, h, w, _), (oh, ow) = g.x_shape, g.out_hw
  config = [(0, 0, 0)]
  for size, out, s, (lo, _), i in zip((h, w), (oh, ow), g.strides, g.padding, tap, strict=True):
    first = i - lo
    config.append((first, size - (first + s * (out - 1) + 1), s - 1))
  config.append((0, 0, 0))
  return lax.pad(piece, jnp.zeros((), piece.dtype), config)


def _input_grad_gemm(dy: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  cols = lax.dot_general(dy, _live_kernel(w, g), (((3,), (1,)), ((), ())))  # [N, OH, OW, T*C]
  c = g.x_shape[3]
  return sum(_scatter_tap(cols[..., t * c : (t + 1) * c], g, tap) for t, tap in enumerate(g.taps()))


def _input_grad_taps(dy: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return sum(
    _scatter_tap(lax.dot_general(dy, w[i, j], (((3,), (1,)), ((), ()))), g, (i, j))
    for i, j in g.taps()
  )


def _input_grad_conv(dy: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  """dx as a forward convolution: dy, spread out by the stride (interior zeros) and padded,
  with the flipped kernel, its in/out channels swapped."""
  config = [(0, 0, 0)]
  for size, k, s, (lo, _), out in zip(
    g.x_shape[1:3], g.w_shape[:2], g.strides, g.padding, g.out_hw, strict=True
  ):
    config.append((k - 1 - lo, size + lo - s * (out - 1) - 1, s - 1))
  config.append((0, 0, 0))
  spread = lax.pad(dy, jnp.zeros((), dy.dtype), config)
  flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  return lax.conv_general_dilated(spread, flipped, (1, 1), 'VALID', dimension_numbers=_NHWC)


def _weight_grad_gemm(x: jax.Array, dy: jax.Array, g: Geometry) -> jax.Array:
  dw = lax.dot_general(_patches(x, g), dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
  return _full_kernel(jnp.split(dw, len(g.taps()), axis=0), g)


def _weight_grad_taps(x: jax.Array, dy: jax.Array, g: Geometry) -> jax.Array:
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  return _full_kernel([lax.dot_general(_tap_slice(x, g, t), dy, dims) for t in g.taps()], g)


def _full_kernel(per_tap: Sequence[jax.Array], g: Geometry) -> jax.Array:
  """[KH, KW, C, F] from the live taps' [C, F] gradients; dead taps get zeros."""
  by_tap = dict(zip(g.taps(), per_tap, strict=True))
  zero = jnp.zeros(g.w_shape[2:], per_tap[0].dtype)
  kh, kw = g.w_shape[:2]
  return jnp.stack([jnp.stack([by_tap.get((i, j), zero) for j in range(kw)]) for i in range(kh)])


def _xla_input_grad(dy: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  x = jax.ShapeDtypeStruct(g.x_shape, dy.dtype)
  return jax.linear_transpose(lambda x: _xla(x, w, g), x)(dy)[0]


def _xla_weight_grad(x: jax.Array, dy: jax.Array, g: Geometry) -> jax.Array:
  w = jax.ShapeDtypeStruct(g.w_shape, dy.dtype)
  return jax.linear_transpose(lambda w: _xla(x, w, g), w)(dy)[0]


def _forward_onednn(x: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return _onednn('forward', g, x, w)


def _input_grad_onednn(dy: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
  return _onednn('input_grad', g, dy, w)


def _weight_grad_onednn(x: jax.Array, dy: jax.Array, g: Geometry) -> jax.Array:
  return _onednn('weight_grad', g, x, dy)


def _onednn(direction: str, g: Geometry, a: jax.Array, b: jax.Array) -> jax.Array:
  """oneDNN's `direction` of `g`. oneDNN is a host-side kernel that XLA cannot split over
  devices, so in a program over a mesh of several devices it runs on each device's rows
  of the batch (a `shard_map`), and the weight gradient is the devices' sum."""
  axes = batch_axes(g.x_shape[0])
  if not axes:
    return onednn.call(direction, onednn.Shape(*g), a, b)
  rows = g.x_shape[0] // _devices(axes)
  local = onednn.Shape((rows, *g.x_shape[1:]), g.w_shape, g.strides, g.padding)
  if direction == 'weight_grad':  # (x, dy) -> dw
    specs = (P(axes), P(axes)), P()
    on_device = lambda x, dy: lax.psum(onednn.call(direction, local, x, dy), axes)
  else:  # (x, w) -> y, (dy, w) -> dx
    specs = (P(axes), P()), P(axes)
    on_device = lambda a, w: onednn.call(direction, local, a, w)
  mesh = jax.sharding.get_abstract_mesh()
  return jax.shard_map(on_device, in_specs=specs[0], out_specs=specs[1], mesh=mesh)(a, b)


def batch_axes(batch: int) -> tuple[str, ...] | None:
  """The mesh axes a batch of `batch` rows is split over where this program is traced:
  () for a program on one device, the axes (of more than one device, not already manual)
  of the mesh the caller set (`jax.sharding.use_abstract_mesh`; resnet_jax's meshes are
  data-parallel, so the batch is split over all of them), None where that is unknown
  (several devices, no mesh set) or the rows do not split evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return () if jax.device_count() == 1 else None
  axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1)
  return axes if batch % _devices(axes) == 0 else None


def _devices(axes: tuple[str, ...]) -> int:
  """How many devices the context mesh's `axes` span."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


FORWARD = {'xla': _xla, 'gemm': _forward_gemm, 'taps': _forward_taps, 'onednn': _forward_onednn}
INPUT_GRAD = {
  'xla': _xla_input_grad,
  'gemm': _input_grad_gemm,
  'taps': _input_grad_taps,
  'conv': _input_grad_conv,
  'onednn': _input_grad_onednn,
}
WEIGHT_GRAD = {
  'xla': _xla_weight_grad,
  'gemm': _weight_grad_gemm,
  'taps': _weight_grad_taps,
  'onednn': _weight_grad_onednn,
}


# --- The op ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lowered_conv(x: jax.Array, w: jax.Array, g: Geometry, lowering: Lowering) -> jax.Array:
  """The convolution of `x` with `w` of geometry `g`, each direction as `lowering` says."""
  return FORWARD[lowering.forward](x, w, g)


def _lowered_fwd(x, w, g, lowering):
  return lowered_conv(x, w, g, lowering), (x, w)


def _lowered_bwd(g, lowering, residuals, dy):
  x, w = residuals
  dx = INPUT_GRAD[lowering.input_grad](dy, w, g).astype(x.dtype)
  dw = WEIGHT_GRAD[lowering.weight_grad](x, dy, g).astype(w.dtype)
  return dx, dw


lowered_conv.defvjp(_lowered_fwd, _lowered_bwd)


def conv(
  x: jax.Array,
  w: jax.Array,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  impl: str = 'auto',
) -> jax.Array:
  """The NHWC/HWIO convolution of `x` with `w`, lowered as `impl` says: `auto` (the
  measured table on CPUs, XLA elsewhere), `xla`, or one formulation for every direction
  (`gemm`, `taps`)."""
  g = Geometry(x.shape, w.shape, tuple(strides), tuple(tuple(p) for p in padding))
  lowering = choose(g, x.dtype, impl)
  if lowering == XLA:
    return _xla(x, w, g)
  return lowered_conv(x, w, g, lowering)


def choose(g: Geometry, dtype: Any, impl: str) -> Lowering:
  """The lowering of each direction for a convolution of geometry `g`."""
  if impl == 'xla':
    return XLA
  if impl == 'auto':
    return XLA if jax.default_backend() != 'cpu' else _auto(g, dtype)
  if impl == 'onednn':
    if not onednn.available():
      raise UserError(
        'conv_impl=onednn needs oneDNN, which did not load: pip install onednn-cpu-gomp '
        '(x86-64 Linux, with libgomp), or use conv_impl=auto'
      )
    return ONEDNN if onednn_takes(g, dtype) else XLA
  return Lowering(impl, impl, impl)


def _auto(g: Geometry, dtype: Any) -> Lowering:
  """`auto` on a CPU. The table's timings hold on the CPU model that measured them; on
  another, oneDNN (which picks its kernels per instruction set) takes every shape without
  dead taps, the table's dead-tap choices (fewer multiply-adds whatever the CPU) stay, and
  XLA's convolution does the rest."""
  table = measured_table()
  # oneDNN runs each device's rows of the batch: only where this program's split of the
  # batch over devices is known, and where this process drives one device of it. Each of
  # several devices in one process would start its own oneDNN thread team on the same
  # cores (cifar_resnet20 over 8 host devices on 2 cores: 2-5x slower than XLA's).
  axes = batch_axes(g.x_shape[0])
  one_per_process = axes == () or jax.local_device_count() == 1
  use_onednn = (
    axes is not None and one_per_process and onednn_takes(g, dtype) and onednn_check.trusted()
  )
  key = g.key(dtype)
  if table.cpu == cpu_model():
    choices = table.with_onednn if use_onednn else table.choices
    if key in choices:
      return Lowering(**choices[key])
  if use_onednn and not g.has_dead_taps():
    return ONEDNN
  if g.has_dead_taps():
    return Lowering(**table.choices.get(key, {}))
  return XLA


def onednn_takes(g: Geometry, dtype: Any) -> bool:
  """Whether oneDNN computes this convolution here: float32, its library loads, and it
  creates the shape's three primitives."""
  return jnp.dtype(dtype) == jnp.float32 and onednn.supports(onednn.Shape(*g))


class Table(NamedTuple):
  """The committed per-shape choices ({key: {forward, input_grad, weight_grad}}) among
  XLA's formulations, the same with oneDNN as a candidate, and the CPU model they were
  measured on."""

  choices: dict[str, dict[str, str]]
  with_onednn: dict[str, dict[str, str]]
  cpu: str | None


@functools.cache
def measured_table() -> Table:
  """The table benchmarks/conv_lowerings.py wrote (empty if there is none)."""
  if not TABLE_FILE.exists():
    return Table({}, {}, None)
  table = json.loads(TABLE_FILE.read_text())
  return Table(table['choices'], table.get('choices_with_onednn', {}), table['measured'].get('cpu'))


@functools.cache
def conv_general_dilated(impl: str) -> Callable[..., jax.Array]:
  """A drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`)
  that lowers plain NHWC/HWIO convolutions with explicit padding as `impl` says, and
  anything else as XLA does."""

  def conv_fn(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
  ):
    plain = (
      impl != 'xla'
      and not isinstance(padding, str)
      and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == 1
      and precision is None
      and not kwargs
      and lhs.ndim == 4
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    )
    if plain:
      return conv(lhs, rhs, window_strides, padding, impl)
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )

  return conv_fn
