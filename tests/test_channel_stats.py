"""channel_stats: every impl equals a float64 reference, and its Pallas kernel suits Triton."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bn_stats
from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.models.ops import channel_stats as cs
from tests.helpers import result_rows, run_python, triton_calls

# rows = 98 (a 7x7 map, as ResNet's last stage), 256 and 75; C = 64, 96 (not a power of
# two: tiles of 32 channels) and 256.
SHAPES = [(2, 7, 7, 64), (4, 8, 8, 96), (3, 5, 5, 256)]
# Tiles of 8 rows, 3 to a program: several programs and channel blocks, and rows left over.
SMALL_BLOCKS = cs.Blocks(rows=8, channels=32, tiles=3)
WAYS = [
  ('xla', None),
  ('two_stage', None),
  ('two_stage', SMALL_BLOCKS),
  ('pallas', None),
  ('pallas', SMALL_BLOCKS),
]


def _float64_sums(x: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per channel: the sum, the sum of squares and the sum of absolute values."""
  rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return rows.sum(axis=0), (rows * rows).sum(axis=0), np.abs(rows).sum(axis=0)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(('impl', 'blocks'), WAYS)
def test_sums_equal_float64_to_float32_rounding(impl, blocks, dtype, shape):
  x = jnp.asarray(1.0 + np.random.default_rng(0).standard_normal(shape), dtype)
  s1, s2 = jax.jit(lambda x: cs.channel_sums(x, impl, blocks=blocks))(x)
  ref1, ref2, abs1 = _float64_sums(x)
  # Float32 rounding of a sum of n terms is typically under sqrt(n) ulps of the sum of
  # |terms| in any summation order (n in the worst case); a row missed or counted twice
  # errs by ~1/n of it, far more.
  rows = x.size // shape[-1]
  tol = np.finfo(np.float32).eps * np.sqrt(rows)
  assert s1.dtype == s2.dtype == jnp.float32 and s1.shape == s2.shape == (shape[-1],)
  assert np.all(np.abs(np.asarray(s1) - ref1) <= tol * abs1)
  assert np.all(np.abs(np.asarray(s2) - ref2) <= tol * ref2)


@pytest.mark.parametrize(('impl', 'blocks'), WAYS)
def test_integer_valued_sums_and_means_are_exact(impl, blocks):
  # Small integers sum exactly in float32, so any difference is a row read wrongly.
  shape = (3, 7, 7, 96)
  x = jnp.asarray(np.random.default_rng(1).integers(-4, 5, shape), jnp.bfloat16)
  (s1, s2), (m1, m2) = jax.jit(
    lambda x: (cs.channel_sums(x, impl, blocks=blocks), cs.channel_means(x, impl, blocks=blocks))
  )(x)
  ref1, ref2, _ = _float64_sums(x)
  np.testing.assert_array_equal(s1, ref1)
  np.testing.assert_array_equal(s2, ref2)
  # XLA may divide by the count as a multiply by its reciprocal: a rounding or two.
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(m1, ref1 / (3 * 7 * 7), rtol=2 * eps, atol=0)
  np.testing.assert_allclose(m2, ref2 / (3 * 7 * 7), rtol=2 * eps, atol=0)


def test_unknown_impl_is_a_one_line_user_error():
  with pytest.raises(UserError, match=r"^unknown channel-stats impl 'triton': use one of xla, "):
    cs.channel_sums(jnp.ones((2, 4)), 'triton')


def test_blocks_must_suit_triton():
  with pytest.raises(ValueError, match='power of two'):
    cs.Blocks(rows=12, channels=32, tiles=1)
  with pytest.raises(ValueError, match='does not divide C=96'):
    cs.channel_sums(jnp.ones((64, 96)), 'pallas', blocks=cs.Blocks(8, 64, 1))


def _resnet50_shapes() -> list[tuple[int, ...]]:
  shapes = bn_stats.bn_input_shapes(models.build_model('resnet50'), (224, 224, 3), 256)
  return list(dict.fromkeys(shapes))


def test_blocks_for_resnet50_at_batch_256_cover_every_row_with_enough_programs():
  shapes = _resnet50_shapes()
  assert len(shapes) == 12 and shapes[-1] == (256, 7, 7, 2048)
  for shape in shapes:
    rows, channels = shape[0] * shape[1] * shape[2], shape[3]
    b = cs.choose_blocks(rows, channels)
    assert b.rows * b.channels <= cs.TILE_ELEMENTS and channels % b.channels == 0, shape
    # rows = 256 * 49 * 4**k: whole programs, so XLA sums no leftover rows.
    assert rows % (b.rows * b.tiles) == 0, shape
    programs = rows // (b.rows * b.tiles) * (channels // b.channels)
    assert cs.MIN_PROGRAMS <= programs <= 4 * cs.MIN_PROGRAMS or b.tiles == 1, shape


def test_pallas_kernel_lowers_to_triton_for_a_gpu():
  shapes = [*_resnet50_shapes(), (2, 7, 7, 96)]
  fn = jax.jit(lambda x: cs.channel_sums(x, 'pallas', interpret=False))
  for shape in shapes:
    assert triton_calls(fn, jax.ShapeDtypeStruct(shape, jnp.bfloat16)) >= 1, shape


def test_bn_stats_reports_per_shape_rows_without_tensorflow_or_ml_collections():
  code = """
    import sys
    sys.modules['tensorflow'] = None
    sys.modules['ml_collections'] = None
    from benchmarks import bn_stats
    code = bn_stats.main(['--model', 'cifar_resnet20', '--batch', '2', '--image_size', '8',
                          '--dtype', 'fp32', '--windows', '1', '--reps', '1',
                          '--ways', 'flax,two_stage,pallas',
                          '--shape_ways', 'pallas,xla,two_stage'])
    assert code == 0
  """
  proc = run_python(code, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = result_rows(proc.stdout)
  overall, per_shape = rows[:3], rows[3:]
  assert [r['way'] for r in overall] == ['flax', 'two_stage', 'pallas']
  assert all(r['bn_layers'] == 19 and r['max_rel_diff'] < 1e-5 for r in overall)
  # CIFAR ResNet-20's BN inputs: 16, 32 and 64 channels on 8x8, 4x4 and 2x2 maps.
  assert [(r['shape'], r['way']) for r in per_shape] == [
    (s, w)
    for s in ([2, 8, 8, 16], [2, 4, 4, 32], [2, 2, 2, 64])
    for w in ('xla', 'two_stage', 'pallas')
  ]
  assert sum(r['bn_layers'] for r in per_shape) == 3 * 19
  for r in per_shape:
    assert r['ms'] > 0 and r['read_gb'] > 0 and r['max_rel_diff'] < 1e-5
    assert r['speedup_vs_xla'] == 1.0 if r['way'] == 'xla' else r['speedup_vs_xla'] > 0
    assert (r['blocks'] is None) == (r['way'] == 'xla')
