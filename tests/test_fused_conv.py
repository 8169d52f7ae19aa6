"""fused_conv: the fused 1x1 conv equals the unfused XLA composition, values and gradients."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import fused_conv as bench
from resnet_jax import models
from resnet_jax.models.ops import fused_conv as fc
from tests.helpers import result_rows, run_python, triton_calls

EPS32 = float(jnp.finfo(jnp.float32).eps)
# ResNet-50's 1x1 shape classes (Cin -> Cout) with channels / 8, and M = 2x7x7, 5x5x8
# and the like: never a multiple of the 32-row blocks, so the last block is padded. The
# prologue is on where ResNet-50 has it (a bottleneck's last 1x1) and on some others.
CASES = [
  # (ResNet-50 channels, M, Cin, Cout, prologue)
  ('64->64', 98, 8, 8, True),
  ('64->256', 98, 8, 32, True),
  ('256->64', 200, 32, 8, True),
  ('256->128', 72, 32, 16, False),
  ('512->2048', 50, 64, 256, True),
  ('2048->512', 50, 256, 64, False),
]


def _small_blocks(cin: int, cout: int) -> dict:
  """Blocks that split every test shape into several blocks along each dimension, the
  wgrad's M into two splits of several steps each, both padded."""
  wgrad_blocks = fc.WgradBlocks(min(cin, 16), min(cout, 16), 8, splits=2)
  return dict(blocks=fc.Blocks(32, min(cout, 16), min(cin, 8)), wgrad_blocks=wgrad_blocks)


def _inputs(m: int, cin: int, cout: int, dtype, shape: tuple | None = None) -> tuple:
  """(x, scale, bias, w) like a trained net's, x of `shape` (default [m, cin])."""
  rng = np.random.default_rng(m * cin + cout)
  x = rng.standard_normal(shape or (m, cin))
  scale, bias = 1.0 + 0.3 * rng.standard_normal(cin), 0.3 * rng.standard_normal(cin)
  w = rng.standard_normal((cin, cout)) / np.sqrt(cin)
  f32 = jnp.float32
  return (
    jnp.asarray(x, dtype),
    jnp.asarray(scale, f32),
    jnp.asarray(bias, f32),
    jnp.asarray(w, dtype),
  )


def _loss_and_grads(fn, inputs: tuple, cts: tuple):
  """Outputs of fn(*inputs) and the gradients of sum(y*r) + dot(sum, u) + dot(sumsq, v)."""

  def loss(*args):
    y, s1, s2 = outputs = fn(*args)
    r, u, v = cts
    return jnp.sum(y.astype(jnp.float32) * r) + s1 @ u + s2 @ v, outputs

  grads, outputs = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*inputs)
  return outputs, grads


def _cotangents(y_shape: tuple, dtype) -> tuple:
  """(r, u, v) of the loss: r rounded to y's dtype, u and v small as a BN's would be."""
  rng = np.random.default_rng(1)
  cout, count = y_shape[-1], np.prod(y_shape[:-1])
  r = jnp.asarray(rng.standard_normal(y_shape), dtype).astype(jnp.float32)
  u, v = (jnp.asarray(rng.standard_normal(cout) / count, jnp.float32) for _ in range(2))
  return r, u, v


def _tolerances(inputs: tuple, cts: tuple, outputs: tuple, prologue: bool, stride: int) -> tuple:
  """Per-element bounds on |fused - reference| for the outputs and the gradients.

  Each is a magnitude (the computation redone on absolute values, in float64) times
  rounding: the two ways sum in other orders (float32, up to ~eps32*sqrt(n) of the
  magnitude for a sum of n terms, counted for each way), and a value rounded to the
  dtype may land one ulp (up to eps*|value|) apart; the gradients round g, dA (the
  reference's cotangent of the bf16 A) and themselves, and read a y that may differ.
  """
  eps = float(jnp.finfo(inputs[0].dtype).eps)
  x_in, scale, bias, w = (np.asarray(t, np.float64) for t in inputs)
  # The pixels the conv reads; dx is exactly 0 at the others in both ways.
  kept = np.s_[:, ::stride, ::stride] if stride > 1 else np.s_[...]
  x = x_in[kept].reshape(-1, w.shape[0])
  # Magnitudes need no rounding to the dtype.
  a = np.maximum(x * scale + bias, 0) if prologue else np.abs(x)
  x, w = np.abs(x), np.abs(w)
  y = np.abs(np.asarray(outputs[0], np.float64)).reshape(-1, w.shape[1])
  m, (cin, cout) = x.shape[0], w.shape
  tol_y = eps * y + _sums(cin) * (a @ w)
  tol_s1 = tol_y.sum(0) + _sums(m) * y.sum(0)
  tol_s2 = (2 * y * tol_y + tol_y**2).sum(0) + _sums(m) * (y * y).sum(0)
  r, u, v = (np.abs(np.asarray(t, np.float64)) for t in cts)
  g = r.reshape(m, cout) + u + 2 * y * v
  gw = g @ w.T
  tol_da = (5 * eps + _sums(cout)) * gw
  gain = np.abs(scale) if prologue else 1.0
  tol_dx = np.zeros(x_in.shape)
  tol_dx[kept] = ((tol_da + eps * gw) * gain).reshape(tol_dx[kept].shape)
  tol_dbias = (tol_da + _sums(m) * gw).sum(0) if prologue else 0 * scale
  tol_dscale = ((tol_da + _sums(m) * gw) * x).sum(0) if prologue else 0 * scale
  tol_dw = (5 * eps + _sums(m)) * (a.T @ g)
  tol_out = (tol_y.reshape(outputs[0].shape), tol_s1, tol_s2)
  return tol_out, (tol_dx, tol_dscale, tol_dbias, tol_dw)


def _sums(n: int) -> float:
  """Relative float32 rounding of a sum of n terms, in each of two orders."""
  return 2 * EPS32 * np.sqrt(n)


def _assert_within(name: str, got, want, tol) -> None:
  """Asserts |got - want| <= tol elementwise (want and tol reshaped as got)."""
  got = np.asarray(got, np.float64)
  err = np.abs(got - np.asarray(want, np.float64).reshape(got.shape))
  bad = ~(err <= np.reshape(tol, got.shape))  # NaN is bad too.
  assert not bad.any(), f'{name}: {bad.sum()} of {bad.size} off, largest error {err.max():.3g}'


def _check(ways: dict, ref, inputs: tuple, prologue: bool, y_shape: tuple, stride: int = 1):
  """Each fused way's outputs and gradients equal the reference's to the derived bounds."""
  cts = _cotangents(y_shape, inputs[0].dtype)
  ref_outputs, ref_grads = _loss_and_grads(ref, inputs, cts)
  tol_out, tol_grads = _tolerances(inputs, cts, ref_outputs, prologue, stride)
  names = ('y', 'sum', 'sumsq', 'dx', 'dscale', 'dbias', 'dw')
  for way, fused in ways.items():
    outputs, grads = _loss_and_grads(fused, inputs, cts)
    assert outputs[0].shape == y_shape and outputs[0].dtype == inputs[0].dtype
    assert outputs[1].dtype == outputs[2].dtype == jnp.float32
    values = zip(
      names, (*outputs, *grads), (*ref_outputs, *ref_grads), (*tol_out, *tol_grads), strict=True
    )
    for name, got, want, tol in values:
      _assert_within(f'{way} {name}', got, want, tol)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize(
  ('m', 'cin', 'cout', 'prologue'), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_outputs_and_gradients_equal_the_unfused_composition(m, cin, cout, prologue, dtype):
  inputs = _inputs(m, cin, cout, dtype)
  options = dict(prologue=prologue, **_small_blocks(cin, cout))
  # The XLA wgrad (the reference backward) in bfloat16 only, where roundings differ most.
  wgrads = fc.WGRAD_IMPLS if dtype == jnp.bfloat16 else ('pallas',)
  ways = {w: functools.partial(fc.conv1x1_bn, wgrad=w, **options) for w in wgrads}
  ref = lambda x, *a: fc.reference(x[None, None], *a, prologue=prologue)
  _check(ways, ref, inputs, prologue, (m, cout))


@pytest.mark.parametrize('prologue', [False, True])
def test_nhwc_wrapper_with_stride_2_equals_a_strided_conv(prologue):
  # A 1024->2048 projection with channels / 16 on an odd 7x7 map: 3x4x4 = 48 output rows.
  inputs = _inputs(0, 64, 128, jnp.bfloat16, shape=(3, 7, 7, 64))
  options = dict(stride=2, prologue=prologue)
  fused = functools.partial(fc.conv1x1_bn_nhwc, **options, **_small_blocks(64, 128))
  ref = functools.partial(fc.reference, **options)
  _check({'nhwc': fused}, ref, inputs, prologue, (3, 4, 4, 128), stride=2)


def test_default_blocks_equal_the_unfused_composition():
  inputs = _inputs(300, 256, 64, jnp.bfloat16)
  ref = lambda x, *a: fc.reference(x[None, None], *a)
  _check({'default': fc.conv1x1_bn}, ref, inputs, True, (300, 64))


def test_blocks_must_suit_triton_and_the_shape():
  with pytest.raises(ValueError, match='power of two'):
    fc.Blocks(m=96, n=64, k=64)
  x, scale, bias, w = _inputs(64, 32, 64, jnp.float32)
  with pytest.raises(ValueError, match='does not tile Cin=32'):
    fc.conv1x1_bn(x, scale, bias, w, blocks=fc.Blocks(32, 64, 64))
  with pytest.raises(ValueError, match='dtype of x'):
    fc.conv1x1_bn(x, scale, bias, w.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match='needs scale and bias'):
    fc.conv1x1_bn(x, None, None, w)


def _resnet50_convs() -> collections.Counter:
  model = models.build_model('resnet50')
  return collections.Counter(bench.conv1x1_shapes(model, (224, 224, 3), 256))


def test_resnet50_has_16_distinct_1x1_convs_that_the_default_blocks_tile_whole():
  convs = _resnet50_convs()
  # 16 bottlenecks with two 1x1 convs each, and 4 projections (3 of them with stride 2).
  assert len(convs) == 16 and sum(convs.values()) == 36
  assert sum(n for c, n in convs.items() if c.stride == 2) == 3
  assert sum(n for c, n in convs.items() if c.prologue) == 16
  for conv in convs:
    b = fc.choose_blocks(conv.cin, conv.cout)
    # Whole blocks everywhere (M = 256*49*4**k): no padding; Triton's dot needs >= 16.
    assert conv.rows % b.m == 0 and conv.cin % b.k == 0 and conv.cout % b.n == 0, conv
    assert min(b.m, b.n, b.k) >= 16, conv
    wb = fc.choose_wgrad_blocks(conv.rows, conv.cin, conv.cout)
    assert conv.rows % (wb.k * wb.splits) == 0 and min(wb.m, wb.n, wb.k) >= 16, conv
    assert conv.cin % wb.m == 0 and conv.cout % wb.n == 0, conv
    # At least a wave over an H100's 132 SMs, at most two.
    assert 132 < conv.cin // wb.m * (conv.cout // wb.n) * wb.splits <= fc.WGRAD_PROGRAMS, conv


def test_pallas_kernels_lower_to_triton_for_a_gpu():
  shapes = [(c.rows, c.cin, c.cout, c.prologue) for c in _resnet50_convs()]
  # And padded M (statistics masked, wgrad rows padded) with Cin, Cout not powers of two.
  shapes.append((98, 96, 48, True))
  for rows, cin, cout, prologue in shapes:
    # The forward and the wgrad kernel: the outputs and their VJP.
    op = lambda *a, p=prologue: fc.conv1x1_bn(*a, prologue=p, interpret=False)
    fn = jax.jit(lambda inputs, cts, op=op: jax.vjp(op, *inputs)[1](cts))
    bf16, f32 = jnp.bfloat16, jnp.float32
    inputs = [((rows, cin), bf16), ((cin,), f32), ((cin,), f32), ((cin, cout), bf16)]
    cts = [((rows, cout), bf16), ((cout,), f32), ((cout,), f32)]
    shaped = lambda specs: tuple(jax.ShapeDtypeStruct(*spec) for spec in specs)
    assert triton_calls(fn, shaped(inputs), shaped(cts)) == 2, (rows, cin, cout)


def test_benchmark_reports_per_shape_rows_without_tensorflow_or_ml_collections():
  code = """
    import sys
    sys.modules['tensorflow'] = None
    sys.modules['ml_collections'] = None
    from benchmarks import fused_conv
    code = fused_conv.main(['--batch', '1', '--image_size', '32', '--dtype', 'fp32',
                            '--shapes', '1', '--windows', '1', '--reps', '1'])
    assert code == 0
  """
  proc = run_python(code, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = result_rows(proc.stdout)
  # ResNet-50's first 1x1 conv on an 8x8 map: 64->64, once, reading the max pool's output.
  ways = [('fwd', 'xla'), ('fwd', 'pallas')]
  ways += [('fwd_bwd', w) for w in ('xla', 'pallas', 'pallas_xla_wgrad')]
  assert [(r['shape'], r['prologue'], r['convs'], r['pass'], r['way']) for r in rows] == [
    ([64, 64, 64], False, 1, *way) for way in ways
  ]
  for r in rows:
    assert r['ms'] > 0 and r['tflops'] > 0 and r['gb_per_s'] > 0 and r['max_rel_diff'] < 1e-5
    assert r['speedup_vs_xla'] == 1.0 if r['way'] == 'xla' else r['speedup_vs_xla'] > 0
    blocks = {'xla': None, 'pallas': {'blocks', 'wgrad_blocks'}}.get(r['way'], {'blocks'})
    assert (r['blocks'] and set(r['blocks'])) == blocks
