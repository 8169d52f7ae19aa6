"""The workdir contract: a config that does not fit is refused and nothing is touched;
bad values are one line before any work; the metrics log survives a kill mid-write;
the console shows the run's own lines."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import cifar10, default, smoke
from resnet_jax import sharding
from resnet_jax.errors import UserError
from resnet_jax.training import config_checks, train, workdir
from resnet_jax.training.metrics import (
  DROPPED_FILE,
  METRICS_FILE,
  Console,
  read_metrics,
  truncate_metrics,
)
from tests.process_env import xla_flags

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides):
  c = smoke.get_config()
  c.update(
    dict(
      batch_size=16,
      num_train_steps=8,
      log_every_steps=2,
      checkpoint_every_steps=4,
      eval_every_steps=8,
      compilation_cache_dir='',
    )
  )
  c.update(overrides)
  return c


def _main(w, *flags, config='configs/smoke.py'):
  cmd = [sys.executable, 'main.py', f'--config={config}', f'--workdir={w}']
  # ResNet-8 (one block per stage): what a workdir keeps does not depend on depth.
  cmd += ['--config.compilation_cache_dir=', '--config.num_train_steps=8']
  cmd += ['--config.model_overrides.stage_sizes=(1,1,1)', *flags]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _only_error_line(result) -> str:
  """The whole stderr is one `error:` line (no traceback, no library notices), exit 2."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  return lines[0]


def _snapshot(directory: Path) -> dict[str, str]:
  """Every file below `directory` with the hash of its bytes."""
  return {
    str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(directory.rglob('*'))
    if p.is_file()
  }


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir trained 8 steps of smoke (checkpoints at 4 and 8) by main.py."""
  w = tmp_path_factory.mktemp('trained') / 'w'
  result = _main(w)
  assert result.returncode == 0, result.stderr[-3000:]
  return w


@pytest.mark.parametrize(
  'flags,named,fix',
  [
    (['--config.model=cifar_resnet32'], 'model', 'use a new --workdir'),
    (['--config.model_overrides.shortcut=B'], 'model_overrides.shortcut', 'use a new --workdir'),
    (['--config.optimizer=lars'], 'optimizer', 'use a new --workdir'),
    (['--config.batch_size=32'], 'batch_size (16 -> 32)', '--allow_config_change=batch_size'),
    (['--config.seed=3'], 'seed (0 -> 3)', '--allow_config_change=seed'),
    (['--mode=eval', '--config.model=cifar_resnet44'], 'model', 'the config that trained it'),
    (
      ['--mode=eval', '--config.dtype=bfloat16'],
      "dtype ('float32' -> 'bfloat16')",
      'or add --allow_config_change=dtype to evaluate with this one deliberately',
    ),
  ],
)
def test_a_config_that_does_not_fit_is_refused_and_touches_nothing(trained, flags, named, fix):
  before = _snapshot(trained)
  line = _only_error_line(_main(trained, *flags))
  assert 'differs from the one that made' in line and named in line and fix in line
  assert _snapshot(trained) == before


def test_a_deliberate_change_is_recorded_and_the_old_config_kept(trained, tmp_path):
  w = tmp_path / 'w'
  os.system(f'cp -r {trained} {w}')
  longer = '--config.num_train_steps=12'
  line = _only_error_line(_main(w, longer))
  assert 'num_train_steps (8 -> 12)' in line and '--allow_config_change=num_train_steps' in line
  result = _main(w, longer, '--allow_config_change=num_train_steps')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'starting at step 8' in result.stderr and 'step 12/12' in result.stderr
  assert json.loads((w / 'config.json').read_text())['num_train_steps'] == 12
  assert json.loads((w / 'config.step8.json').read_text())['num_train_steps'] == 8


def test_bookkeeping_fields_may_change_freely(tmp_path):
  c = _config()
  workdir.record_config(c, str(tmp_path))
  changed = _config(log_every_steps=7, keep_checkpoints=9, eval_batch_size=64, data_dir='/x')
  assert workdir.check_config(changed, str(tmp_path)) == []
  # The model's implementation switches say how, not what: the same state either way.
  how = _config()
  how.model_overrides.max_pool_impl = 'index'
  how.model_overrides.conv1x1_impl = 'dot'
  assert workdir.check_config(how, str(tmp_path)) == []
  assert workdir.check_config(how, str(tmp_path), for_eval=True) == []
  with pytest.raises(UserError, match='unknown fields: num_train_step'):
    workdir.check_config(_config(num_train_steps=9), str(tmp_path), ['num_train_step'])
  with pytest.raises(UserError, match='define the model and optimizer state'):
    workdir.check_config(_config(model='cifar_resnet32'), str(tmp_path), ['model'])


def test_another_structure_in_a_workdir_without_config_json_is_not_damage(trained, tmp_path):
  w = tmp_path / 'w'
  os.system(f'cp -r {trained} {w}')
  (w / 'config.json').unlink()  # as a workdir from before config.json
  before = _snapshot(w)
  mesh = sharding.make_mesh(jax.devices()[:1])
  with pytest.raises(UserError, match=r'does not fit this config \(.*\); this workdir was made'):
    train.train_and_evaluate(_config(model='cifar_resnet32'), str(w), mesh)
  assert not (w / 'checkpoints_damaged').exists()
  before.pop('metrics.jsonl', None)
  after = _snapshot(w)
  after.pop('config.json', None)  # recorded for the run being refused: it had none
  after.pop('metrics.jsonl', None)
  assert after == before


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('batch_size', 0, 'batch_size=0 is invalid: it must be positive'),
    ('batch_size', -16, 'batch_size=-16 is invalid'),
    ('eval_batch_size', 0, 'eval_batch_size=0 is invalid'),
    ('image_size', -32, 'image_size=-32 is invalid'),
    ('dtype', 'float33', "dtype='float33' is invalid: it must be one of float32"),
    ('learning_rate', -0.1, 'learning_rate=-0.1 is invalid'),
    ('num_epochs', 0.0, 'num_epochs=0.0 is invalid'),
    ('num_epochs', -2.0, 'num_epochs=-2.0 is invalid'),
    ('warmup_steps', -2, 'warmup_steps=-2 is invalid'),
    ('checkpoint_every_steps', -5, 'checkpoint_every_steps=-5 is invalid'),
    ('keep_checkpoints', 0, 'keep_checkpoints=0 is invalid: it must be at least 1'),
    ('lr_boundaries', 10, 'lr_boundaries=10 is invalid: it must be a tuple, e.g. --config'),
    ('lr_boundaries', (48_000, 32_000), 'must be increasing'),
    ('lr_schedule', 'cosine', 'lr_boundaries=(32000, 48000) is invalid: it must be empty unless'),
    ('on_nonfinite_loss', 'ignore', "on_nonfinite_loss='ignore' is invalid"),
  ],
)
def test_bad_values_are_named_before_any_work(field, value, message):
  c = cifar10.get_config('resnet20')
  c.num_train_steps = -1 if field == 'num_epochs' else c.num_train_steps
  with c.ignore_type():
    c[field] = value
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
    config_checks.validate(c)


def test_fewer_classes_than_the_dataset_has_is_refused():
  c = cifar10.get_config('resnet20')
  c.model_overrides.num_classes = 5
  with pytest.raises(UserError, match='at least the 10 classes of cifar10'):
    config_checks.validate(c)
  c.model_overrides.num_classes = 100  # a wider head is harmless
  config_checks.validate(c)


def test_every_shipped_config_is_valid():
  for c in [default.get_config(), smoke.get_config(), *map(cifar10.get_config, ['resnet110'])]:
    config_checks.validate(c)


@pytest.mark.parametrize(
  'flags,expected',
  [
    (['--config.batch_size=0'], 'batch_size=0 is invalid'),
    (['--checkpoint_step=4'], '--checkpoint_step is for --mode=eval'),
    (['--config=configs/nope.py'], 'cannot load --config=configs/nope.py (no such file)'),
  ],
)
def test_bad_command_lines_are_one_line(tmp_path, flags, expected):
  assert expected in _only_error_line(_main(tmp_path / 'w', *flags))


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  line = _only_error_line(_main(tmp_path / 'w', config=str(bad)))
  assert f'{bad}:1' in line and 'fix the config file' in line


def test_a_workdir_that_is_a_file_or_cannot_be_made(tmp_path):
  f = tmp_path / 'file'
  f.write_text('precious')
  assert 'is a file, not a directory' in _only_error_line(_main(f))
  assert f.read_text() == 'precious'
  assert 'cannot create --workdir' in _only_error_line(_main(f / 'below'))


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / METRICS_FILE
  rows = [{'step': s, 'train_loss': 1.0 / s} for s in (2, 4, 6)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 8, "train_lo')
  assert read_metrics(str(tmp_path)) == rows
  truncate_metrics(str(tmp_path), 4)
  assert path.read_text() == ''.join(json.dumps(r) + '\n' for r in rows[:2])
  # What the resume took out is kept, not deleted.
  assert [json.loads(x) for x in (tmp_path / DROPPED_FILE).read_text().splitlines()] == rows[2:]


def test_a_bad_line_inside_the_metrics_is_an_error_not_a_silent_cut(tmp_path):
  (tmp_path / METRICS_FILE).write_text('{"step": 2}\nnot json\n{"step": 4}\n')
  with pytest.raises(UserError, match='line 2 is not JSON'):
    read_metrics(str(tmp_path))


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.mark.parametrize('stream_type', [io.StringIO, _Terminal])
def test_progress_line_between_rows(stream_type):
  stream = stream_type()
  console = Console(100, 128, stream=stream, tty_interval=0.0, plain_interval=0.0)
  console.tick(1)  # before timing starts (the compiling step): nothing
  assert stream.getvalue() == ''
  console.start_timing(1)
  console.tick(1)
  assert stream.getvalue() == ''
  console.tick(3)
  console.line(4, {'eval_count': 10000.0, 'eval_top1': 0.25}, with_eta=False)
  text = stream.getvalue()
  assert 'step 3/100 | img/s ' in text and 'ETA ' in text and 'ETA ?' not in text
  assert 'eval_count 10000 | eval_top1 0.25' in text
  if stream_type is _Terminal:  # redrawn in place, and cleared before a permanent line
    assert text.startswith('\r\033[K') and '\r\033[Kstep 4/100' in text
  else:
    assert text.splitlines()[0].startswith('step 3/100')


def test_eval_prints_only_its_result(trained):
  result = _main(trained, '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval_count=1000' in result.stdout
  lines = result.stderr.splitlines()
  noise = [x for x in lines if any(w in x for w in ('WARNING', 'oneDNN', 'absl::', 'W1', 'E1'))]
  assert not noise, noise
