"""The train step, optimizer and schedules, independent of any data pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar10, default
from resnet_jax import models, sharding
from resnet_jax.errors import UserError
from resnet_jax.models.ops import onednn
from resnet_jax.training import optim
from resnet_jax.training import step as ts


def _lr(schedule, steps):
  return [float(schedule(s)) for s in steps]


def test_paper_cifar_schedule_divides_by_10_at_32k_and_48k():
  c = cifar10.get_config('resnet56')
  _, schedule = optim.create_optimizer(c, 390, c.num_train_steps)
  np.testing.assert_allclose(
    _lr(schedule, [0, 31_999, 32_000, 47_999, 48_000, 63_999]),
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
    rtol=1e-6,
  )


def test_resnet110_warms_up_at_0_01_for_400_steps():
  c = cifar10.get_config('resnet110')
  _, schedule = optim.create_optimizer(c, 390, c.num_train_steps)
  np.testing.assert_allclose(
    _lr(schedule, [0, 399, 400, 31_999, 32_000, 48_000]),
    [0.01, 0.01, 0.1, 0.1, 0.01, 0.001],
    rtol=1e-6,
  )


def test_boundaries_in_epochs():
  c = cifar10.get_config()
  c.lr_boundaries, c.lr_boundaries_epochs = (), (2, 3)
  _, schedule = optim.create_optimizer(c, 100, 400)
  np.testing.assert_allclose(
    _lr(schedule, [199, 200, 299, 300]), [0.1, 0.01, 0.01, 0.001], rtol=1e-6
  )


def test_warmup_cosine_ramps_to_the_scaled_peak_and_ends_at_zero():
  c = default.get_config()  # lr 0.1 per 256 at batch 1024 -> 0.4; 5 warmup epochs
  _, schedule = optim.create_optimizer(c, 100, 10_000)
  lr = _lr(schedule, [0, 250, 500, 10_000])
  assert lr[0] == 0.0 and lr[1] == pytest.approx(0.2) and lr[2] == pytest.approx(0.4)
  assert lr[3] == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule_and_optimizer_are_user_errors():
  c = default.get_config()
  c.lr_schedule = 'cosin'
  with pytest.raises(UserError, match="unknown lr_schedule 'cosin'"):
    optim.create_optimizer(c, 10, 100)
  c = default.get_config()
  c.optimizer = 'adam'
  with pytest.raises(UserError, match="unknown optimizer 'adam'"):
    optim.create_optimizer(c, 10, 100)


@pytest.mark.parametrize('optimizer', ['sgd', 'lars'])
def test_weight_decay_leaves_bn_and_biases_alone(optimizer):
  c = default.get_config()
  c.optimizer, c.weight_decay, c.warmup_steps = optimizer, 0.1, 0
  tx, _ = optim.create_optimizer(c, 10, 100)
  params = models.build_model('cifar_resnet20').init(
    jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
  )['params']
  params = jax.tree.map(lambda p: p + 1.0, params)  # nonzero everywhere
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  block = updates['stage1_block1']
  assert jnp.all(block['bn1']['scale'] == 0) and jnp.all(block['bn1']['bias'] == 0)
  assert jnp.all(updates['head']['bias'] == 0)
  assert jnp.all(block['conv1']['kernel'] != 0)
  assert jnp.all(updates['head']['kernel'] != 0)


def _batches(n, batch=16, shape=(32, 32, 3), seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(batch, *shape)).astype(np.float32),
      'label': rng.integers(0, 10, batch).astype(np.int32),
    }
    for _ in range(n)
  ]


def _train(mesh, batches, model, tx, **kw):
  state = ts.create_train_state(model, tx, batches[0]['image'].shape[1:], 0, mesh)
  step = ts.make_train_step(model, tx, mesh, **kw)
  losses = []
  for b in batches:
    state, m = step(state, sharding.to_global_batch(b, mesh))
    losses.append(float(m['loss']))
  return state, losses


@pytest.mark.mesh
def test_eight_devices_train_and_evaluate_like_one():
  model = models.build_model('cifar_resnet20')
  c = default.get_config()
  # A small learning rate: a stable regime, where the reduction-order rounding stays
  # rounding-sized (at 0.1 the loss jumps from 2.5 to 8 and the runs diverge chaotically).
  c.warmup_steps, c.batch_size, c.learning_rate = 0, 256, 0.001
  tx, _ = optim.create_optimizer(c, 10, 100)
  batches = _batches(4)
  results = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    state, losses = _train(mesh, batches, model, tx)
    eval_batch = sharding.to_global_batch(dict(batches[0], mask=np.ones(16, np.float32)), mesh)
    results[n] = losses, ts.evaluate(ts.make_eval_step(model, mesh), state, [eval_batch])
  # Global-batch BN and gradients are the same sums; only the reduction order differs,
  # so losses agree to float32 rounding (a few ulps, ~1e-7; 1e-5 leaves a 100x margin)
  # and so does the eval after 4 steps.
  np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
  for k in ('eval_loss', 'eval_top1', 'eval_top5'):
    assert results[8][1][k] == pytest.approx(results[1][1][k], rel=1e-5)
  assert results[8][1]['eval_count'] == results[1][1]['eval_count'] == 16


@pytest.mark.mesh
@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_steps_over_a_mesh_run_onednn_on_each_devices_rows():
  # The steps are traced on their mesh, so oneDNN's convolutions see each device's 2 of
  # the 16 rows (test_conv_lowering checks the values). `auto` takes oneDNN over a mesh
  # where each process drives one device (multi-process runs); here, 8 devices in one
  # process, only where asked for.
  model = models.build_model('cifar_resnet20', conv_impl='onednn')
  mesh = sharding.make_mesh()
  tx = optax.sgd(0.1)
  state = ts.create_train_state(model, tx, (32, 32, 3), 0, mesh)
  batch = sharding.to_global_batch(dict(_batches(1)[0], mask=np.ones(16, np.float32)), mesh)
  train = ts.make_train_step(model, tx, mesh).lower(state, batch).as_text()
  for direction in ('forward', 'input_grad', 'weight_grad'):
    assert f'resnet_jax_onednn_{direction}_2x32x32x16_3x3x16' in train
  evaluation = ts.make_eval_step(model, mesh).lower(state, batch, ts.empty_totals()).as_text()
  assert 'resnet_jax_onednn_forward_2x32x32x16_3x3x16' in evaluation
  assert 'resnet_jax_onednn_weight_grad' not in evaluation


def test_eval_ignores_masked_rows():
  model = models.build_model('cifar_resnet20')
  tx, _ = optim.create_optimizer(default.get_config(), 10, 100)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = ts.create_train_state(model, tx, (32, 32, 3), 0, mesh)
  b = _batches(1)[0]
  mask = np.r_[np.ones(10), np.zeros(6)].astype(np.float32)
  padded = dict(b, mask=mask)
  padded['image'][10:] = 1e6  # garbage in padded rows must not count
  first10 = {k: v[:10] for k, v in b.items()} | {'mask': np.ones(10, np.float32)}
  step = ts.make_eval_step(model, mesh)
  full = ts.evaluate(step, state, [sharding.to_global_batch(padded, mesh)])
  ref = ts.evaluate(step, state, [sharding.to_global_batch(first10, mesh)])
  assert full['eval_count'] == 10
  assert full['eval_loss'] == pytest.approx(ref['eval_loss'], rel=1e-5)


def test_nonfinite_steps_are_flagged_and_can_be_skipped():
  model = models.build_model('cifar_resnet20')
  tx, _ = optim.create_optimizer(default.get_config(), 10, 100)
  mesh = sharding.make_mesh(jax.devices()[:1])
  bad = _batches(1)[0]
  bad['image'][0, 0, 0, 0] = np.nan
  state0 = ts.create_train_state(model, tx, (32, 32, 3), 0, mesh)
  params0 = jax.device_get(state0.params)
  step = ts.make_train_step(model, tx, mesh, skip_nonfinite=True)
  state, m = step(state0, sharding.to_global_batch(bad, mesh))
  assert float(m['finite']) == 0.0 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params0)


def test_bf16_step_keeps_float32_state():
  model = models.build_model('cifar_resnet20', dtype='bfloat16')
  tx, _ = optim.create_optimizer(default.get_config(), 10, 100)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state, losses = _train(mesh, _batches(2), model, tx)
  assert np.isfinite(losses).all()
  leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats)
