"""The datasets, and the batches that feed training and evaluation.

Batches are global jax.Arrays sharded over the mesh's `data` axis. Training batches are a
pure function of (seed, step), so a run resumes at any step without replaying data:
- synthetic data and device-resident MNIST/CIFAR are made on the devices
  (`resnet_jax.device_data`), independent of the number of devices and processes;
- MNIST/CIFAR from host memory and ImageNet-style JPEG datasets go through the host
  pipeline (`resnet_jax.input_pipeline`, the only module that imports tensorflow; it is
  imported lazily, so the model and benchmarks import this module without it). Their
  batches do not depend on the device count; for the JPEG datasets, whose processes read
  disjoint parts of the split, which examples form a batch depends on the process count.
Images leave the host as uint8 and are normalised on the devices.
"""

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax import device_data, sharding
from resnet_jax.errors import UserError

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset: its TFDS name (None: made on the devices), splits, classes and sizes.

  image_shape is the native (H, W, C); datasets of photos of any size give the 224x224
  that the model sees by default (they are cropped and resized to config.image_size).
  """

  name: str
  tfds_name: str | None
  train_split: str
  eval_split: str
  num_classes: int
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]


DATASETS: dict[str, DatasetSpec] = {
  s.name: s
  for s in [
    DatasetSpec(
      'imagenet2012', 'imagenet2012', 'train', 'validation', 1000, 1_281_167, 50_000, (224, 224, 3)
    ),
    DatasetSpec('imagenette', 'imagenette', 'train', 'validation', 10, 9_469, 3_925, (224, 224, 3)),
    DatasetSpec('cifar10', 'cifar10', 'train', 'test', 10, 50_000, 10_000, (32, 32, 3)),
    DatasetSpec('cifar100', 'cifar100', 'train', 'test', 100, 50_000, 10_000, (32, 32, 3)),
    DatasetSpec('mnist', 'mnist', 'train', 'test', 10, 60_000, 10_000, (28, 28, 1)),
    DatasetSpec('fashion_mnist', 'fashion_mnist', 'train', 'test', 10, 60_000, 10_000, (28, 28, 1)),
    # ImageNet-sized epochs keep schedules realistic; a small eval split keeps smoke runs fast.
    DatasetSpec('synthetic', None, 'train', 'test', 1000, 1_281_167, 1_000, (224, 224, 3)),
  ]
}

# Small enough to hold as numpy (and, optionally, on the devices); native image size.
IN_MEMORY = frozenset({'mnist', 'fashion_mnist', 'cifar10', 'cifar100'})
_CROP_FLIP = frozenset({'cifar10', 'cifar100'})  # the paper's CIFAR augmentation
NORMALIZATIONS = ('per_channel', 'per_pixel_mean')
TRAIN_AUGMENTS = ('inception', 'scale')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def get_spec(name: str) -> DatasetSpec:
  """The DatasetSpec called `name`; a UserError naming the known ones otherwise."""
  if name not in DATASETS:
    raise UserError(
      f'unknown dataset {name!r}; set --config.dataset to one of: {", ".join(DATASETS)}.'
    )
  return DATASETS[name]


def input_shape(config: Any) -> tuple[int, int, int]:
  """(H, W, C) of the images the model sees."""
  spec = get_spec(config.dataset)
  if spec.name in IN_MEMORY:
    return spec.image_shape
  return (config.image_size, config.image_size, spec.image_shape[-1])


def steps_per_epoch(config: Any) -> int:
  """Training steps in one pass over the train split (the last partial batch is dropped)."""
  return max(1, get_spec(config.dataset).num_train // config.batch_size)


def train_batches(config: Any, mesh: Mesh, start_step: int = 0) -> Iterator[Batch]:
  """Endless {'image': float32 [B, H, W, C], 'label': int32 [B]} global training batches.

  The k-th batch is the one of step start_step + k; B is config.batch_size (global).
  Augmentation: CIFAR pad-4 random crops and flips, MNIST none, JPEG datasets
  config.train_augment; synthetic images are N(0, 1) noise.
  """
  spec = get_spec(config.dataset)
  sharding.check_batch_divisible(config.batch_size, mesh)
  if spec.tfds_name is None:
    return device_data.synthetic_train_batches(
      input_shape(config), spec.num_classes, config.batch_size, mesh, config.seed, start_step
    )
  _check_config(config, spec)
  mean, std = _normalization(spec, config.normalize, _data_dir(config))
  if config.device_resident_data:
    return _resident_train_batches(config, spec, mesh, start_step, mean, std)
  local = _host_train_batches(config, spec, mesh, start_step)
  return _on_devices(local, mesh, mean, std, config.prefetch_batches)


def _resident_train_batches(
  config: Any, spec: DatasetSpec, mesh: Mesh, start_step: int, mean: np.ndarray, std: np.ndarray
) -> Iterator[Batch]:
  from resnet_jax import input_pipeline  # lazily: tensorflow only for real data

  images, labels = input_pipeline.load_split(spec, spec.train_split, _data_dir(config))
  return device_data.resident_train_batches(
    images,
    labels,
    mean=mean,
    std=std,
    crop_flip=spec.name in _CROP_FLIP,
    batch_size=config.batch_size,
    mesh=mesh,
    seed=config.seed,
    start_step=start_step,
  )


def _host_train_batches(
  config: Any, spec: DatasetSpec, mesh: Mesh, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  """This process's numpy part of each training batch."""
  from resnet_jax import input_pipeline  # lazily: tensorflow only for real data

  data_dir = _data_dir(config)
  rows = sharding.process_batch_rows(config.batch_size, mesh)
  if spec.name in IN_MEMORY:
    images, labels = input_pipeline.load_split(spec, spec.train_split, data_dir)
    return input_pipeline.memory_train_batches(
      images,
      labels,
      batch_size=config.batch_size,
      rows=rows,
      seed=config.seed,
      crop_flip=spec.name in _CROP_FLIP,
      start_step=start_step,
    )
  return input_pipeline.file_train_batches(
    spec,
    data_dir,
    image_size=config.image_size,
    augment=config.train_augment,
    shuffle_buffer=config.shuffle_buffer,
    seed=config.seed,
    rows=rows,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    steps_per_epoch=steps_per_epoch(config),
    start_step=start_step,
  )


def eval_batches(config: Any, mesh: Mesh) -> Iterator[Batch]:
  """One pass over the eval split: {'image', 'label', 'mask'} global batches.

  The batch is config.eval_batch_size rounded up to a multiple of the device count; the
  rows that pad the split have mask 0, so sum(mask) is the split's size for any batch
  size and any number of devices or processes.
  """
  return _eval_batches(config, mesh, with_index=False)


def _eval_batches(config: Any, mesh: Mesh, with_index: bool) -> Iterator[Batch]:
  # with_index keeps 'index' (position in the split) for in-memory datasets, for tests.
  spec = get_spec(config.dataset)
  n = mesh.devices.size
  batch_size = -(-config.eval_batch_size // n) * n
  if spec.tfds_name is None:
    return device_data.synthetic_eval_batches(
      input_shape(config), spec.num_classes, batch_size, spec.num_eval, mesh, config.seed
    )
  _check_config(config, spec)
  from resnet_jax import input_pipeline  # lazily: tensorflow only for real data

  data_dir = _data_dir(config)
  mean, std = _normalization(spec, config.normalize, data_dir)
  rows = sharding.process_batch_rows(batch_size, mesh)
  if spec.name in IN_MEMORY:
    images, labels = input_pipeline.load_split(spec, spec.eval_split, data_dir)
    local = input_pipeline.memory_eval_batches(images, labels, batch_size=batch_size, rows=rows)
    if not with_index:
      local = ({k: v for k, v in b.items() if k != 'index'} for b in local)
  else:
    local = input_pipeline.file_eval_batches(
      spec,
      data_dir,
      image_size=config.image_size,
      batch_size=len(rows),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  return _on_devices(local, mesh, mean, std, config.prefetch_batches)


def _check_config(config: Any, spec: DatasetSpec) -> None:
  """UserErrors for data options that do not fit `spec`."""
  if config.normalize not in NORMALIZATIONS:
    raise UserError(
      f'normalize={config.normalize!r} is unknown; set --config.normalize to one '
      f'of: {", ".join(NORMALIZATIONS)}.'
    )
  in_memory = spec.name in IN_MEMORY
  if config.normalize == 'per_pixel_mean' and not in_memory:
    raise UserError(
      f'normalize=per_pixel_mean needs a dataset held in memory '
      f'({", ".join(sorted(IN_MEMORY))}); for {spec.name} set '
      '--config.normalize=per_channel.'
    )
  if config.device_resident_data and not in_memory:
    raise UserError(
      f'device_resident_data=True needs a small dataset '
      f'({", ".join(sorted(IN_MEMORY))}); for {spec.name} set '
      '--config.device_resident_data=False.'
    )
  if not in_memory and config.train_augment not in TRAIN_AUGMENTS:
    raise UserError(
      f'train_augment={config.train_augment!r} is unknown; set '
      f'--config.train_augment to one of: {", ".join(TRAIN_AUGMENTS)}.'
    )
  if config.batch_size > spec.num_train:
    raise UserError(
      f'batch_size={config.batch_size} is larger than the {spec.num_train} '
      f'training examples of {spec.name}; lower --config.batch_size.'
    )


def _data_dir(config: Any) -> str | None:
  """config.data_dir, else $TFDS_DATA_DIR, else None (tfds' default, ~/tensorflow_datasets)."""
  data_dir = config.data_dir or os.environ.get('TFDS_DATA_DIR')
  return os.path.expanduser(data_dir) if data_dir else None


@functools.lru_cache(maxsize=4)
def _normalization(
  spec: DatasetSpec, normalize: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) to normalise with, broadcastable to one image.

  per_channel: the train split's channel statistics (ImageNet's for JPEG datasets);
  per_pixel_mean (the paper's CIFAR input): the train split's mean image, divided by the
  std of all its pixels so inputs keep unit scale.
  """
  if spec.name not in IN_MEMORY:
    return IMAGENET_MEAN, IMAGENET_STD
  from resnet_jax import input_pipeline  # lazily: tensorflow only for real data

  images, _ = input_pipeline.load_split(spec, spec.train_split, data_dir)
  mean, mean_square = _pixel_moments(images)
  if normalize == 'per_pixel_mean':
    std = np.sqrt(mean_square.mean() - mean.mean() ** 2)
    return mean.astype(np.float32), np.full((1,), std, np.float32)
  channel_mean = mean.mean(axis=(0, 1))
  channel_std = np.sqrt(mean_square.mean(axis=(0, 1)) - channel_mean**2)
  return channel_mean.astype(np.float32), channel_std.astype(np.float32)


def _pixel_moments(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel mean and mean square over the split, in chunks to bound the float64 copies."""
  total, total_square = np.zeros(images.shape[1:]), np.zeros(images.shape[1:])
  for start in range(0, len(images), chunk):
    x = images[start : start + chunk].astype(np.float64)
    total += x.sum(axis=0)
    total_square += np.square(x).sum(axis=0)
  return total / len(images), total_square / len(images)


def _on_devices(
  local: Iterator[dict[str, np.ndarray]],
  mesh: Mesh,
  mean: np.ndarray,
  std: np.ndarray,
  prefetch: int,
) -> Iterator[Batch]:
  """Global arrays from each process's numpy parts, normalised on the devices, prefetched."""
  normalize = device_data.batch_jit(device_data.normalize, mesh)
  replicated = sharding.replicated(mesh)
  mean, std = (jax.make_array_from_process_local_data(replicated, x) for x in (mean, std))

  def to_devices(batch: dict[str, np.ndarray]) -> Batch:
    batch = sharding.to_global_batch(batch, mesh)
    return {**batch, 'image': normalize(batch['image'], mean, std)}

  return _prefetch(map(to_devices, local), prefetch)


def _prefetch(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Keep `size` batches already sent to the devices, so transfers overlap the steps."""
  queue = collections.deque(itertools.islice(batches, size))
  for batch in batches:
    queue.append(batch)
    yield queue.popleft()
  yield from queue
