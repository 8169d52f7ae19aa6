"""The public API (resnet_jax/__init__.py), the README's library example and the console
commands that pyproject.toml installs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import resnet_jax

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_resolve():
  for name in resnet_jax.__all__:
    assert getattr(resnet_jax, name) is not None, name
  assert 'cifar_resnet20' in resnet_jax.ARCHITECTURES
  with pytest.raises(AttributeError, match='no attribute'):
    resnet_jax.not_a_name  # noqa: B018


def test_readme_library_example_runs():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## Use as a library', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  last = out.strip().splitlines()[-1]
  assert last.startswith('20 (2, 1000) '), last  # the synthetic set has 1000 classes
  assert "'eval_top1'" in last


@pytest.mark.parametrize(
  'command, args, expected',
  [
    ('resnet-jax-summary', ['cifar_resnet20'], '269,722'),
    ('resnet-jax-train', ['--helpfull'], 'train (resuming), or only evaluate a checkpoint'),
    ('resnet-jax-convert', ['--helpfull'], 'import: a torchvision/timm'),
  ],
)
def test_console_commands(command, args, expected):
  exe = shutil.which(command) or str(Path(sys.executable).parent / command)
  if not Path(exe).exists():
    pytest.skip(f'{command} is not installed; run pip install -e .')
  out = subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT)
  assert expected in out.stdout + out.stderr
