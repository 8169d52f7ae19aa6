"""Prepared TFDS datasets on the host: reading, decoding and augmenting with tf.data.

The only module that imports tensorflow / tensorflow_datasets; resnet_jax.data and
resnet_jax.data.memory_source import it lazily, so machines without tensorflow train from
device-made or .npz data. It yields this process's part of each global batch as numpy
arrays with uint8 images; resnet_jax.data assembles the global arrays and normalises on
the devices, which sends a quarter of the bytes a float32 image would.

It reads whole splits for the in-memory datasets (`load_split`, ordered and batched by
resnet_jax.data.memory_source) and streams the file datasets (ImageNet, Imagenette): each
process reads its own contiguous part of the split (`process_split`), shuffles it per
epoch with a seed from (seed, epoch) and skips within the epoch to resume. Which examples
make up a batch therefore depends on the number of processes (not on the number of
devices); augmentation depends only on (seed, step, row).
"""

import contextlib
import functools
import itertools
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from google.protobuf import json_format

from resnet_jax.data.datasets import IN_MEMORY, NPZ_LAYOUT, DatasetSpec
from resnet_jax.errors import UserError, first_line


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
  """File descriptor 2 goes to /dev/null inside, then back."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


# TF prints its C++ start-up notices straight to file descriptor 2 on import, whatever
# TF_CPP_MIN_LOG_LEVEL says, ahead of every line of ours; its later logging obeys it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
with _stderr_to_devnull():
  import tensorflow as tf  # noqa: E402
  import tensorflow_datasets as tfds  # noqa: E402

log = logging.getLogger(__name__)

# TF only feeds the host pipeline; left to itself it would take GPU memory from jax.
tf.config.set_visible_devices([], 'GPU')

AREA_RANGE = (0.08, 1.0)  # Inception-style random-resized crop
ASPECT_RANGE = (3 / 4, 4 / 3)
SCALE_RANGE = (256, 480)  # the paper's shorter side, for 224 crops
EVAL_CROP_FRACTION = 224 / 256  # eval: shorter side resized to 256 for a 224 center crop

Batch = dict[str, np.ndarray]

# How long a download host may take to accept a connection before the machine counts as
# offline; tfds itself retries an unreachable host for minutes before it gives up.
PROBE_TIMEOUT_S = 5.0

# What TF raises while reading damaged prepared files: corrupt or truncated records
# (DataLoss), a missing shard (NotFound), fewer records than dataset_info.json lists
# (FailedPrecondition, from the cardinality check of a whole-split read). Other OpErrors,
# such as an undecodable JPEG, are not cured by preparing again, so they stay tracebacks.
_DAMAGE_ERRORS = (
  tf.errors.DataLossError,
  tf.errors.NotFoundError,
  tf.errors.FailedPreconditionError,
)


def process_split(split: str, process_index: int, process_count: int) -> tfds.typing.SplitArg:
  """This process's contiguous, disjoint part of `split` (tfds.even_splits, nothing dropped)."""
  return tfds.even_splits(split, n=process_count)[process_index]


def process_split_size(num_examples: int, process_index: int, process_count: int) -> int:
  """How many examples `process_split` gives a process (the first ones get one more)."""
  return num_examples // process_count + int(process_index < num_examples % process_count)


def missing_data_message(name: str, data_dir: str, reason: str = '') -> str:
  """One line: the dataset is not in `data_dir` (and why it was not fetched), and what to do."""
  why = f' and cannot be downloaded ({reason})' if reason else ''
  return f'dataset {name} is not in {data_dir}{why}: {_how_to_get(name, data_dir)}.'


def damaged_data_message(name: str, data_dir: str, problem: str) -> str:
  """One line: the prepared files of `name` in `data_dir` are damaged, and how to redo them."""
  dataset_dir = os.path.join(data_dir, name)
  return (
    f'dataset {name} in {dataset_dir} is damaged ({problem}); delete {dataset_dir}, then '
    f'{_how_to_get(name, data_dir)}.'
  )


def _how_to_get(name: str, data_dir: str) -> str:
  """How to put dataset `name` where a run finds it (no path of this repository in it)."""
  if name == 'imagenet2012':
    return (
      'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in '
      f'{data_dir}/downloads/manual and run `tfds build imagenet2012 --data_dir {data_dir}`'
    )
  elsewhere = (
    f'put {name}.npz ({NPZ_LAYOUT}) in a folder and set --config.data_dir to it'
    if name in IN_MEMORY
    else f'run `tfds build {name} --data_dir DIR` on a machine with internet and copy DIR here'
  )
  return (
    f'run again where there is internet (tfds downloads it into {data_dir}), or {elsewhere}, '
    'or set --config.data_dir (or $TFDS_DATA_DIR) to a TFDS data dir that has it'
  )


def _unreachable(urls: Iterable[str]) -> str:
  """Why the download hosts of `urls` do not answer within PROBE_TIMEOUT_S, or ''.

  One HEAD request per host (through $HTTPS_PROXY / $HTTP_PROXY where set, as tfds'
  download goes): an offline machine answers in seconds, where tfds retries for minutes.
  Any HTTP status counts as an answer.
  """
  first_per_host = {urllib.parse.urlsplit(u).netloc: u for u in sorted(urls, reverse=True)}
  for host, url in sorted(first_per_host.items()):
    try:
      # A new opener reads the proxy variables now (urlopen's keeps its first ones).
      opener = urllib.request.build_opener()
      opener.open(urllib.request.Request(url, method='HEAD'), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
      pass  # the server answered
    except (OSError, ValueError) as e:  # URLError, a timeout, a refused connection, a bad proxy
      return f'{host} does not answer: {first_line(getattr(e, "reason", e))}'
  return ''


def _download(builder: tfds.core.DatasetBuilder, spec: DatasetSpec) -> None:
  """Let tfds download and prepare a missing dataset it can fetch itself (MNIST, CIFAR,
  Imagenette), as every JAX example does; a UserError at once where that cannot work."""
  root = str(builder.data_dir_root)
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise UserError(missing_data_message(spec.name, root))
  reason = _unreachable(builder.url_infos or {})
  if reason:
    raise UserError(missing_data_message(spec.name, root, reason))
  log.info('dataset %s is not in %s: downloading and preparing it (once)', spec.name, root)
  try:
    builder.download_and_prepare()
  except OSError as e:  # requests' errors are OSErrors: the network failed midway
    raise UserError(missing_data_message(spec.name, root, first_line(e))) from e


def _builder(spec: DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `spec` in `data_dir`; a UserError if its dataset_info.json is damaged."""
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  except json_format.Error as e:  # dataset_info.json is not JSON or not a DatasetInfo
    raise _damaged(spec, data_dir, 'its dataset_info.json does not parse') from e
  except AssertionError as e:  # how tfds says the info's version is not the builder's
    raise _damaged(spec, data_dir, 'its dataset_info.json does not match the TFDS builder') from e
  # Valid JSON without splits would read as a dataset never generated: a KeyError later.
  if not builder.info.splits and builder.is_prepared():
    raise _damaged(spec, data_dir, 'its dataset_info.json lists no splits')
  return builder


def _damaged(spec: DatasetSpec, data_dir: str | None, problem: str) -> UserError:
  """The UserError for damaged prepared files of `spec` in `data_dir` (None: tfds' default)."""
  root = data_dir or tfds.core.constants.get_default_data_dir()
  return UserError(damaged_data_message(spec.tfds_name, root, problem))


def _read(
  spec: DatasetSpec, data_dir: str | None, split: tfds.typing.SplitArg, **kwargs
) -> tf.data.Dataset:
  builder = _builder(spec, data_dir)
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError:  # how tfds says that the data was never prepared there
    _download(builder, spec)
  return builder.as_dataset(split=split, **kwargs)


@contextlib.contextmanager
def _reading(spec: DatasetSpec, data_dir: str | None) -> Iterator[None]:
  """Turns the TF errors of damaged prepared files into a UserError that says how to redo them."""
  try:
    yield
  except _DAMAGE_ERRORS as e:
    raise _damaged(spec, data_dir, _tf_problem(e)) from e


def _tf_problem(error: tf.errors.OpError) -> str:
  """The error's class and the first line of its message, without TF's op decorations."""
  message = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*', '', error.message.strip())
  return f'{type(error).__name__}: {message.splitlines()[0] if message else "?"}'


def _guarded(batches: Iterator[Batch], spec: DatasetSpec, data_dir: str | None) -> Iterator[Batch]:
  """`batches`, read lazily: a damaged file found midway raises the same UserError."""
  with _reading(spec, data_dir):
    yield from batches


def load_split(
  spec: DatasetSpec, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
  """A whole prepared split as (uint8 images [N, H, W, C], int32 labels [N]), in TFDS's order."""
  with _reading(spec, data_dir):
    arrays = tfds.as_numpy(_read(spec, data_dir, split, batch_size=-1))
  return arrays['image'], arrays['label'].astype(np.int32)


# File datasets: JPEGs decoded and augmented by tf.data.


def example_seed(seed: int, step: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
  """The stateless seed of the example in row `row` of the global batch of step `step`."""
  fold_in = tf.random.experimental.stateless_fold_in
  return fold_in(fold_in(tf.constant([seed, 0], tf.int64), step), row)


def train_image(jpeg: tf.Tensor, seed: tf.Tensor, image_size: int, augment: str) -> tf.Tensor:
  """A random crop of a JPEG ('inception' or the paper's 'scale'), resized and maybe flipped.

  Only the crop window is decoded (decode_and_crop_jpeg), which is most of the speed.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.image.extract_jpeg_shape(jpeg)
  if augment == 'inception':
    window = _inception_window(shape, crop_seed)
  else:
    window = _scale_window(shape, crop_seed, image_size)
  image = _decode_crop_resize(jpeg, window, image_size)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
  """The center crop that resizing the shorter side to image_size / EVAL_CROP_FRACTION gives."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  side = tf.cast(
    tf.round(tf.cast(tf.reduce_min(shape[:2]), tf.float32) * EVAL_CROP_FRACTION), tf.int32
  )
  window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
  return _decode_crop_resize(jpeg, window, image_size)


def _inception_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  # With the whole image as the box, min_object_covered bounds the crop's area fraction.
  # If 10 tries find no window, TF returns the whole image (a rare squashed example).
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seed,
    min_object_covered=AREA_RANGE[0],
    aspect_ratio_range=ASPECT_RANGE,
    area_range=AREA_RANGE,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.concat([begin[:2], size[:2]], axis=0)


def _scale_window(shape: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  # Resizing the shorter side to s and cropping image_size pixels is the same as cropping
  # image_size * shorter / s source pixels and resizing those: far less to decode and resize.
  low, high = (s * image_size / 224 for s in SCALE_RANGE)
  u = tf.random.stateless_uniform([3], seed)
  shorter = tf.reduce_min(shape[:2])
  side = image_size * tf.cast(shorter, tf.float32) / (low + u[0] * (high - low))
  side = tf.clip_by_value(tf.cast(tf.round(side), tf.int32), 1, shorter)
  y = tf.cast(u[1] * tf.cast(shape[0] - side + 1, tf.float32), tf.int32)
  x = tf.cast(u[2] * tf.cast(shape[1] - side + 1, tf.float32), tf.int32)
  return tf.stack([tf.minimum(y, shape[0] - side), tf.minimum(x, shape[1] - side), side, side])


def _decode_crop_resize(jpeg: tf.Tensor, window: tf.Tensor, image_size: int) -> tf.Tensor:
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method='bilinear')
  return tf.saturate_cast(tf.round(image), tf.uint8)


def file_train_batches(
  spec: DatasetSpec,
  data_dir: str | None,
  *,
  image_size: int,
  augment: str,
  shuffle_buffer: int,
  seed: int,
  rows: np.ndarray,
  process_index: int,
  process_count: int,
  steps_per_epoch: int,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Endless batches of `len(rows)` examples from this process's part of the train split.

  Epoch e reads the part with files and examples shuffled by a seed from (seed, e), takes
  steps_per_epoch local batches from it, and a resumed run skips the steps already done
  in its epoch. Raises UserError now, not at the first batch, if the data is missing.
  """
  split = process_split(spec.train_split, process_index, process_count)
  epoch = functools.partial(
    _train_epoch,
    spec,
    data_dir,
    split,
    image_size=image_size,
    augment=augment,
    shuffle_buffer=shuffle_buffer,
    seed=seed,
    rows=rows,
    steps_per_epoch=steps_per_epoch,
  )
  start_epoch, first = divmod(start_step, steps_per_epoch)
  return _guarded(
    _chain_epochs(epoch(start_epoch, first), epoch, start_epoch, split), spec, data_dir
  )


def _chain_epochs(
  first: tf.data.Dataset,
  epoch: Callable[[int, int], tf.data.Dataset],
  start_epoch: int,
  split: tfds.typing.SplitArg,
) -> Iterator[Batch]:
  yield from first.as_numpy_iterator()
  for e in itertools.count(start_epoch + 1):
    produced = 0
    for batch in epoch(e, 0).as_numpy_iterator():
      produced += 1
      yield batch
    if not produced:  # would loop forever
      raise UserError(
        f'{split} holds fewer examples than one batch needs; '
        'lower --config.batch_size or check the prepared data.'
      )


def _train_epoch(
  spec: DatasetSpec,
  data_dir: str | None,
  split: tfds.typing.SplitArg,
  epoch: int,
  skip_steps: int,
  *,
  image_size: int,
  augment: str,
  shuffle_buffer: int,
  seed: int,
  rows: np.ndarray,
  steps_per_epoch: int,
) -> tf.data.Dataset:
  local = len(rows)
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
  records = _read(
    spec,
    data_dir,
    split,
    shuffle_files=True,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=epoch_seed),
  )
  # Shuffled before decoding, so the buffer holds compressed records.
  records = records.shuffle(shuffle_buffer, seed=epoch_seed).take(steps_per_epoch * local)
  records = records.enumerate().skip(skip_steps * local)
  global_rows = tf.constant(rows, tf.int64)

  def prepare(k: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    step = epoch * steps_per_epoch + k // local
    example_key = example_seed(seed, step, tf.gather(global_rows, k % local))
    return {
      'image': train_image(example['image'], example_key, image_size, augment),
      'label': tf.cast(example['label'], tf.int32),
    }

  batches = records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(batches.batch(local, drop_remainder=True))


def file_eval_batches(
  spec: DatasetSpec,
  data_dir: str | None,
  *,
  image_size: int,
  batch_size: int,
  process_index: int,
  process_count: int,
) -> Iterator[Batch]:
  """One pass over this process's part of the eval split, in batches of `batch_size`.

  Every process yields as many batches as the largest part needs (the collective eval
  step must run equally often everywhere); the rows past its examples have mask 0.
  """
  split = process_split(spec.eval_split, process_index, process_count)
  examples = _read(spec, data_dir, split, decoders={'image': tfds.decode.SkipDecoding()})
  examples = examples.map(
    lambda ex: {
      'image': eval_image(ex['image'], image_size),
      'label': tf.cast(ex['label'], tf.int32),
      'mask': tf.constant(1.0),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  padding = tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros([image_size, image_size, 3], tf.uint8),
      'label': tf.constant(0),
      'mask': tf.constant(0.0),
    }
  ).repeat()
  num_batches = -(-process_split_size(spec.num_eval, 0, process_count) // batch_size)
  batches = examples.concatenate(padding).take(num_batches * batch_size).batch(batch_size)
  return _guarded(_finish(batches).as_numpy_iterator(), spec, data_dir)


def _finish(batches: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # parallel map and interleave keep their order
  return batches.with_options(options).prefetch(tf.data.AUTOTUNE)
