"""The data: the batches that feed training and evaluation, one entry over every source.

`train_batches(config, mesh, start_step)` and `eval_batches(config, mesh)` read the
config once (`DataOptions`) and pick the source:
- synthetic data and device-resident MNIST/CIFAR are made on the devices
  (resnet_jax.data.on_device);
- MNIST/CIFAR from host memory (resnet_jax.data.memory_source: prepared TFDS data or .npz
  archives, the same arrays either way);
- ImageNet-style JPEG datasets through tf.data (resnet_jax.data.input_pipeline, the only
  module that imports tensorflow; imported lazily).
Batches are global jax.Arrays sharded over the mesh's `data` axis, and a pure function of
(seed, step), so a run resumes at any step without replaying data. They do not depend on
the device count; for the JPEG datasets, whose processes read disjoint parts of the split,
which examples form a batch depends on the process count. Images leave the host as uint8
and are normalised on the devices.

A stack of runs (resnet_jax.training.stack) asks for the batches of several seeds at once: they
come as [K, B, ...] arrays whose k-th member is exactly the single run's batch for seed k.

May import: jax, numpy, tensorflow(-datasets) (in `input_pipeline` alone, lazily),
`resnet_jax.sharding`, `resnet_jax.errors`. Never models, training or weights.
"""

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax import sharding
from resnet_jax.data import datasets, memory_source, on_device
from resnet_jax.data.datasets import DatasetSpec
from resnet_jax.errors import UserError

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """What the data layer needs from a config, checked once."""

  spec: DatasetSpec
  data_dir: str | None  # None: tfds' default (~/tensorflow_datasets)
  batch_size: int
  steps_per_epoch: int
  eval_batch_size: int
  image_size: int
  normalize: str
  device_resident: bool
  train_augment: str
  shuffle_buffer: int
  prefetch: int

  @property
  def in_memory(self) -> bool:
    return self.spec.name in datasets.IN_MEMORY

  @property
  def crop_flip(self) -> bool:
    return self.spec.name in datasets.CROP_FLIP


def data_options(config: Any) -> DataOptions:
  """The data fields of `config`; UserErrors for options that do not fit the dataset."""
  spec = datasets.get_spec(config.dataset)
  data_dir = config.data_dir or os.environ.get('TFDS_DATA_DIR')
  options = DataOptions(
    spec=spec,
    data_dir=os.path.expanduser(data_dir) if data_dir else None,
    batch_size=config.batch_size,
    steps_per_epoch=datasets.steps_per_epoch(config),
    eval_batch_size=config.eval_batch_size,
    image_size=config.image_size,
    normalize=config.normalize,
    device_resident=config.device_resident_data,
    train_augment=config.train_augment,
    shuffle_buffer=config.shuffle_buffer,
    prefetch=config.prefetch_batches,
  )
  if spec.tfds_name is not None:
    _check(options)
  return options


def _check(o: DataOptions) -> None:
  name, in_memory = o.spec.name, ', '.join(sorted(datasets.IN_MEMORY))
  if o.normalize not in datasets.NORMALIZATIONS:
    raise UserError(
      f'normalize={o.normalize!r} is unknown; set --config.normalize to one '
      f'of: {", ".join(datasets.NORMALIZATIONS)}.'
    )
  if o.normalize == 'per_pixel_mean' and not o.in_memory:
    raise UserError(
      f'normalize=per_pixel_mean needs a dataset held in memory ({in_memory}); for '
      f'{name} set --config.normalize=per_channel.'
    )
  if o.device_resident and not o.in_memory:
    raise UserError(
      f'device_resident_data=True needs a small dataset ({in_memory}); for {name} set '
      '--config.device_resident_data=False.'
    )
  if not o.in_memory and o.train_augment not in datasets.TRAIN_AUGMENTS:
    raise UserError(
      f'train_augment={o.train_augment!r} is unknown; set '
      f'--config.train_augment to one of: {", ".join(datasets.TRAIN_AUGMENTS)}.'
    )
  if o.batch_size > o.spec.num_train:
    raise UserError(
      f'batch_size={o.batch_size} is larger than the {o.spec.num_train} '
      f'training examples of {name}; lower --config.batch_size.'
    )


def train_batches(
  config: Any, mesh: Mesh, start_step: int = 0, seeds: Sequence[int] | None = None
) -> Iterator[Batch]:
  """Endless {'image': float32 [B, H, W, C], 'label': int32 [B]} global training batches.

  The k-th batch is the one of step start_step + k; B is config.batch_size (global).
  Augmentation: CIFAR pad-4 random crops and flips, MNIST none, JPEG datasets
  config.train_augment; synthetic images are N(0, 1) noise. With `seeds` (a stack), the
  arrays are [K, B, ...] and member k gets the batches of the run with seed seeds[k];
  otherwise the run's seed is config.seed.
  """
  o = data_options(config)
  sharding.check_batch_divisible(o.batch_size, mesh)
  stacked = seeds is not None
  seeds = tuple(seeds) if stacked else (config.seed,)
  if o.spec.tfds_name is None:
    return on_device.synthetic_train_batches(
      datasets.input_shape(config), o.spec.num_classes, o.batch_size, mesh, seeds, stacked,
      start_step,
    )  # fmt: skip
  mean, std = _normalization(o.spec, o.normalize, o.data_dir)
  if o.device_resident:
    images, labels = memory_source.load_split(o.spec, o.spec.train_split, o.data_dir)
    return on_device.resident_train_batches(
      images,
      labels,
      mean=mean,
      std=std,
      crop_flip=o.crop_flip,
      batch_size=o.batch_size,
      mesh=mesh,
      seeds=seeds,
      stacked=stacked,
      start_step=start_step,
    )
  members = [_host_train_batches(o, mesh, seed, start_step) for seed in seeds]
  local = map(_stack, *members) if stacked else members[0]
  return _on_devices(local, mesh, mean, std, o.prefetch, stacked)


def _stack(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _host_train_batches(
  o: DataOptions, mesh: Mesh, seed: int, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  """This process's numpy part of each training batch of the run with `seed`."""
  rows = sharding.process_batch_rows(o.batch_size, mesh)
  if o.in_memory:
    images, labels = memory_source.load_split(o.spec, o.spec.train_split, o.data_dir)
    return memory_source.memory_train_batches(
      images,
      labels,
      batch_size=o.batch_size,
      rows=rows,
      seed=seed,
      crop_flip=o.crop_flip,
      start_step=start_step,
    )
  from resnet_jax.data import input_pipeline  # lazily: tensorflow only for file datasets

  return input_pipeline.file_train_batches(
    o.spec,
    o.data_dir,
    image_size=o.image_size,
    augment=o.train_augment,
    shuffle_buffer=o.shuffle_buffer,
    seed=seed,
    rows=rows,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    steps_per_epoch=o.steps_per_epoch,
    start_step=start_step,
  )


def eval_batches(config: Any, mesh: Mesh, with_index: bool = False) -> Iterator[Batch]:
  """One pass over the eval split: {'image', 'label', 'mask'} global batches.

  The batch is config.eval_batch_size rounded up to a multiple of the device count; the
  rows that pad the split have mask 0, so sum(mask) is the split's size for any batch
  size and any number of devices or processes. `with_index` keeps each row's position in
  the split (in-memory datasets), to check coverage.
  """
  o = data_options(config)
  n = mesh.devices.size
  batch_size = -(-o.eval_batch_size // n) * n
  if o.spec.tfds_name is None:
    return on_device.synthetic_eval_batches(
      datasets.input_shape(config), o.spec.num_classes, batch_size, o.spec.num_eval, mesh,
      config.seed,
    )  # fmt: skip
  mean, std = _normalization(o.spec, o.normalize, o.data_dir)
  rows = sharding.process_batch_rows(batch_size, mesh)
  if o.in_memory:
    images, labels = memory_source.load_split(o.spec, o.spec.eval_split, o.data_dir)
    local = memory_source.memory_eval_batches(images, labels, batch_size=batch_size, rows=rows)
    if not with_index:
      local = ({k: v for k, v in b.items() if k != 'index'} for b in local)
  else:
    from resnet_jax.data import input_pipeline  # lazily: tensorflow only for file datasets

    local = input_pipeline.file_eval_batches(
      o.spec,
      o.data_dir,
      image_size=o.image_size,
      batch_size=len(rows),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  return _on_devices(local, mesh, mean, std, o.prefetch)


@functools.lru_cache(maxsize=4)
def _normalization(
  spec: DatasetSpec, normalize: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) to normalise with, broadcastable to one image.

  per_channel: the train split's channel statistics (ImageNet's for JPEG datasets);
  per_pixel_mean (the paper's CIFAR input): the train split's mean image, divided by the
  std of all its pixels so inputs keep unit scale.
  """
  if spec.name not in datasets.IN_MEMORY:
    return datasets.IMAGENET_MEAN, datasets.IMAGENET_STD
  images, _ = memory_source.load_split(spec, spec.train_split, data_dir)
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
  stacked: bool = False,
) -> Iterator[Batch]:
  """Global arrays from each process's numpy parts, normalised on the devices, prefetched."""
  normalize = on_device.batch_jit(on_device.normalize, mesh, stacked=stacked)
  replicated = sharding.replicated(mesh)
  mean, std = (jax.make_array_from_process_local_data(replicated, x) for x in (mean, std))

  def to_devices(batch: dict[str, np.ndarray]) -> Batch:
    batch = sharding.to_global_batch(batch, mesh, stacked)
    return {**batch, 'image': normalize(batch['image'], mean, std)}

  return _prefetch(map(to_devices, local), prefetch)


def _prefetch(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Keep `size` batches already sent to the devices, so transfers overlap the steps."""
  queue = collections.deque(itertools.islice(batches, size))
  for batch in batches:
    queue.append(batch)
    yield queue.popleft()
  yield from queue
