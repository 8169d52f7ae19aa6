"""main.py end to end: bad input is one line and exit 2; training converges on real MNIST."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_jax.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _main(tmp_path, *flags, config='configs/smoke.py', env=None):
  cmd = [
    sys.executable,
    'main.py',
    f'--config={config}',
    f'--workdir={tmp_path / "w"}',
    '--config.compilation_cache_dir=',
    *flags,
  ]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', **(env or {}))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error_line(result):
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ')
  return last


@pytest.mark.parametrize(
  'flags,expected',
  [
    (['--config.model=resnet51'], "unknown model 'resnet51'; did you mean resnet50"),
    (['--config.dataset=imagenet3'], "unknown dataset 'imagenet3'; set --config.dataset"),
    (
      ['--config.batch_size=12'],
      'batch_size=12 is not divisible by the 8 devices of the mesh; set --config.batch_size=8',
    ),
    (['--config.batch_sise=64'], 'Did you mean "batch_size"'),
    (['--config.model_overrides.shortcutt=A'], 'Did you mean "shortcut"'),
    (['--config.learning_rate=1e30'], 'non-finite loss or gradient at step'),
    (['--workdir='], '--workdir is required: a directory for checkpoints'),
  ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, flags, expected):
  assert expected in _error_line(_main(tmp_path, *flags))


def test_missing_config_is_one_line_and_exit_2():
  result = subprocess.run(
    [sys.executable, 'main.py', '--workdir=unused'], cwd=REPO, capture_output=True, text=True
  )
  assert '--config is required: give a config file' in _error_line(result)


def test_missing_data_offline_says_what_to_put_where(tmp_path):
  empty = tmp_path / 'no_data'
  empty.mkdir()
  offline = {'HTTPS_PROXY': 'http://127.0.0.1:1', 'HTTP_PROXY': 'http://127.0.0.1:1'}
  flags = ('--config.dataset=mnist', f'--config.data_dir={empty}')
  line = _error_line(_main(tmp_path, *flags, env=offline))
  assert f'dataset mnist is not in {empty} and cannot be downloaded' in line
  assert 'put mnist.npz' in line
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # failed before touching the workdir


def test_smoke_config_trains_and_logs(tmp_path):
  result = _main(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 20/20' in result.stderr
  rows = read_metrics(tmp_path / 'w')
  train_rows = [r for r in rows if 'train_loss' in r]
  eval_rows = [r for r in rows if 'eval_top1' in r]
  assert [r['step'] for r in train_rows] == [5, 10, 15, 20]
  assert {'train_top1', 'train_top5', 'lr', 'img_per_s'} <= set(train_rows[0])
  assert [r['step'] for r in eval_rows] == [10, 20] and eval_rows[-1]['eval_count'] == 1000
  assert list((tmp_path / 'w' / 'tensorboard').iterdir())


def test_small_resnet_learns_mnist(mnist_workdir):
  """A 14-layer ResNet on 19k MNIST examples (300 steps of 64) reaches >= 97% test top-1."""
  final = [r for r in read_metrics(mnist_workdir) if 'eval_top1' in r][-1]
  assert final['eval_count'] == 10_000
  assert final['eval_top1'] >= 0.97, final
