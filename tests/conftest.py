"""Test session setup: 8 CPU devices, and real MNIST and CIFAR-10 as a prepared TFDS dir."""

import os

# Before anything imports jax: the whole session sees 8 CPU devices, so sharding is tested
# for real; 1-device tests use make_mesh(jax.devices()[:1]).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The datasets folder of ../shared, beside the repository (also beside a CI clone).
SHARED_DATASETS = Path(__file__).resolve().parents[2] / 'shared' / 'datasets'
TEST_DATASETS = ('mnist', 'cifar10')


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


def _cache_dir() -> Path:
  sources = sorted(SHARED_DATASETS.iterdir())
  key = repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sources])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return Path(tempfile.gettempdir()) / f'resnet_jax_test_tfds_{digest}'


def _prepared(data_dir: Path, name: str) -> bool:
  import tensorflow_datasets as tfds  # lazily: only tests with real data need it

  return tfds.builder(name, data_dir=str(data_dir)).is_prepared()
