"""Images/s per CPU core of the ImageNet training input pipeline, on JPEGs it makes itself.

    python -m benchmarks.input_pipeline --images 300 --seconds 20

Encodes `--images` ImageNet-sized JPEGs (500x375, smooth random shapes plus texture and
noise, quality 90: about the bytes per pixel of ImageNet's photos), then feeds them as a
tf.data source through the real training preprocessing (`input_pipeline.train_image`:
decode fused with the random-resized crop, resize to 224, flip; seeds from
`input_pipeline.example_seed`), batches them, and normalises each batch with the
pipeline's device function on this machine's jax devices, as `data.train_batches` does.
Prints one JSON line: img_per_s, img_per_s_per_core (over the cores this process may use),
cores, img_per_cpu_s (images per CPU-second the process used: robust when other work
shares the cores), the same two without the transfer and normalisation (host_*), and
the mean JPEG size.
"""

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from resnet_jax import sharding
from resnet_jax.data import datasets, input_pipeline, on_device


def make_jpegs(count: int, height: int, width: int, seed: int) -> list[bytes]:
  """Photo-like JPEGs: blurred colour blobs at a few scales plus grain, at quality 90."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    image = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 100.0), (16, 50.0), (64, 30.0), (160, 35.0)):
      coarse = rng.normal(size=(cells, cells * width // height + 1, 3)).astype(np.float32)
      image += weight * tf.image.resize(coarse, (height, width), method='bicubic').numpy()
    image += rng.normal(scale=10.0, size=image.shape)
    pixels = np.clip(image + 128.0, 0, 255).astype(np.uint8)
    jpegs.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return jpegs


def host_batches(jpegs: list[bytes], batch_size: int, image_size: int) -> Iterator[dict]:
  """The training preprocessing of `input_pipeline` over the JPEGs, repeated, in batches."""
  labels = np.arange(len(jpegs), dtype=np.int32) % 1000

  def prepare(k: tf.Tensor, example: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
    jpeg, label = example
    seed = input_pipeline.example_seed(0, k // batch_size, k % batch_size)
    image = input_pipeline.train_image(jpeg, seed, image_size, 'inception')
    return {'image': image, 'label': label}

  ds = tf.data.Dataset.from_tensor_slices((jpegs, labels)).repeat().enumerate()
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def rate(
  batches: Iterator[dict],
  batch_size: int,
  seconds: float,
  finish: Callable[[dict], Any] = lambda b: b,
) -> tuple[float, float]:
  """(images/s, images per CPU-second this process used) over at least `seconds`.

  The second figure stays meaningful when other work shares the cores. Five warm-up
  batches come first, for tf.data to tune itself.
  """
  for batch in itertools.islice(batches, 5):
    jax.block_until_ready(finish(batch))
  start, cpu_start, count = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - start < seconds:
    last = finish(next(batches))
    count += batch_size
  jax.block_until_ready(last)
  return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--images', type=int, default=300, help='distinct JPEGs, cycled')
  p.add_argument('--batch', type=int, default=128, help='global batch')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--seconds', type=float, default=20.0, help='timed seconds per measurement')
  a = p.parse_args()

  jpegs = make_jpegs(a.images, 375, 500, seed=0)
  mesh = sharding.make_mesh()
  normalize = on_device.batch_jit(on_device.normalize, mesh)
  replicated = sharding.replicated(mesh)
  mean, std = (
    jax.device_put(x, replicated) for x in (datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
  )

  def to_devices(batch: dict[str, np.ndarray]) -> jax.Array:
    return normalize(sharding.to_global_batch(batch, mesh)['image'], mean, std)

  host, host_per_cpu_s = rate(host_batches(jpegs, a.batch, a.image_size), a.batch, a.seconds)
  full, per_cpu_s = rate(host_batches(jpegs, a.batch, a.image_size), a.batch, a.seconds, to_devices)
  cores = len(os.sched_getaffinity(0))
  print(
    json.dumps(
      {
        'img_per_s': round(full, 1),
        'img_per_s_per_core': round(full / cores, 1),
        'cores': cores,
        'img_per_cpu_s': round(per_cpu_s, 1),
        'host_img_per_s': round(host, 1),
        'host_img_per_cpu_s': round(host_per_cpu_s, 1),
        'image_size': a.image_size,
        'source': f'{a.images} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB',
        'devices': f'{mesh.devices.size} x {jax.devices()[0].device_kind}',
      }
    )
  )


if __name__ == '__main__':
  main()
