"""Fault tolerance: kill -9, SIGTERM, damaged checkpoints, other meshes, two processes."""

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from orbax.checkpoint._src import asyncio_utils

from configs import smoke
from resnet_jax import sharding
from resnet_jax.errors import EXIT_PREEMPTED, CheckpointWriteError, UserError
from resnet_jax.training import checkpoints, train
from resnet_jax.training.checkpoints import FINGERPRINTED_MARKER, Checkpoints
from resnet_jax.training.metrics import read_metrics
from tests.helpers import built_once, wait_for_step
from tests.process_env import xla_flags

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides):
  c = smoke.get_config()
  # ResNet-8 (one block per stage): what is saved and restored does not depend on depth,
  # and each run traces and compiles a third of ResNet-20's step.
  c.model_overrides.stage_sizes = (1, 1, 1)
  c.batch_size = c.eval_batch_size = 32
  c.num_train_steps = 24
  # Rows every 5 steps, checkpoints every 4: a resume must rebuild the row in progress.
  c.log_every_steps = 5
  c.checkpoint_every_steps = 4
  c.eval_every_steps = 12
  c.compilation_cache_dir = ''
  c.update(overrides)
  return c


def _flags(**overrides):
  c = _config(**overrides)
  keys = (
    'batch_size',
    'eval_batch_size',
    'num_train_steps',
    'log_every_steps',
    'checkpoint_every_steps',
    'eval_every_steps',
  )
  stages = ','.join(map(str, c.model_overrides.stage_sizes))
  return [f'--config.{k}={c[k]}' for k in keys] + [
    f'--config.model_overrides.stage_sizes=({stages})',
    '--config.compilation_cache_dir=',
  ]


def _env(devices=1):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONUNBUFFERED='1')
  env.pop('TFDS_DATA_DIR', None)
  return env


def _main(workdir, *extra, devices=1, **overrides):
  cmd = [
    sys.executable,
    str(REPO / 'main.py'),
    f'--config={REPO}/configs/smoke.py',
    f'--workdir={workdir}',
    *_flags(**overrides),
    *extra,
  ]
  return subprocess.Popen(
    cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(proc, code=0):
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == code, out
  return out


def _params(workdir, step=None, mesh=None):
  mesh = mesh or sharding.make_mesh(jax.devices()[:1])
  setup = train.build(_config(), mesh)
  ckpt = Checkpoints(str(workdir))
  state = train.restore_or_create(setup, ckpt, seed=-1, step=step)
  ckpt.close()
  return jax.device_get(state)


def _metrics_without_timing(workdir):
  return [{k: v for k, v in row.items() if k != 'img_per_s'} for row in read_metrics(workdir)]


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The smoke run without a stop, built once per session and only read (tests that
  damage a workdir damage a copy)."""
  return built_once(tmp_path_factory, 'uninterrupted', lambda w: _finish(_main(w)))


def test_kill9_at_a_random_step_then_restart_equals_uninterrupted(tmp_path, uninterrupted):
  kill_at = random.Random().randint(3, 20)
  print('kill -9 after step', kill_at)
  proc = _main(tmp_path)
  wait_for_step(tmp_path, kill_at, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _finish(_main(tmp_path))
  final = _params(tmp_path)
  assert int(final.step) == 24
  _assert_same(final.params, _params(uninterrupted).params)
  _assert_same(final.batch_stats, _params(uninterrupted).batch_stats)
  assert _metrics_without_timing(tmp_path) == _metrics_without_timing(uninterrupted)


def test_sigterm_stops_at_the_next_step_and_the_resumed_log_is_exact(tmp_path, uninterrupted):
  # No checkpoint or eval before the end, and rows at 10 and 20: the loop could run far
  # ahead of the device between two rows; it must stop within a step or two of the signal.
  sparse = dict(log_every_steps=10, checkpoint_every_steps=100, eval_every_steps=100)
  preempted, whole = tmp_path / 'preempted', tmp_path / 'whole'
  proc = _main(preempted, **sparse)
  wait_for_step(preempted, 10, proc)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, code=EXIT_PREEMPTED)  # saved, not finished: a scheduler reruns it
  assert 'preempted at step' in out
  stopped = Checkpoints(str(preempted)).steps()[-1]
  print('SIGTERM after the row of step 10; saved at step', stopped)
  assert 10 <= stopped <= 16  # it used to run on to the next row (step 20); slack for a busy CPU
  out = _finish(_main(preempted, **sparse))
  assert f'starting at step {stopped}' in out
  _assert_same(_params(preempted).params, _params(uninterrupted).params)
  # The row in progress at the signal (steps 11-20) equals the uninterrupted run's row.
  _finish(_main(whole, **sparse))
  rows = _metrics_without_timing(preempted)
  assert [r['step'] for r in rows] == [10, 20, 24, 24]
  assert rows == _metrics_without_timing(whole)


def test_sigterm_during_an_evaluation_stops_it_saves_and_reruns_it_on_resume(
  tmp_path, uninterrupted
):
  # An evaluation of 125 batches of 8 (about as long as the 12 training steps before it):
  # the signal comes once the train row of step 12 is written, as its evaluation starts.
  flags = dict(eval_batch_size=8)
  proc = _main(tmp_path, **flags)
  wait_for_step(tmp_path, 12, proc)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, code=EXIT_PREEMPTED)  # saved, not finished: a scheduler reruns it
  assert 'preempted at step 12 during its evaluation (it reruns on resume)' in out, out
  assert Checkpoints(str(tmp_path)).steps()[-1] == 12
  assert not [r for r in read_metrics(tmp_path) if 'eval_top1' in r]
  out = _finish(_main(tmp_path, **flags))
  assert 'rerunning the evaluation of step 12' in out
  # The same rows as a run never interrupted (its evaluation batches are 32, so the eval
  # metrics may differ in the last bits of their sums).
  shape = lambda w: [(r['step'], sorted(r)) for r in read_metrics(w)]  # noqa: E731
  assert shape(tmp_path) == shape(uninterrupted)
  assert all(r['eval_count'] == 1000 for r in read_metrics(tmp_path) if 'eval_top1' in r)


def _train_in_process(workdir, devices, allow=(), **overrides):
  mesh = sharding.make_mesh(jax.devices()[:devices])
  return train.train_and_evaluate(_config(**overrides), str(workdir), mesh, allow)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  _train_in_process(tmp_path, 1, num_train_steps=8)
  ckpt_dir = tmp_path / 'checkpoints'
  assert Checkpoints(str(tmp_path)).steps() == [4, 8]
  good = _params(tmp_path, step=4)
  # Truncate every file of the latest checkpoint's arrays.
  for f in (ckpt_dir / '8').rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'metadata' not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  restored = _params(tmp_path)
  assert int(restored.step) == 4
  _assert_same(restored.params, good.params)
  assert 'checkpoint at step 8 is damaged' in caplog.text
  assert list((tmp_path / 'checkpoints_damaged').iterdir())
  # The workdir stays usable: training resumes from 4 and completes (a longer schedule).
  state = _train_in_process(tmp_path, 1, ['num_train_steps'], num_train_steps=12)
  assert int(state.step) == 12 and Checkpoints(str(tmp_path)).steps()[-1] == 12


def _array_files(step_dir):
  """The array data files of a checkpoint (not its metadata), largest first."""
  files = [f for f in (step_dir / 'default').rglob('*') if f.is_file() and f.parent.name == 'd']
  return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _garbage_at_start(step_dir):
  f = _array_files(step_dir)[0]
  f.write_bytes(bytes(64) + f.read_bytes()[64:])


def _flip_one_bit(step_dir):
  f = _array_files(step_dir)[0]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x04
  f.write_bytes(bytes(data))


def _empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _delete_metadata(step_dir):
  (step_dir / '_CHECKPOINT_METADATA').unlink()


def _garble_metadata(step_dir):
  (step_dir / '_CHECKPOINT_METADATA').write_text('{"garbled": ')


@pytest.mark.parametrize(
  'damage',
  [_garbage_at_start, _flip_one_bit, _empty_step_dir, _delete_metadata, _garble_metadata],
)
def test_damage_that_reads_without_error_is_caught_and_the_older_checkpoint_used(
  tmp_path, damage, caplog
):
  _train_in_process(tmp_path, 1, num_train_steps=8)
  good = _params(tmp_path, step=4)
  damage(tmp_path / 'checkpoints' / '8')
  restored = _params(tmp_path)
  assert int(restored.step) == 4
  _assert_same(restored.params, good.params)
  assert 'checkpoint at step 8 is damaged' in caplog.text
  assert [p.name.split('_')[0] for p in (tmp_path / 'checkpoints_damaged').iterdir()] == ['8']
  # Training goes on from 4 and saves again at 8.
  state = _train_in_process(tmp_path, 1, num_train_steps=8)
  assert int(state.step) == 8 and Checkpoints(str(tmp_path)).steps() == [4, 8]


def test_checkpoints_from_before_fingerprints_still_restore(tmp_path, caplog):
  """A directory without the marker (made before fingerprints) restores a step without them."""
  _train_in_process(tmp_path, 1, num_train_steps=4)
  (tmp_path / 'checkpoints' / FINGERPRINTED_MARKER).unlink()
  _delete_metadata(tmp_path / 'checkpoints' / '4')
  assert int(_params(tmp_path).step) == 4
  assert 'has no fingerprints (older format); not verified' in caplog.text
  assert not (tmp_path / 'checkpoints_damaged').exists()


def test_every_checkpoint_damaged_stops_with_one_line_and_keeps_everything(tmp_path):
  _train_in_process(tmp_path, 1, num_train_steps=8)
  for step in (4, 8):
    _flip_one_bit(tmp_path / 'checkpoints' / str(step))
  metrics = (tmp_path / 'metrics.jsonl').read_text()
  with pytest.raises(UserError, match=r'no readable checkpoint in .*step 8: .*step 4: .*nothing'):
    _train_in_process(tmp_path, 1, num_train_steps=8)
  assert Checkpoints(str(tmp_path)).steps() == [4, 8]
  assert not (tmp_path / 'checkpoints_damaged').exists()
  assert (tmp_path / 'metrics.jsonl').read_text() == metrics


def test_eval_skips_a_damaged_checkpoint_without_moving_it(tmp_path):
  _train_in_process(tmp_path, 1, num_train_steps=8)
  _flip_one_bit(tmp_path / 'checkpoints' / '8')
  (metrics,) = train.evaluate_checkpoint(_config(), str(tmp_path), mesh=_mesh1())
  assert metrics['eval_count'] == 1000
  assert read_metrics(tmp_path)[-1]['step'] == 4
  assert Checkpoints(str(tmp_path)).steps() == [4, 8]
  assert not (tmp_path / 'checkpoints_damaged').exists()


def _mesh1():
  return sharding.make_mesh(jax.devices()[:1])


# What a damaged checkpoint must never add to the console after its one line: orbax's reads
# still in flight when it gave up, calling back into its closed event loop.
NOISE = ('Traceback', 'Event loop is closed', 'never retrieved')


def _console_after(damage, uninterrupted, workdir):
  shutil.copytree(uninterrupted, workdir)
  damage(workdir / 'checkpoints')
  proc = _main(workdir)
  out, _ = proc.communicate(timeout=300)
  print(out)
  assert not [n for n in NOISE if n in out]
  return proc.returncode, out


def _empty_latest_manifest(ckpt_dir):
  (ckpt_dir / '24' / 'default' / 'manifest.ocdbt').write_bytes(b'')


def _truncate_every_array_file(ckpt_dir):
  for step_dir in ckpt_dir.glob('[0-9]*'):
    for f in _array_files(step_dir):
      f.write_bytes(f.read_bytes()[:100])


def test_an_empty_manifest_on_the_console_is_reported_and_the_run_ends_equal(
  tmp_path, uninterrupted
):
  code, out = _console_after(_empty_latest_manifest, uninterrupted, tmp_path / 'w')
  assert code == 0
  assert 'checkpoint at step 24 is damaged (metadata unreadable' in out
  assert 'moved the damaged checkpoint of step 24' in out and 'starting at step 20' in out
  _assert_same(_params(tmp_path / 'w').params, _params(uninterrupted).params)


def test_every_checkpoint_truncated_on_the_console_is_one_error_line(tmp_path, uninterrupted):
  code, out = _console_after(_truncate_every_array_file, uninterrupted, tmp_path / 'w')
  assert code == 2
  last = out.strip().splitlines()[-1]
  assert last.startswith(f'error: no readable checkpoint in {tmp_path / "w" / "checkpoints"} (')
  assert 'nothing was moved or deleted' in last
  assert Checkpoints(str(tmp_path / 'w')).steps() == Checkpoints(str(uninterrupted)).steps()
  assert not (tmp_path / 'w' / 'checkpoints_damaged').exists()


def test_a_failed_orbax_read_waits_for_the_reads_still_in_flight():
  """Orbax closes its event loop when the first read of a gather fails; the others, done in
  tensorstore's threads, would call back into the closed loop ('Event loop is closed')."""
  finished = threading.Event()

  async def read_in_another_thread():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    threading.Timer(0.2, loop.call_soon_threadsafe, (done.set_result, None)).start()
    await done
    finished.set()

  async def fail_at_once():
    raise OSError('damaged')

  async def read_all():
    await asyncio.gather(fail_at_once(), read_in_another_thread())

  with pytest.raises(OSError, match='damaged'), checkpoints._settled_reads():
    asyncio_utils.run_sync(read_all())
  assert finished.is_set()
  assert not isinstance(asyncio.get_event_loop_policy(), checkpoints._SettlingPolicy)


def _run_main_until_done(workdir, timeout=240):
  proc = _main(workdir)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError('main.py hung after the failed save') from None
  return proc.returncode, out


def test_full_disk_stops_at_the_failed_save_with_one_line(tmp_path):
  # A 3 MiB filesystem holds the first checkpoint (~1.1 MiB) but not a second: a save asks
  # for its size plus 5% and 1 MiB free.
  ckpt = tmp_path / 'checkpoints'
  ckpt.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(ckpt)]).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root) to fill a disk')
  try:
    code, out = _run_main_until_done(tmp_path)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f'error: cannot write a checkpoint in {ckpt}: it needs '), last
    # The margin is spelt out, so 'needs 3.9 MiB, 3.6 MiB free' cannot read as fitting.
    assert re.search(r'plus 5% and 1 MiB of margin .* and only \d+\.\d+ MiB are free', last)
    assert 'Traceback' not in out
    assert Checkpoints(str(tmp_path)).steps() == [4]  # the older one is intact
  finally:
    subprocess.run(['umount', str(ckpt)], check=True)


def test_a_save_that_barely_does_not_fit_shows_sizes_that_differ(tmp_path, monkeypatch):
  # The state plus its margin needs 3.73 MiB and 3.71 MiB are free: both 3.7 to one decimal.
  state_bytes = round((3.73 * 2**20 - 2**20) / 1.05)
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: SimpleNamespace(free=round(3.71 * 2**20)))
  with pytest.raises(CheckpointWriteError) as e:
    Checkpoints(str(tmp_path))._check_free_space(state_bytes)
  sizes = re.search(r'needs ([\d.]+) MiB .* only ([\d.]+) MiB are free', str(e.value))
  assert sizes.groups() == ('3.73', '3.71'), str(e.value)


def test_read_only_checkpoints_stop_with_one_line_and_no_hang(tmp_path):
  ckpt = tmp_path / 'checkpoints'
  ckpt.mkdir()
  if subprocess.run(['chattr', '+i', str(ckpt)], capture_output=True).returncode:
    pytest.skip('chattr +i is not available here (root ignores permission bits)')
  try:
    code, out = _run_main_until_done(tmp_path)
  finally:
    subprocess.run(['chattr', '-i', str(ckpt)], check=True)
  assert code == 2, out
  assert out.strip().splitlines()[-1] == (
    f'error: {ckpt} is not writable (Operation not permitted); fix its permissions or choose '
    'another --workdir.'
  )


def test_a_save_that_fails_in_the_background_stops_the_run_with_one_line(tmp_path):
  # The directory becomes read-only after the start: orbax's async save fails in its
  # threads, and the loop notices at the next step (and the process does not hang).
  proc = _main(tmp_path, '--config.num_train_steps=400', '--config.checkpoint_every_steps=100')
  wait_for_step(tmp_path, 5, proc)
  ckpt = tmp_path / 'checkpoints'
  if subprocess.run(['chattr', '+i', str(ckpt)], capture_output=True).returncode:
    proc.kill()
    pytest.skip('chattr +i is not available here (root ignores permission bits)')
  try:
    out, _ = proc.communicate(timeout=240)
  finally:
    subprocess.run(['chattr', '-i', str(ckpt)], check=True)
  assert proc.returncode == 2, out
  assert out.strip().splitlines()[-1].startswith(f'error: cannot write a checkpoint in {ckpt}')
  assert max(r['step'] for r in read_metrics(tmp_path)) <= 105  # stopped at the failed save (100)


@pytest.mark.mesh
@pytest.mark.parametrize('saved_on,restored_on', [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, saved_on, restored_on):
  state = _train_in_process(tmp_path, saved_on, num_train_steps=4)
  mesh = sharding.make_mesh(jax.devices()[:restored_on])
  restored = _params(tmp_path, mesh=mesh)
  _assert_same(restored.params, jax.device_get(state.params))
  # Evaluating on the new mesh gives the metrics of the old one.
  c = _config()
  before = [r for r in read_metrics(tmp_path) if 'eval_top1' in r][-1]
  (after,) = train.evaluate_checkpoint(c, str(tmp_path), mesh=mesh)
  assert after['eval_count'] == before['eval_count']
  assert after['eval_loss'] == pytest.approx(before['eval_loss'], rel=1e-4)


def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
  with pytest.raises(
    train.NonFiniteLossError, match=r'non-finite loss or gradient at step \d+'
  ) as e:
    _train_in_process(tmp_path, 1, learning_rate=1e12, warmup_steps=0)
  steps = Checkpoints(str(tmp_path)).steps()
  last = f'the checkpoint of step {steps[-1]}, the last before it, is intact' if steps else None
  assert (last or 'no checkpoint was saved before it') in str(e.value)
  for step in steps:
    leaves = jax.tree.leaves(_params(tmp_path, step=step).params)
    assert all(np.isfinite(x).all() for x in leaves)


def test_eval_of_a_workdir_it_cannot_write_to_returns_its_metrics(tmp_path, caplog):
  _train_in_process(tmp_path, 1, num_train_steps=4)
  rows = read_metrics(tmp_path)
  locked = subprocess.run(['chattr', '-R', '+i', str(tmp_path)], capture_output=True)
  try:
    if locked.returncode:
      pytest.skip('chattr +i is not available here (root ignores permission bits)')
    (metrics,) = train.evaluate_checkpoint(_config(), str(tmp_path), mesh=_mesh1())
  finally:
    subprocess.run(['chattr', '-R', '-i', str(tmp_path)], capture_output=True)
  assert metrics['eval_count'] == 1000
  assert f'the evaluation is not recorded in {tmp_path} (Operation not permitted)' in caplog.text
  assert read_metrics(tmp_path) == rows


def test_eval_mode_writes_metrics(tmp_path):
  _train_in_process(tmp_path, 1, num_train_steps=4)
  proc = _main(tmp_path, '--mode=eval', '--checkpoint_step=4')
  out = _finish(proc)
  assert 'eval_top1=' in out
  row = read_metrics(tmp_path)[-1]
  assert row['mode'] == 'eval' and row['step'] == 4 and row['eval_count'] > 0


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_compute_what_one_computes(tmp_path):
  # A small learning rate keeps the run in a stable regime, where rounding differences
  # stay rounding-sized instead of being amplified by training (that is not equality).
  # XLA's convolutions on both sides: `auto` would pick oneDNN for a process of one device.
  flags = dict(num_train_steps=8, log_every_steps=1)
  same = ('--config.learning_rate=0.001', '--config.model_overrides.conv_impl=xla')
  one = tmp_path / 'one'
  _finish(_main(one, *same, devices=2, **flags))
  two = tmp_path / 'two'
  port = _free_port()
  procs = [
    _main(
      two,
      *same,
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={i}',
      devices=1,
      **flags,
    )
    for i in range(2)
  ]
  for p in procs:
    _finish(p)
  a, b = _params(one), _params(two)
  assert int(b.step) == 8
  # The same global program over 2 devices, but gloo sums the cross-process all-reduces,
  # maybe in another order than the in-process one: float32 sums of the same numbers,
  # equal to a few ulps (~1e-7 relative). Losses are means over the batch: 1e-5 leaves a
  # 100x margin over that rounding. Updates are lr x gradient, so parameters differ by
  # ~1e-7 of an update, far below 1e-6 of their norm.
  flat = [ravel_pytree(x.params)[0] for x in (a, b)]
  drift = np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[0])
  print('parameters apart after 8 steps (relative norm):', drift)
  assert drift < 1e-6
  losses = [[r['train_loss'] for r in read_metrics(w) if 'train_loss' in r] for w in (one, two)]
  assert len(losses[1]) == 8
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  # Either setup restores the one checkpoint.
  _assert_same(_params(two, mesh=sharding.make_mesh(jax.devices())).params, b.params)
  shutil.rmtree(one)
