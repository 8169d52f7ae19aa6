"""Stacks of runs (resnet_jax.training.stack): each member computes what its single run computes."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs import smoke
from resnet_jax import data, sharding
from resnet_jax.errors import UserError
from resnet_jax.training import stack, train
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.training.metrics import read_metrics
from tests.helpers import wait_for_step
from tests.process_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / 'shared' / 'datasets'
# Twins plus a second seed: the members differ in seed and in the residual switch.
MEMBERS = {'plain_seed0': (0, False), 'plain_seed1': (1, False), 'resnet_seed0': (0, True)}


def _mesh(devices=1):
  return sharding.make_mesh(jax.devices()[:devices])


def _config(**overrides):
  """A small CIFAR-style net (one block per stage) at a small learning rate: a stable regime."""
  c = smoke.get_config()
  c.model_overrides.stage_sizes = (1, 1, 1)
  c.model_overrides.shortcut = 'A'
  c.compilation_cache_dir = ''
  c.learning_rate = 0.02
  c.lr_schedule = 'constant'
  c.warmup_steps = 0
  c.update(overrides)
  return c


def _stacked(**overrides):
  seeds, residual = zip(*MEMBERS.values(), strict=True)
  return _config(stack_seeds=seeds, stack_residual=residual, **overrides)


def _train(config, mesh, steps):
  """(state, per-step losses) after `steps` steps of `config` from its initial state."""
  setup = train.build(config, mesh)
  state = setup.create_state(config.seed)
  step_fn = setup.train_step(0.0, False)
  batches = data.train_batches(config, mesh, 0, setup.batch_seeds())
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, next(batches))
    losses.append(np.asarray(metrics['loss']))
  return jax.device_get(state), np.stack(losses)


def _relative(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def singles(tfds_dir):
  """The single runs the members stand for: 3 steps of CIFAR-10, 2 devices."""
  mesh = _mesh(2)
  return {
    name: _train(
      _config(
        model=f'cifar_{"resnet" if residual else "plain"}20',
        seed=seed,
        dataset='cifar10',
        data_dir=tfds_dir,
        normalize='per_pixel_mean',
      ),
      mesh,
      3,
    )
    for name, (seed, residual) in MEMBERS.items()
  }


@pytest.mark.mesh
@pytest.mark.parametrize('method', ['unroll', 'vmap'])
def test_each_member_computes_its_single_run(method, singles, tfds_dir):
  config = _stacked(
    dataset='cifar10', data_dir=tfds_dir, normalize='per_pixel_mean', stack_method=method
  )
  state, losses = _train(config, _mesh(2), 3)
  for k, name in enumerate(MEMBERS):
    single_state, single_losses = singles[name]
    loss_error = float(np.max(np.abs(losses[:, k] - single_losses) / single_losses))
    param_error = _relative(stack.member_state(state, k).params, single_state.params)
    stats_error = _relative(stack.member_state(state, k).batch_stats, single_state.batch_stats)
    print(f'{method} {name}: loss {loss_error:.1e}, params {param_error:.1e}')
    assert loss_error <= 1e-5
    assert param_error <= 1e-5 and stats_error <= 1e-5


@pytest.mark.mesh  # `singles` runs on 2 devices: built once, in the part of the tests above
def test_members_differ_as_their_single_runs_do(singles):
  losses = {name: singles[name][1] for name in MEMBERS}
  # Another seed: another initialisation and data order, so other losses from step 1.
  assert np.all(losses['plain_seed0'] != losses['plain_seed1'])
  # Twins start from the same parameters; only the shortcuts tell them apart.
  init = train.build(_stacked(), _mesh()).create_state(0)
  plain, residual = (stack.member_state(init, k).params for k in (0, 2))
  jax.tree.map(np.testing.assert_array_equal, plain, residual)
  assert np.all(losses['plain_seed0'] != losses['resnet_seed0'])


@pytest.mark.mesh
def test_stacked_batches_are_each_seeds_single_batches(tfds_dir):
  mesh = _mesh(8)
  for fields in (
    {'dataset': 'synthetic'},
    {'dataset': 'cifar10', 'data_dir': tfds_dir, 'device_resident_data': True},
    {'dataset': 'cifar10', 'data_dir': tfds_dir},
  ):
    stacked = data.train_batches(_config(**fields), mesh, start_step=5, seeds=(3, 1))
    batch = jax.device_get(next(stacked))
    assert batch['image'].shape[:2] == (2, 16)
    for k, seed in enumerate((3, 1)):
      single = jax.device_get(next(data.train_batches(_config(seed=seed, **fields), mesh, 5)))
      jax.tree.map(np.testing.assert_array_equal, {x: v[k] for x, v in batch.items()}, single)


def test_member_names_and_bad_stacks():
  members = stack.members(_stacked(), residual=True)
  assert [m.name for m in members] == list(MEMBERS)
  assert [m.name for m in stack.members(_config(stack_seeds=(4, 5)), True)] == ['seed4', 'seed5']
  scaled = stack.members(_config(stack_lr_scale=(1.0, 0.5)), True)
  assert [(m.name, m.lr_scale) for m in scaled] == [('seed0_lr1', 1.0), ('seed0_lr0.5', 0.5)]
  bad = {
    'has 1 entries but the stack has 2': _config(stack_seeds=(0, 1), stack_residual=(True,)),
    'identical members': _config(stack_seeds=(1, 1)),
    'must be True/False': _config(stack_residual=(1, 0)),
    'must be positive numbers': _config(stack_lr_scale=(1.0, -1.0)),
  }
  for message, config in bad.items():
    with pytest.raises(UserError, match=message):
      train.build(config, _mesh())
  option_b = _stacked()
  option_b.model_overrides.shortcut = 'B'
  with pytest.raises(UserError, match='option .B.* set --config.model_overrides.shortcut=A'):
    train.build(option_b, _mesh())
  with pytest.raises(UserError, match='stack_method'):
    train.build(_stacked(stack_method='pmap'), _mesh())


def test_lr_scale_scales_the_learning_rate():
  """A member with lr scale s trains as the single run with s times the learning rate."""
  mesh = _mesh()
  state, _ = _train(_config(stack_seeds=(0, 0), stack_lr_scale=(1.0, 0.5)), mesh, 2)
  half, _ = _train(_config(learning_rate=0.01), mesh, 2)
  assert _relative(stack.member_state(state, 1).params, half.params) <= 1e-5


def test_a_stack_trains_on_real_data_and_evaluates_within_noise(tfds_dir, tmp_path):
  """MNIST, 200 steps: members end where single runs end, within what seeds change.

  On one device, where oneDNN's convolutions run (sharded stacks: the `mesh` tests)."""
  fields = dict(
    dataset='mnist',
    data_dir=tfds_dir,
    batch_size=64,
    eval_batch_size=1000,
    num_train_steps=200,
    learning_rate=0.4,
    lr_schedule='step',
    lr_boundaries=(100, 150),
    eval_every_steps=200,
    checkpoint_every_steps=200,
    log_every_steps=50,
  )
  mesh = _mesh()
  train.train_and_evaluate(_config(**fields), str(tmp_path / 'single'), mesh)
  c = _config(stack_seeds=(0, 1), **fields)
  train.train_and_evaluate(c, str(tmp_path / 'stack'), mesh)
  single = read_metrics(tmp_path / 'single')[-1]
  members = [read_metrics(tmp_path / 'stack' / f'seed{k}')[-1] for k in (0, 1)]
  print('eval top-1: single', single['eval_top1'], 'members', [m['eval_top1'] for m in members])
  assert all(m['eval_count'] == 10_000 and m['eval_top1'] > 0.95 for m in [single, *members])
  # Member 0 follows the single run's trajectory up to rounding, which 200 steps amplify
  # into another sample of the same run; seeds of such a run differ by ~0.5 points.
  for member in members:
    assert abs(member['eval_top1'] - single['eval_top1']) <= 0.01


# From main.py: a kill -9 and a restart end where an uninterrupted stack ends; eval.


def _main(workdir, *extra):
  flags = [
    '--config.model_overrides.shortcut=A',
    '--config.model_overrides.stage_sizes=(1,1,1)',
    '--config.stack_seeds=(0,1)',
    '--config.stack_residual=(False,True)',
    '--config.num_train_steps=24',
    '--config.checkpoint_every_steps=4',
    '--config.log_every_steps=5',
    '--config.compilation_cache_dir=',
  ]
  return subprocess.Popen(
    [
      sys.executable,
      'main.py',
      '--config=configs/smoke.py',
      f'--workdir={workdir}',
      *flags,
      *extra,
    ],
    cwd=REPO,
    env={**os.environ, 'XLA_FLAGS': xla_flags(2)},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc):
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out
  return out


def _state(workdir):
  setup = train.build(_config(stack_seeds=(0, 1), stack_residual=(False, True)), _mesh())
  ckpt = Checkpoints(str(workdir), read_only=True)
  state = ckpt.restore(setup.abstract_state())
  ckpt.close()
  return jax.device_get(state)


def _rows(workdir):
  return {
    name: [{k: v for k, v in r.items() if k != 'img_per_s'} for r in read_metrics(workdir / name)]
    for name in ('plain_seed0', 'resnet_seed1')
  }


def test_kill9_then_restart_equals_an_uninterrupted_stack_and_eval_covers_members(tmp_path):
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  _finish(_main(whole))
  kill_at = random.Random().randint(3, 20)
  print('kill -9 after step', kill_at)
  proc = _main(killed)
  wait_for_step(killed / 'plain_seed0', kill_at, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _finish(_main(killed))
  jax.tree.map(np.testing.assert_array_equal, _state(killed), _state(whole))
  assert _rows(killed) == _rows(whole)
  assert _rows(whole)['plain_seed0'] != _rows(whole)['resnet_seed1']

  out = _finish(_main(whole, '--mode=eval'))
  lines = [x for x in out.splitlines() if x.startswith('member=')]
  assert [x.split()[0] for x in lines] == ['member=plain_seed0', 'member=resnet_seed1']
  for name in ('plain_seed0', 'resnet_seed1'):
    row = read_metrics(whole / name)[-1]
    assert row['mode'] == 'eval' and row['step'] == 24 and row['eval_count'] == 1000


# Data without tensorflow: the shared .npz archives give the TFDS path's arrays.


@pytest.fixture
def npz_dir():
  if not (SHARED_DATASETS / 'cifar10_jpeg.npz').exists():
    pytest.skip(f'{SHARED_DATASETS} is missing: the real datasets live in ../shared')
  return str(SHARED_DATASETS)


@pytest.mark.mesh
@pytest.mark.parametrize('dataset', ['mnist', 'cifar10'])
def test_npz_archives_give_the_tfds_arrays_and_batches(dataset, npz_dir, tfds_dir):
  from resnet_jax.data import datasets, memory_source

  spec = datasets.get_spec(dataset)
  for split in (spec.train_split, spec.eval_split):
    from_npz = memory_source.load_split(spec, split, npz_dir)
    from_tfds = memory_source.load_split(spec, split, tfds_dir)
    jax.tree.map(np.testing.assert_array_equal, from_npz, from_tfds)
  mesh = _mesh(8)
  c = dict(dataset=dataset, normalize='per_pixel_mean', batch_size=32)
  npz = next(data.train_batches(_config(data_dir=npz_dir, **c), mesh, 11))
  tfds = next(data.train_batches(_config(data_dir=tfds_dir, **c), mesh, 11))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(npz), jax.device_get(tfds))


def _without_tensorflow(code, data_dir):
  """Runs `code` where importing tensorflow fails, as on the lent GPU machines."""
  prelude = (
    'import sys; sys.modules["tensorflow"] = None; sys.modules["tensorflow_datasets"] = None'
  )
  return subprocess.run(
    [sys.executable, '-c', f'{prelude}\n{code}', data_dir],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**__import__('os').environ, 'PYTHONPATH': str(REPO)},
  )


_TRAIN_BATCH = """
from configs import cifar10
from resnet_jax import data
from resnet_jax import sharding
c = cifar10.get_config(); c.dataset = 'mnist'; c.data_dir = sys.argv[1]
batch = next(data.train_batches(c, sharding.make_mesh()))
print(batch['image'].shape, 'tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)
"""


def test_npz_data_needs_no_tensorflow_and_its_absence_is_one_line(npz_dir, tmp_path):
  out = _without_tensorflow(_TRAIN_BATCH, npz_dir)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split('\n')[-2] == '(128, 28, 28, 1) False'
  out = _without_tensorflow(_TRAIN_BATCH, str(tmp_path))
  assert out.returncode != 0
  message = out.stderr.strip().splitlines()[-1]
  assert 'tensorflow is not installed here' in message and 'mnist.npz or mnist_jpeg.npz' in message
