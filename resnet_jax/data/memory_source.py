"""In-memory datasets (MNIST, CIFAR): whole splits as numpy arrays, and their batches.

Two ways in that give the same arrays:
- prepared TFDS datasets in the data dir (read by resnet_jax.data.input_pipeline, tensorflow);
- `.npz` archives in the data dir (`NAME.npz` with x_/y_ arrays, as keras.datasets
  saves them, or `NAME_jpeg.npz` with JPEG bytes, offsets and labels), read with numpy
  and Pillow only: machines without tensorflow (the lent GPU machines) train from these.
An archive in the data dir is used whether or not tensorflow is installed, so a run does
not change with the machine. Each split is put in one canonical order, by a hash of each
example's content, so both ways give the same batches.

Batches are a pure function of (seed, step): the global batch of step s is a slice of a
per-epoch permutation and its augmentation draws from (seed, step), whatever the number
of processes or devices; each process takes its `rows` of it.
"""

import concurrent.futures
import functools
import hashlib
import io
import itertools
import os
from collections.abc import Iterator

import numpy as np

from resnet_jax.data.datasets import NPZ_LAYOUT, DatasetSpec
from resnet_jax.errors import UserError

CROP_PAD = 4  # CIFAR: pad 4 pixels each side, random crop of the original size (the paper)
NPZ_NAMES = ('{name}.npz', '{name}_jpeg.npz')

Batch = dict[str, np.ndarray]


def npz_path(name: str, data_dir: str | None) -> str | None:
  """The archive of dataset `name` in `data_dir`, or None if there is none."""
  for pattern in NPZ_NAMES if data_dir else ():
    path = os.path.join(data_dir, pattern.format(name=name))
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=8)
def load_split(
  spec: DatasetSpec, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images [N, H, W, C], int32 labels [N]) in the canonical order."""
  path = npz_path(spec.name, data_dir)
  if path is not None:
    images, labels = read_npz(path, split)
  else:
    try:
      from resnet_jax.data import input_pipeline  # tensorflow: only for prepared TFDS data
    except ImportError as e:
      names = ' or '.join(p.format(name=spec.name) for p in NPZ_NAMES)
      raise UserError(
        f'dataset {spec.name}: tensorflow is not installed here and the data dir '
        f'{data_dir} has no {names}; put that archive ({NPZ_LAYOUT}) in a folder and set '
        '--config.data_dir to it, or install tensorflow-datasets.'
      ) from e
    images, labels = input_pipeline.load_split(spec, split, data_dir)
  order = canonical_order(images, labels)
  return images[order], labels[order]


def canonical_order(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The permutation that sorts examples by a 64-bit hash of (image bytes, label).

  It depends only on the examples, not on the order a source stores them in (TFDS
  shuffles on writing); equal examples are interchangeable, so ties do not matter.
  """
  keys = np.fromiter(
    (
      int.from_bytes(hashlib.blake2b(x.tobytes() + y.tobytes(), digest_size=8).digest(), 'little')
      for x, y in zip(images, labels.astype(np.int32), strict=True)
    ),
    dtype=np.uint64,
    count=len(images),
  )
  return np.argsort(keys, kind='stable')


def read_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, H, W, C] uint8, labels int32) of `split` from an archive in either layout."""
  try:
    with np.load(path) as archive:
      if f'x_{split}' in archive:
        images = archive[f'x_{split}']
        images = images[..., None] if images.ndim == 3 else images
      elif f'{split}_jpeg' in archive:
        images = _decode_jpegs(archive[f'{split}_jpeg'], archive[f'{split}_offsets'])
      else:
        raise UserError(
          f'{path} has no split {split!r} (expected x_{split} or {split}_jpeg arrays); '
          f'give an archive with {NPZ_LAYOUT}.'
        )
      labels = archive[f'y_{split}'].astype(np.int32)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{path} cannot be read ({e}); replace it with an intact copy.') from e
  return images.astype(np.uint8), labels


def _decode_jpegs(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """The JPEGs stored back to back in `data` (image i is data[offsets[i]:offsets[i+1]])."""
  from PIL import Image  # only archives of JPEGs need it

  def decode(i: int) -> np.ndarray:
    jpeg = data[offsets[i] : offsets[i + 1]].tobytes()
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))

  # Pillow releases the GIL while decoding, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    return np.stack(list(pool.map(decode, range(len(offsets) - 1), chunksize=1024)))


def memory_train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  rows: np.ndarray,
  seed: int,
  crop_flip: bool,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Endless training batches: rows `rows` of the global batch of each step from start_step.

  The global batch of step s is slice s % steps_per_epoch of the permutation of epoch
  s // steps_per_epoch (the last partial batch of an epoch is dropped); crops and flips
  are drawn for the whole global batch, so a process's part does not depend on the others.
  """
  steps_per_epoch = len(images) // batch_size
  start_epoch, first = divmod(start_step, steps_per_epoch)
  for epoch in itertools.count(start_epoch):
    # Tags 0 and 1 keep the order and augmentation streams apart for equal epoch and step.
    order = np.random.default_rng([seed, 0, epoch]).permutation(len(images))
    for position in range(first if epoch == start_epoch else 0, steps_per_epoch):
      index = order[position * batch_size : (position + 1) * batch_size][rows]
      batch = images[index]
      if crop_flip:
        rng = np.random.default_rng([seed, 1, epoch * steps_per_epoch + position])
        offsets = rng.integers(0, 2 * CROP_PAD + 1, (batch_size, 2))[rows]
        flips = (rng.random(batch_size) < 0.5)[rows]
        batch = pad_crop_flip(batch, offsets, flips)
      yield {'image': batch, 'label': labels[index]}


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Zero-pad CROP_PAD pixels, crop at `offsets` [B, 2] to the original size, flip where `flips`."""
  b, h, w, _ = images.shape
  pads = ((0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0))
  windows = np.lib.stride_tricks.sliding_window_view(np.pad(images, pads), (h, w), axis=(1, 2))
  crops = windows[np.arange(b), offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1)
  return np.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def memory_eval_batches(
  images: np.ndarray, labels: np.ndarray, *, batch_size: int, rows: np.ndarray
) -> Iterator[Batch]:
  """One pass in order; rows past the end repeat the last example with mask 0.

  Also yields 'index', each row's position in the split, so coverage can be checked.
  """
  n = len(images)
  for start in range(0, n, batch_size):
    index = start + rows
    mask = index < n
    index = np.minimum(index, n - 1)
    yield {
      'image': images[index],
      'label': labels[index],
      'mask': mask.astype(np.float32),
      'index': index,
    }
