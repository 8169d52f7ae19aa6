"""The datasets this codebase knows: names, splits, classes, sizes and image shapes.

Only facts about datasets, no reading: the config checks, the model builder and the data
sources (resnet_jax.data) all look datasets up here.
"""

import dataclasses
from typing import Any

import numpy as np

from resnet_jax.errors import UserError


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
# What NAME.npz holds for an in-memory dataset, as keras.datasets saves them: memory_source
# reads it, and both it and input_pipeline name it in the errors that ask for one.
NPZ_LAYOUT = 'uint8 arrays x_train, y_train, x_test, y_test'
CROP_FLIP = frozenset({'cifar10', 'cifar100'})  # the paper's CIFAR augmentation
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
