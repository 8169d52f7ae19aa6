"""main.py end to end: bad input is one line and exit 2; training converges on real MNIST;
every console command explains itself (--help, --version)."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from resnet_jax.training.metrics import read_metrics
from tests.process_env import xla_flags

REPO = Path(__file__).resolve().parents[1]


# main.py as a script that then says whether tensorflow was imported.
_MAIN_THEN_TELL_TF = (
  'import atexit, runpy, sys; '
  "atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules)); "
  "sys.argv[0] = 'main.py'; runpy.run_path('main.py', run_name='__main__')"
)


def _main(tmp_path, *flags, config='configs/smoke.py', devices=1, env=None):
  cmd = [
    sys.executable,
    '-c',
    _MAIN_THEN_TELL_TF,
    f'--config={config}',
    f'--workdir={tmp_path / "w"}',
    '--config.compilation_cache_dir=',
    *flags,
  ]
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), **(env or {}))
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
    (['--workdir='], '--workdir is required: a directory for checkpoints'),
  ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, flags, expected):
  assert expected in _error_line(_main(tmp_path, *flags, devices=8))


def test_nonfinite_loss_before_the_first_checkpoint_says_there_is_none(tmp_path):
  line = _error_line(_main(tmp_path, '--config.learning_rate=1e30'))  # checked at step 5
  assert re.search(
    r'non-finite loss or gradient at step \d; no checkpoint was saved before it', line
  )


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
  # TensorBoard gets the same floats (as float32), and synthetic data need no tensorflow:
  # its import would be 3-4 s of every such run.
  events = [
    e
    for path in (tmp_path / 'w' / 'tensorboard').iterdir()
    for e in LegacyEventFileLoader(str(path)).Load()
  ]
  assert events[0].file_version == 'brain.Event:2'
  logged = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  floats = {(r['step'], k): v for r in rows for k, v in r.items() if isinstance(v, float)}
  assert logged == pytest.approx(floats, rel=1e-6)
  assert 'tensorflow imported: False' in result.stdout


def test_small_resnet_learns_mnist(mnist_workdir):
  """A 14-layer ResNet on 19k MNIST examples (300 steps of 64) reaches >= 97% test top-1."""
  final = [r for r in read_metrics(mnist_workdir) if 'eval_top1' in r][-1]
  assert final['eval_count'] == 10_000
  assert final['eval_top1'] >= 0.97, final


# Each console command (pyproject.toml [project.scripts]) and the flags its help must list.
COMMANDS = {
  'resnet-jax-train': [
    'config',
    'workdir',
    'mode',
    'checkpoint_step',
    'allow_config_change',
    'distributed',
    'coordinator_address',
    'num_processes',
    'process_id',
    'help',
    'version',
  ],
  'resnet-jax-convert': [
    'config',
    'workdir',
    'from',
    'to',
    'checkpoint_step',
    'member',
    'help',
    'version',
  ],
  'resnet-jax-summary': [
    'list',
    'image_size',
    'channels',
    'num_classes',
    'json',
    'help',
    'version',
  ],
}


def _command(name, *args):
  script = Path(sys.executable).parent / name
  if not script.exists():
    pytest.skip(f'{name} is not installed beside {sys.executable} (pip install -e .)')
  return subprocess.run([str(script), *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_each_command_explains_itself_and_tells_its_version(name):
  shown = _command(name, '--help')
  assert shown.returncode == 0, shown.stderr
  text = shown.stdout
  assert text.startswith(f'usage: {name}'), text
  about = text.split('\n\n')[1]  # after the usage, what the command does, in words
  assert len(about.split()) >= 10, about
  for flag in COMMANDS[name]:  # one line each, flag first
    assert len(re.findall(rf'^  (-\w, )?--{flag}\s', text, re.M)) == 1, (flag, text)
  assert re.search(rf'^example:\n  {name} \S', text, re.M), text
  version = _command(name, '--version')
  assert version.returncode == 0, version.stderr
  assert version.stdout == f'resnet-jax {importlib.metadata.version("resnet-jax")}\n'


def test_main_py_help_is_the_train_commands():
  main_py = subprocess.run(
    [sys.executable, 'main.py', '--help'], cwd=REPO, capture_output=True, text=True
  )
  assert main_py.returncode == 0, main_py.stderr
  assert main_py.stdout == _command('resnet-jax-train', '--help').stdout
