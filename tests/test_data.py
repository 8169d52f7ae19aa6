"""The input pipeline: shapes, determinism, resumption, sharding and eval coverage."""

import dataclasses
import gc
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest

from configs import default
from resnet_jax import data, sharding
from resnet_jax.data import datasets, memory_source
from resnet_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def mesh8():
  return sharding.make_mesh()


@pytest.fixture(scope='module')
def mesh1():
  return sharding.make_mesh(jax.devices()[:1])


def _config(dataset: str, data_dir: str | None = None, **overrides):
  c = default.get_config()
  c.dataset = dataset
  c.data_dir = data_dir
  c.batch_size = 16
  c.eval_batch_size = 100
  c.update(overrides)
  return c


def _train(config, mesh, steps: int, start_step: int = 0) -> list[dict[str, np.ndarray]]:
  batches = data.train_batches(config, mesh, start_step=start_step)
  return [jax.device_get(b) for b in itertools.islice(batches, steps)]


def _assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _differ(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
  return any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, b, strict=True))


# Names, shapes, errors.


def test_unknown_dataset_lists_the_known_ones(mesh8):
  with pytest.raises(UserError, match='one of: imagenet2012, .*mnist') as e:
    datasets.get_spec('imagenet')
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='unknown dataset'):
    data.train_batches(_config('imagenet'), mesh8)


def test_input_shape_and_steps_per_epoch():
  assert datasets.input_shape(_config('mnist', image_size=224)) == (28, 28, 1)
  assert datasets.input_shape(_config('cifar100')) == (32, 32, 3)
  assert datasets.input_shape(_config('imagenet2012', image_size=160)) == (160, 160, 3)
  assert datasets.input_shape(_config('synthetic', image_size=64)) == (64, 64, 3)
  assert datasets.steps_per_epoch(_config('cifar10', batch_size=128)) == 390
  assert datasets.steps_per_epoch(_config('synthetic', batch_size=10**7)) == 1


@pytest.fixture
def offline(monkeypatch):
  """This process as if offline, whatever the machine: downloads go through a proxy on a
  local port where nothing listens."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # free once closed
  for var in ('HTTPS_PROXY', 'HTTP_PROXY', 'https_proxy', 'http_proxy'):
    monkeypatch.setenv(var, f'http://127.0.0.1:{port}')


@pytest.mark.parametrize(
  'dataset,hint',
  [
    ('mnist', 'put mnist.npz (uint8 arrays x_train, y_train, x_test, y_test) in a folder'),
    ('cifar10', 'does not answer: [Errno 111] Connection refused): run again where there is'),
    ('imagenet2012', 'ILSVRC2012_img_train.tar'),
  ],
)
def test_missing_data_offline_says_what_to_put_where(dataset, hint, offline, tmp_path, mesh8):
  empty = str(tmp_path / 'empty')
  with pytest.raises(UserError, match=re.escape(hint)) as e:
    data.train_batches(_config(dataset, empty), mesh8)
  message = str(e.value)
  assert message.startswith(f'dataset {dataset} is not in {empty}') and '\n' not in message
  assert 'shared' not in message and 'prepare_tfds' not in message  # no folder of ours


def test_missing_data_on_a_network_that_never_answers_fails_at_once(tmp_path, monkeypatch, mesh8):
  """A proxy that accepts connections and never replies: tfds alone would wait for minutes."""
  from resnet_jax.data import input_pipeline

  monkeypatch.setattr(input_pipeline, 'PROBE_TIMEOUT_S', 1.0)
  with socket.socket() as silent:
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)  # the kernel completes handshakes; nothing is ever read or sent
    for var in ('HTTPS_PROXY', 'https_proxy'):
      monkeypatch.setenv(var, f'http://127.0.0.1:{silent.getsockname()[1]}')
    start = time.monotonic()
    with pytest.raises(UserError, match='dataset mnist is not in .* does not answer: .*timed out'):
      data.train_batches(_config('mnist', str(tmp_path / 'empty')), mesh8)
  assert time.monotonic() - start < 30  # one 1 s probe, where tfds retries for 3+ minutes


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'normalize': 'bogus'}, 'normalize=.bogus. is unknown'),
    ({'dataset': 'imagenet2012', 'normalize': 'per_pixel_mean'}, 'normalize=per_channel'),
    ({'dataset': 'imagenet2012', 'device_resident_data': True}, 'device_resident_data=False'),
    ({'dataset': 'imagenet2012', 'train_augment': 'bogus'}, 'one of: inception, scale'),
    ({'batch_size': 12}, 'batch_size=8'),
  ],
)
def test_bad_options_are_user_errors(overrides, message, mesh8):
  with pytest.raises(UserError, match=message):
    data.train_batches(_config(**{'dataset': 'mnist', **overrides}), mesh8)


# Real data through the host pipeline.


@pytest.mark.parametrize(
  ('dataset', 'normalize', 'shape', 'classes'),
  [
    ('mnist', 'per_channel', (28, 28, 1), 10),
    ('cifar10', 'per_channel', (32, 32, 3), 10),
    ('cifar10', 'per_pixel_mean', (32, 32, 3), 10),
  ],
)
def test_batches_have_the_right_shapes_and_ranges(
  dataset, normalize, shape, classes, tfds_dir, mesh8
):
  c = _config(dataset, tfds_dir, normalize=normalize)
  for batch in itertools.islice(data.train_batches(c, mesh8), 2):
    assert batch['image'].shape == (16, *shape) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    assert batch['image'].sharding.is_equivalent_to(sharding.batch_sharding(mesh8), 4)
  labels = np.asarray(batch['label'])
  assert ((labels >= 0) & (labels < classes)).all()
  # Normalised: the eval split's mean near 0 and std near 1.
  batches = [jax.device_get(b) for b in data.eval_batches(c, mesh8)]
  images = np.concatenate([b['image'][b['mask'] == 1] for b in batches])
  assert images.shape == (10_000, *shape)
  assert abs(images.mean()) < 0.1 and 0.7 < images.std() < 1.3
  assert np.abs(images).max() < 10


def test_same_seed_same_batches_and_another_seed_others(tfds_dir, mesh8):
  run = lambda seed: _train(_config('cifar10', tfds_dir, seed=seed), mesh8, 3)
  first = run(0)
  _assert_same(first, run(0))
  assert _differ(first, run(1))
  assert _differ(first[:1], first[1:2])


def test_resuming_at_a_step_gives_the_uninterrupted_batches(tfds_dir, mesh8):
  c = _config('cifar10', tfds_dir)
  uninterrupted = _train(c, mesh8, 5)
  _assert_same(uninterrupted[3:], _train(c, mesh8, 2, start_step=3))
  # Across an epoch boundary too (3125 steps of 16).
  end = datasets.steps_per_epoch(c)
  _assert_same(_train(c, mesh8, 3, start_step=end - 1)[1:], _train(c, mesh8, 2, start_step=end))


@pytest.mark.parametrize('dataset', ['mnist', 'cifar10'])
def test_train_batches_do_not_depend_on_the_device_count(dataset, tfds_dir, mesh1, mesh8):
  c = _config(dataset, tfds_dir)
  _assert_same(_train(c, mesh1, 3, start_step=7), _train(c, mesh8, 3, start_step=7))


def test_processes_take_their_rows_of_the_same_global_batch(tfds_dir):

  spec = datasets.get_spec('cifar10')
  images, labels = memory_source.load_split(spec, spec.train_split, tfds_dir)

  def batches(rows):
    it = memory_source.memory_train_batches(
      images, labels, batch_size=16, rows=rows, seed=3, crop_flip=True, start_step=5
    )
    return list(itertools.islice(it, 2))

  whole = batches(np.arange(16))
  parts = [batches(rows) for rows in np.split(np.arange(16), 2)]
  joined = [{k: np.concatenate([p[i][k] for p in parts]) for k in whole[i]} for i in range(2)]
  _assert_same(whole, joined)


# Damaged prepared data: a one-line UserError that says how to prepare it again.


def _truncate(path: Path) -> None:
  os.truncate(path, path.stat().st_size // 2)


def _overwrite_start(path: Path) -> None:
  with open(path, 'r+b') as f:
    f.write(b'garbage!' * 512)


def _drop_splits(path: Path) -> None:
  info = json.loads(path.read_text())
  del info['splits']
  path.write_text(json.dumps(info))


@pytest.fixture
def tf_garbage_freed():
  """Frees, after the test, the tf.data iterators that a caught error's traceback holds.

  Each holds a few dozen threads; left to a later collection, their teardown stalled an
  unrelated test for 40 s (no CPU used) in a full run of the suite.
  """
  yield
  gc.collect()


def _damaged_mnist(tfds_dir: str, tmp_path: Path, pattern: str, damage) -> Path:
  """A data dir in tmp_path with a copy of the prepared mnist (the cached one stays intact),
  `damage` done to its one file that matches `pattern`."""
  data_dir = tmp_path / 'tfds'
  shutil.copytree(Path(tfds_dir) / 'mnist', data_dir / 'mnist')
  (path,) = (data_dir / 'mnist').glob(f'*/{pattern}')
  damage(path)
  return data_dir


def _assert_says_prepare_again(error: pytest.ExceptionInfo, data_dir: Path) -> None:
  message = str(error.value)
  assert message.startswith(f'dataset mnist in {data_dir / "mnist"} is damaged (')
  assert f'delete {data_dir / "mnist"}, then run again where there is internet' in message
  assert 'put mnist.npz' in message
  assert '\n' not in message


@pytest.mark.parametrize('damage', [_truncate, _overwrite_start], ids=['truncated', 'garbage'])
@pytest.mark.usefixtures('tf_garbage_freed')
def test_damaged_records_in_memory_say_prepare_again(damage, tfds_dir, tmp_path):
  from resnet_jax.data import input_pipeline

  # A fresh dir each time, so load_split's cache cannot answer.
  data_dir = _damaged_mnist(tfds_dir, tmp_path, 'mnist-train.tfrecord-*', damage)
  with pytest.raises(UserError, match='DataLossError') as e:
    input_pipeline.load_split(datasets.get_spec('mnist'), 'train', str(data_dir))
  _assert_says_prepare_again(e, data_dir)


@pytest.mark.parametrize('damage', [_truncate, _overwrite_start], ids=['truncated', 'garbage'])
@pytest.mark.parametrize('split', ['train', 'test'])
@pytest.mark.usefixtures('tf_garbage_freed')
def test_damaged_records_read_lazily_say_prepare_again(split, damage, tfds_dir, tmp_path):
  import tensorflow as tf

  from resnet_jax.data import input_pipeline

  data_dir = _damaged_mnist(tfds_dir, tmp_path, f'mnist-{split}.tfrecord-*', damage)
  spec, size = datasets.get_spec('mnist'), 8
  # MNIST stores PNGs, which the JPEG decoding would reject first: this is about the records.
  blank = lambda *_: tf.zeros([size, size, 3], tf.uint8)
  with (
    mock.patch.object(input_pipeline, 'train_image', blank),
    mock.patch.object(input_pipeline, 'eval_image', blank),
    pytest.raises(UserError, match='DataLossError') as e,
  ):
    if split == 'train':
      batches = input_pipeline.file_train_batches(
        spec,
        str(data_dir),
        image_size=size,
        augment='inception',
        shuffle_buffer=16,
        seed=0,
        rows=np.arange(1000),
        process_index=0,
        process_count=1,
        steps_per_epoch=60,  # the whole split: the truncation is in its second half
      )
      list(itertools.islice(batches, 61))
    else:
      batches = input_pipeline.file_eval_batches(
        spec, str(data_dir), image_size=size, batch_size=1000, process_index=0, process_count=1
      )
      list(batches)
  _assert_says_prepare_again(e, data_dir)


@pytest.mark.parametrize(
  ('damage', 'problem'),
  [
    (lambda path: path.write_bytes(b'\x00garbage'), 'does not parse'),
    (lambda path: path.write_text('{}'), 'does not match the TFDS builder'),
    (_drop_splits, 'lists no splits'),
  ],
  ids=['garbage', 'empty', 'no-splits'],
)
def test_damaged_dataset_info_says_prepare_again(damage, problem, tfds_dir, tmp_path, mesh8):
  data_dir = _damaged_mnist(tfds_dir, tmp_path, 'dataset_info.json', damage)
  with pytest.raises(UserError, match=f'dataset_info.json {problem}') as e:
    data.train_batches(_config('mnist', str(data_dir)), mesh8)
  _assert_says_prepare_again(e, data_dir)


# Eval coverage.


@pytest.mark.parametrize('eval_batch', [7, 32, 100])
@pytest.mark.parametrize(('devices', 'processes'), [(1, 1), (8, 1), (8, 2), (8, 8)])
def test_eval_rows_of_all_processes_cover_the_split_once(eval_batch, devices, processes, tfds_dir):

  spec = datasets.get_spec('mnist')
  images, labels = memory_source.load_split(spec, spec.eval_split, tfds_dir)
  global_batch = -(-eval_batch // devices) * devices  # as eval_batches rounds it
  seen = []
  for rows in np.split(np.arange(global_batch), processes):
    for b in memory_source.memory_eval_batches(images, labels, batch_size=global_batch, rows=rows):
      assert b['image'].shape[0] == len(rows)
      seen.append(b['index'][b['mask'] == 1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(10_000))


@pytest.mark.mesh
@pytest.mark.parametrize(('eval_batch', 'devices'), [(7, 8), (32, 1), (100, 8)])
def test_eval_batches_see_every_example_once(eval_batch, devices, tfds_dir):

  mesh = sharding.make_mesh(jax.devices()[:devices])
  c = _config('mnist', tfds_dir, eval_batch_size=eval_batch)
  batches = [jax.device_get(b) for b in data.eval_batches(c, mesh, with_index=True)]
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 10_000
  index = np.concatenate([b['index'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(np.sort(index), np.arange(10_000))
  spec = datasets.get_spec('mnist')
  _, labels = memory_source.load_split(spec, spec.eval_split, tfds_dir)
  np.testing.assert_array_equal(
    np.concatenate([b['label'] for b in batches])[mask == 1], labels[index]
  )
  assert set(data.eval_batches(c, mesh).__next__()) == {'image', 'label', 'mask'}


@pytest.mark.parametrize('processes', [2, 3])
def test_process_splits_are_disjoint_and_cover_the_split(processes, tfds_dir):
  import tensorflow_datasets as tfds

  from resnet_jax.data import input_pipeline

  builder = tfds.builder('mnist', data_dir=tfds_dir)
  parts = []
  for p in range(processes):
    split = input_pipeline.process_split('test', p, processes)
    ds = builder.as_dataset(split=split, read_config=tfds.ReadConfig(add_tfds_id=True))
    ids = np.concatenate([b['tfds_id'] for b in tfds.as_numpy(ds.batch(5000))])
    assert len(ids) == input_pipeline.process_split_size(10_000, p, processes)
    parts.append(set(ids.tolist()))
  assert sum(map(len, parts)) == len(set.union(*parts)) == 10_000


# Device-resident and synthetic data.


@pytest.mark.parametrize('dataset', ['mnist', 'cifar10'])
def test_device_resident_batches_are_deterministic_and_device_count_free(
  dataset, tfds_dir, mesh1, mesh8
):
  c = _config(dataset, tfds_dir, device_resident_data=True)
  batches = _train(c, mesh8, 3)
  shape = datasets.input_shape(c)
  assert batches[0]['image'].shape == (16, *shape) and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].dtype == np.int32
  _assert_same(batches, _train(c, mesh1, 3))  # a fresh pipeline, on another device count
  _assert_same(batches[2:], _train(c, mesh8, 1, start_step=2))
  other_seed = _config(dataset, tfds_dir, device_resident_data=True, seed=1)
  assert _differ(batches[:1], _train(other_seed, mesh8, 1))
  assert _differ(batches[:1], batches[1:2])


def test_synthetic_batches(mesh1, mesh8):
  c = _config('synthetic', image_size=32, eval_batch_size=300)
  batches = _train(c, mesh8, 2)
  assert batches[0]['image'].shape == (16, 32, 32, 3) and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].dtype == np.int32 and batches[0]['label'].max() < 1000
  _assert_same(batches, _train(c, mesh1, 2))
  _assert_same(batches[1:], _train(c, mesh8, 1, start_step=1))
  masks = [np.asarray(b['mask']) for b in data.eval_batches(c, mesh8)]
  assert sum(m.sum() for m in masks) == datasets.get_spec('synthetic').num_eval


def test_synthetic_data_needs_no_tensorflow():
  code = '\n'.join(
    [
      'import itertools, json, sys',
      'from configs import default',
      'from resnet_jax import data, sharding',
      'c = default.get_config(); c.dataset = "synthetic"; c.image_size = 16; c.batch_size = 8',
      'mesh = sharding.make_mesh()',
      'shapes = [b["image"].shape for b in itertools.islice(data.train_batches(c, mesh), 2)]',
      'print(json.dumps({"tf": "tensorflow" in sys.modules, "shape": shapes[0]}))',
    ]
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
    env={**__import__('os').environ, 'PYTHONPATH': str(REPO)},
  )
  assert json.loads(out.stdout.splitlines()[-1]) == {'tf': False, 'shape': [8, 16, 16, 3]}


# The ImageNet path, on tfds' mock data.


@pytest.mark.parametrize('augment', ['inception', 'scale'])
def test_imagenet_pipeline_on_mock_data(augment, mesh8):
  import tensorflow_datasets as tfds

  # The spec's sizes made to match the 20 mock examples, so epochs and eval are short.
  spec = dataclasses.replace(datasets.get_spec('imagenet2012'), num_train=20, num_eval=20)
  c = _config(
    'imagenet2012',
    batch_size=8,
    eval_batch_size=12,
    image_size=64,
    train_augment=augment,
    shuffle_buffer=16,
  )
  with (
    tfds.testing.mock_data(num_examples=20),
    mock.patch.dict(datasets.DATASETS, imagenet2012=spec),
  ):
    batches = _train(c, mesh8, 5)  # 2 steps per epoch: crosses two epoch boundaries
    assert batches[0]['image'].shape == (8, 64, 64, 3)
    assert batches[0]['image'].dtype == np.float32 and batches[0]['label'].dtype == np.int32
    images = np.stack([b['image'] for b in batches])
    mean, std = datasets.IMAGENET_MEAN, datasets.IMAGENET_STD
    assert images.min() >= (-mean / std).min() - 1e-5
    assert images.max() <= ((255 - mean) / std).max() + 1e-5
    assert images.std() > 0.3
    _assert_same(batches, _train(c, mesh8, 5))
    _assert_same(batches[3:], _train(c, mesh8, 2, start_step=3))
    evals = [jax.device_get(b) for b in data.eval_batches(c, mesh8)]
  assert [b['image'].shape for b in evals] == [(16, 64, 64, 3)] * 2  # 12 rounded up to 16
  assert sum(b['mask'].sum() for b in evals) == 20
