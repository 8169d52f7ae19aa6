"""Test session setup: 8 CPU devices, and real MNIST and CIFAR-10 as a prepared TFDS dir."""

import os
import tempfile

from tests.process_env import xla_flags

# Before anything imports jax: a session sees 8 CPU devices unless XLA_FLAGS says otherwise
# (tests/run.py runs the tests marked `mesh` on 8, the rest on 1, where oneDNN's
# convolutions run); 1-device tests use make_mesh(jax.devices()[:1]).
MESH_DEVICES = 8
os.environ.setdefault('XLA_FLAGS', xla_flags(MESH_DEVICES))
# One persistent compilation cache for the session and the main.py processes it starts
# (inherited through the environment): a restart test compiles its step once, not per
# process. Fresh per session, removed at its end, unless the environment names one
# (tests/run.py: one for all its parts); configs that name a cache dir still use their own.
_SESSION_XLA_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _SESSION_XLA_CACHE = tempfile.mkdtemp(prefix='resnet_jax_test_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_XLA_CACHE
# Every program, not only those that compile for 1 s or more (jax's default; main.py's with
# a config's cache dir): each main.py start also compiled its init, batches and checkpoint
# fingerprints again, 1.5-2 s of its 9-11 s of CPU.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# As the training command does, before anything starts a thread: XLA's per-step buffers
# reuse freed memory instead of faulting in new pages (resnet_jax.host_memory).
from resnet_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import built_once  # noqa: E402

# The datasets folder of ../shared, beside the repository (also beside a CI clone).
SHARED_DATASETS = Path(__file__).resolve().parents[2] / 'shared' / 'datasets'
TEST_DATASETS = ('mnist', 'cifar10')


def pytest_collection_modifyitems(config, items) -> None:
  """Tests on the `mesh8` fixture are `mesh` tests; a `mesh` test in a session with fewer
  devices is skipped, saying where it runs."""
  import jax

  for item in items:
    if 'mesh8' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.mesh)
  if jax.device_count() >= MESH_DEVICES:
    return
  skip = pytest.mark.skip(reason=f'needs {MESH_DEVICES} host devices: python tests/run.py')
  for item in items:
    if item.get_closest_marker('mesh'):
      item.add_marker(skip)


def pytest_unconfigure(config) -> None:
  if _SESSION_XLA_CACHE:
    shutil.rmtree(_SESSION_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def tfds_dir() -> str:
  """A TFDS data dir holding the real mnist and cifar10 (prepared once, ~1 min, then cached).

  The cache is $RESNET_JAX_TEST_TFDS, or a temp dir named after the source files' sizes
  and mtimes, so changed sources get a fresh dir.
  """
  script = SHARED_DATASETS / 'prepare_tfds.py'
  if not script.exists():
    pytest.skip(f'{script} is missing: the real datasets live in ../shared beside the repo')
  data_dir = Path(os.environ.get('RESNET_JAX_TEST_TFDS') or _cache_dir())
  data_dir.mkdir(parents=True, exist_ok=True)
  # A lock, since concurrent test sessions share the cache.
  with open(data_dir / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for name in TEST_DATASETS:
      if not _prepared(data_dir, name):
        # A subprocess keeps its TF state and the decoded source images out of this one.
        cmd = [sys.executable, str(script), '--data_dir', str(data_dir), '--datasets', name]
        subprocess.run(cmd, check=True, capture_output=True)
  return str(data_dir)


@pytest.fixture(scope='session')
def mnist_workdir(tfds_dir, tmp_path_factory) -> Path:
  """A workdir of a 14-layer ResNet trained on 19k MNIST examples (300 steps of 64, one
  device, ~1 min), built once per session; read by the convergence test and the
  fine-tuning tests."""
  import jax

  from resnet_jax import sharding
  from resnet_jax.training import train

  def build(workdir: Path) -> None:
    mesh = sharding.make_mesh(jax.devices()[:1])
    train.train_and_evaluate(mnist_config(tfds_dir), str(workdir), mesh)

  return built_once(tmp_path_factory, 'mnist_resnet14', build)


def mnist_config(tfds_dir: str):
  """The config of `mnist_workdir`."""
  from configs import default

  c = default.get_config()
  c.update(
    dict(
      model='cifar_resnet20',
      dataset='mnist',
      data_dir=tfds_dir,
      dtype='float32',
      batch_size=64,
      eval_batch_size=1000,
      num_train_steps=300,
      warmup_steps=30,
      learning_rate=0.4,
      log_every_steps=100,
      eval_every_steps=300,
      checkpoint_every_steps=300,
      compilation_cache_dir='',
    )
  )
  c.model_overrides.stage_sizes = (2, 2, 2)
  return c


def _cache_dir() -> Path:
  sources = sorted(SHARED_DATASETS.iterdir())
  key = repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sources])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return Path(tempfile.gettempdir()) / f'resnet_jax_test_tfds_{digest}'


def _prepared(data_dir: Path, name: str) -> bool:
  import tensorflow_datasets as tfds  # lazily: only tests with real data need it

  return tfds.builder(name, data_dir=str(data_dir)).is_prepared()
