"""The model's implementation switches (issue 11) compute the default's function.

max_pool_impl='index' is bitwise equal to nn.max_pool, value and gradient; the other
switches reorder float32 sums, so they are compared with bounds derived from rounding:
a sum of n products reordered moves by at most about n * eps relative to its largest
term, and what follows the op only adds the same rounding to both paths.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.models import resnet
from resnet_jax.models.ops import max_pool
from resnet_jax.training import train

EPS32 = float(jnp.finfo(jnp.float32).eps)
POOL = dict(window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _rel(a: jax.Array, b: jax.Array) -> float:
  """Largest difference relative to the largest magnitude of `b` (0 where both are 0)."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _tie_heavy(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """ReLU of normals (a third of all windows tie at zero) or integer plateaus."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return np.maximum(x, 0) if kind == 'relu' else np.round(x)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('kind', ['relu', 'plateau'])
@pytest.mark.parametrize('shape', [(2, 16, 16, 8), (2, 15, 17, 4), (1, 56, 56, 64)])
def test_index_max_pool_is_bitwise_nn_max_pool(dtype, kind, shape):
  x = jnp.asarray(_tie_heavy(kind, shape, seed=sum(shape)), dtype)
  ref = lambda x: nn.max_pool(x, POOL['window'], POOL['strides'], padding=POOL['padding'])
  ours = lambda x: max_pool.max_pool(x, **POOL)
  y_ref, vjp_ref = jax.vjp(ref, x)
  g = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), dtype)
  grad = jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])
  assert y_ref.dtype == ours(x).dtype
  np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_array_equal(
    np.asarray(grad(x, g), np.float32), np.asarray(vjp_ref(g)[0], np.float32)
  )


def _stem(impl: str, input_channels: int = 0) -> resnet._StemConv:
  return resnet._StemConv(
    16, (7, 7), (2, 2), use_bias=False, impl=impl, input_channels=input_channels
  )


def test_space_to_depth_stem_is_the_7x7_stride_2_conv():
  x = jax.random.normal(jax.random.key(1), (2, 32, 30, 3))
  variables = _stem('conv').init(jax.random.key(0), x)
  outputs = {}
  for impl in models.STEM_IMPLS:
    loss = lambda v, x, impl=impl: jnp.sum(_stem(impl).apply(v, x) ** 2)
    outputs[impl] = (_stem(impl).apply(variables, x), *jax.grad(loss, (0, 1))(variables, x))
  (y, dk, dx), (y0, dk0, dx0) = outputs['space_to_depth'], outputs['conv']
  assert y.shape == y0.shape == (2, 16, 15, 16)
  # An output sums 7*7*3 products, a kernel gradient 2*16*15 (twice, through the square).
  assert _rel(y, y0) < 147 * EPS32
  assert _rel(dk['params']['kernel'], dk0['params']['kernel']) < 2 * 480 * EPS32
  assert _rel(dx, dx0) < 2 * 16 * 16 * EPS32


def test_stem_input_channels_pads_with_zeros_exactly():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = _stem('conv').init(jax.random.key(0), x)
  padded = _stem('conv', input_channels=4)
  assert jax.tree.map(jnp.shape, padded.init(jax.random.key(0), x)) == jax.tree.map(
    jnp.shape, variables
  )
  # The same 147 products per output, plus 49 zeros: equal on one CPU, but XLA may block
  # the 4-channel sum differently (29 of 2,048 outputs off by up to 4.5e-6 relative on an
  # AVX2 EPYC), so within the rounding of a sum of 7*7*4 products.
  y, y0 = padded.apply(variables, x), _stem('conv').apply(variables, x)
  assert y.shape == y0.shape and _rel(y, y0) < 196 * EPS32


def test_space_to_depth_stem_refuses_odd_images():
  with pytest.raises(UserError, match='even image size.*stem_impl=conv'):
    _stem('space_to_depth').init(jax.random.key(0), jnp.zeros((1, 15, 16, 3)))


def test_conv1x1_as_dot_is_the_strided_1x1_conv():
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 32))
  conv = lambda dot: resnet._conv(24, (1, 1), (2, 2), use_bias=False, dot_1x1=dot)
  variables = conv(False).init(jax.random.key(0), x)
  for dot in (False, True):
    loss = lambda v, x, dot=dot: jnp.sum(conv(dot).apply(v, x) ** 2)
    grads = jax.grad(loss, (0, 1))(variables, x)
    if not dot:
      y0, (dk0, dx0) = conv(False).apply(variables, x), grads
  y, (dk, dx) = conv(True).apply(variables, x), grads
  assert y.shape == y0.shape == (2, 5, 5, 24)
  assert _rel(y, y0) < 32 * EPS32
  assert _rel(dk['params']['kernel'], dk0['params']['kernel']) < 2 * 50 * EPS32
  assert _rel(dx, dx0) < 2 * 24 * EPS32


ALL_SWITCHES = dict(
  max_pool_impl='index', stem_impl='space_to_depth', stem_input_channels=4, conv1x1_impl='dot'
)


def test_all_switches_train_like_the_default_net():
  """One training forward and backward of a small bottleneck net (a stride-2 projection,
  the ImageNet stem) with every switch on equals the default: logits, running statistics
  and every gradient, to float32 rounding amplified through the network."""
  kwargs = dict(
    stage_sizes=(1, 1),
    stage_widths=(8, 16),
    block='bottleneck',
    stem_width=16,
    num_classes=10,
  )
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  default = models.ResNet(**kwargs)
  variables = default.init(jax.random.key(0), x, train=False)
  results = []
  for model in (default, models.ResNet(**kwargs, **ALL_SWITCHES)):
    assert jax.tree.map(jnp.shape, model.init(jax.random.key(0), x, train=False)) == (
      jax.tree.map(jnp.shape, variables)
    )

    def loss(params, model=model):
      logits, updates = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits * jnp.arange(10)), (logits, updates)

    results.append(jax.jit(jax.grad(loss, has_aux=True))(variables['params']))
  (grads, (logits, stats)), (grads0, (logits0, stats0)) = results[1], results[0]
  # Measured here: 6e-7 (logits), 6e-7 (statistics), 3e-6 (gradients through 6 BNs).
  assert _rel(logits, logits0) < 1e-5
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0), strict=True):
    assert _rel(a, b) < 1e-5
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize(
  'field, value', [('max_pool_impl', 'slices'), ('stem_impl', 's2d'), ('conv1x1_impl', 'gemm')]
)
def test_unknown_impl_is_a_one_line_error(field, value):
  with pytest.raises(UserError, match=f'unknown model {field} {value!r}; choose one of'):
    models.build_model('resnet18', **{field: value})


def _bottleneck_net(**overrides) -> models.ResNet:
  """A small bottleneck net: ImageNet stem, a stride-2 projection block, an identity block."""
  kwargs = dict(stage_sizes=(2, 1), stage_widths=(8, 16), block='bottleneck', stem_width=16)
  return models.ResNet(**kwargs, num_classes=10, **overrides)


def _sgd_steps(model: models.ResNet, variables, x, labels, steps: int):
  """`steps` plain SGD steps on one batch: the losses and the final variables."""

  def loss_fn(params, batch_stats):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return loss, updates['batch_stats']

  @jax.jit
  def step(params, batch_stats):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), batch_stats, loss

  params, batch_stats, losses = variables['params'], variables['batch_stats'], []
  for _ in range(steps):
    params, batch_stats, loss = step(params, batch_stats)
    losses.append(float(loss))
  return losses, {'params': params, 'batch_stats': batch_stats}


def test_fused_bottleneck_trains_like_the_default():
  """bottleneck_impl=fused (issue 13): the same variables, and three SGD steps of a small
  bottleneck net give the default's losses, parameters and running statistics to float32
  rounding; evaluation too."""
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.arange(4) % 10
  default = _bottleneck_net()
  fused = _bottleneck_net(bottleneck_impl='fused')
  variables = default.init(jax.random.key(0), x, train=False)
  fused_variables = fused.init(jax.random.key(0), x, train=False)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), variables, fused_variables))
  losses0, after0 = _sgd_steps(default, variables, x, labels, steps=3)
  losses, after = _sgd_steps(fused, variables, x, labels, steps=3)
  # Measured: losses within 5e-7; variables within 6e-6 of their largest entry on an AMD
  # EPYC, 1.8e-4 on an Intel Xeon (a BN bias of ~1e-2 whose updates are cancelling sums
  # over 4 examples, where the two CPUs' kernels round differently); a wrong fused term
  # moves them by O(1).
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(after0), strict=True):
    assert _rel(a, b) < 1e-3
  assert _rel(fused.apply(after, x, train=False), default.apply(after, x, train=False)) < 1e-5


def test_fused_bottleneck_in_bfloat16_stays_within_bf16_rounding():
  """In bfloat16, with the stride in the fused conv1 (`v1`), the training forward."""
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  common = dict(dtype=jnp.bfloat16, stride_placement='v1')
  default = _bottleneck_net(**common)
  variables = default.init(jax.random.key(0), x, train=False)
  fused = _bottleneck_net(**common, bottleneck_impl='fused')
  forward = lambda model: jax.jit(
    lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])[0]
  )(variables)
  y0, y = forward(default), forward(fused)
  # Each path rounds a handful of activations to bfloat16 (eps 2^-8) at different places;
  # measured 5e-3.
  assert y.dtype == jnp.float32 and _rel(y, y0) < 0.02


def test_fused_bottleneck_needs_bottleneck_blocks_and_whole_batch_bn():
  with pytest.raises(UserError, match='bottleneck_impl=fused needs bottleneck blocks'):
    models.build_model('resnet18', bottleneck_impl='fused')
  with pytest.raises(UserError, match='bn_group_size=0'):
    models.build_model('resnet50', bottleneck_impl='fused', bn_group_size=32)


def test_fused_bottleneck_refuses_a_mesh_of_several_accelerators():
  fused = models.build_model('resnet50', bottleneck_impl='fused')
  with pytest.raises(UserError, match='one gpu device per program for now, not 8; use'):
    train.check_kernels_fit_mesh(fused, 'gpu', 8)
  train.check_kernels_fit_mesh(fused, 'gpu', 1)
  train.check_kernels_fit_mesh(fused, 'cpu', 8)  # interpret mode: plain XLA ops
  train.check_kernels_fit_mesh(models.build_model('resnet50'), 'gpu', 8)
