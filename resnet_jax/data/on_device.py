"""Input made on the devices: synthetic batches and augmentation of device-resident data.

jax only, no tensorflow: the benchmarks and smoke runs that use it need neither tensorflow
nor data files. Every batch is a pure function of (seed, step): its keys are folded in from
the seed, and jax's default threefry PRNG (`jax_threefry_partitionable`) draws the same
bits however the output is sharded, so batches do not depend on the number of devices.
"""

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from resnet_jax import sharding

CROP_PAD = 4  # CIFAR augmentation: pad 4 pixels each side, then a random crop of the original size

Batch = dict[str, jax.Array]


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images -> float32 (images - mean) / std (mean, std broadcast over the batch)."""
  return (images.astype(jnp.float32) - mean) / std


def pad_crop_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Per image: zero-pad CROP_PAD pixels, crop a random window of the original size, flip half."""
  b, h, w, c = images.shape
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (b, 2), 0, 2 * CROP_PAD + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (b,))
  pads = ((0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0))
  padded = jnp.pad(images, pads)
  crop = lambda image, offset: lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  crops = jax.vmap(crop)(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


@functools.cache
def batch_jit(
  fn: Callable, mesh: Mesh, stacked: bool = False, per_seed: bool = False, **static: Any
) -> Callable:
  """`fn` with `static` bound, jitted to batch-sharded outputs.

  `stacked`: outputs are [K, B, ...] (a stack of runs), sharded on B; with `per_seed`,
  fn(step, seed, *rest) is mapped over a [K] array of seeds, so member k's batch is
  bit for bit the single run's. Cached, so the pipelines made again for each evaluation
  reuse the compiled code.
  """
  fn = functools.partial(fn, **static)
  if stacked and per_seed:
    fn = _per_seed(fn)
  jitted = jax.jit(fn, out_shardings=sharding.batch_sharding(mesh, stacked))
  if mesh.devices.size == 1 or mesh.devices.flat[0].platform != 'cpu':
    return jitted
  # XLA:CPU with several devices on few cores deadlocks when a program with collectives
  # (the train step) is dispatched while its input is still being computed by another
  # program (seen with jax 0.10.2, 8 forced devices, 2 cores). There, batches are made
  # ready before they are handed out; accelerators keep the fully asynchronous path.
  return lambda *args: jax.block_until_ready(jitted(*args))


def _per_seed(fn: Callable) -> Callable:
  """fn(step, seed, *rest) -> fn mapped over a [K] array of seeds (a stack's batches)."""

  def mapped(step: jax.Array, seeds: jax.Array, *rest: jax.Array) -> Batch:
    return jax.vmap(lambda seed: fn(step, seed, *rest))(seeds)

  return mapped


def _seed_arg(seeds: Sequence[int], stacked: bool) -> np.ndarray:
  return np.asarray(seeds if stacked else seeds[0], np.int32)


def synthetic_train_batches(
  shape: tuple[int, int, int],
  num_classes: int,
  batch_size: int,
  mesh: Mesh,
  seeds: Sequence[int],
  stacked: bool = False,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Endless random {'image': N(0, 1), 'label'} batches; the k-th is that of step start_step + k.

  `seeds`: one seed, or with `stacked` one per member ([K, B, ...] batches).
  """
  make = batch_jit(
    _synthetic_batch,
    mesh,
    stacked,
    per_seed=True,
    shape=shape,
    num_classes=num_classes,
    batch_size=batch_size,
    stream=0,
  )
  seed = _seed_arg(seeds, stacked)
  for step in itertools.count(start_step):
    yield make(np.int32(step), seed)


def synthetic_eval_batches(
  shape: tuple[int, int, int],
  num_classes: int,
  batch_size: int,
  num_examples: int,
  mesh: Mesh,
  seed: int,
) -> Iterator[Batch]:
  """One pass over `num_examples` random examples; padding rows of the last batch have mask 0."""
  make = batch_jit(
    _synthetic_eval_batch,
    mesh,
    shape=shape,
    num_classes=num_classes,
    batch_size=batch_size,
    num_examples=num_examples,
  )
  for index in range(-(-num_examples // batch_size)):
    yield make(np.int32(index), np.int32(seed))


def _synthetic_batch(
  step: jax.Array,
  seed: jax.Array,
  *,
  shape: tuple[int, int, int],
  num_classes: int,
  batch_size: int,
  stream: int,
) -> Batch:
  # `stream` keeps eval examples apart from the training ones drawn with the same seed.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)
  image_key, label_key = jax.random.split(key)
  return {
    'image': jax.random.normal(image_key, (batch_size, *shape), jnp.float32),
    'label': jax.random.randint(label_key, (batch_size,), 0, num_classes, jnp.int32),
  }


def _synthetic_eval_batch(
  index: jax.Array, seed: jax.Array, *, num_examples: int, batch_size: int, **kwargs: Any
) -> Batch:
  batch = _synthetic_batch(index, seed, batch_size=batch_size, stream=1, **kwargs)
  rows = index * batch_size + jnp.arange(batch_size)
  return {**batch, 'mask': (rows < num_examples).astype(jnp.float32)}


def resident_train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mean: np.ndarray,
  std: np.ndarray,
  crop_flip: bool,
  batch_size: int,
  mesh: Mesh,
  seeds: Sequence[int],
  stacked: bool = False,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Training batches from a uint8 split held (replicated) in device memory.

  Each step gathers its examples from a per-epoch permutation and crops, flips and
  normalises them on the devices, so the host only dispatches one jitted call per step.
  `seeds`: one seed, or with `stacked` one per member ([K, B, ...] batches).
  """
  replicated = sharding.replicated(mesh)
  # Every process passes the same full arrays: that is what a replicated global array needs.
  data = [
    jax.make_array_from_process_local_data(replicated, np.asarray(x))
    for x in (images, labels.astype(np.int32), mean, std)
  ]
  make = batch_jit(
    _resident_batch, mesh, stacked, per_seed=True, batch_size=batch_size, crop_flip=crop_flip
  )
  seed = _seed_arg(seeds, stacked)
  for step in itertools.count(start_step):
    yield make(np.int32(step), seed, *data)


def _resident_batch(
  step: jax.Array,
  seed: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  mean: jax.Array,
  std: jax.Array,
  *,
  batch_size: int,
  crop_flip: bool,
) -> Batch:
  n = images.shape[0]
  steps_per_epoch = n // batch_size  # the last partial batch of each epoch is dropped
  epoch, position = jnp.divmod(step, steps_per_epoch)
  # Separate key streams, so epoch e's order and step e's augmentation are unrelated.
  order_key, augment_key = jax.random.split(jax.random.key(seed))
  order = jax.random.permutation(jax.random.fold_in(order_key, epoch), n)
  index = lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
  batch = images[index]
  if crop_flip:
    batch = pad_crop_flip(jax.random.fold_in(augment_key, step), batch)
  return {'image': normalize(batch, mean, std), 'label': labels[index]}
