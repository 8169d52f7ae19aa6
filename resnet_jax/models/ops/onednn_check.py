"""Whether oneDNN computes correctly on this CPU: checked once, in a child process.

oneDNN is native code that picks its kernels per instruction set (brgconv and jit kernels
on AVX-512 and AVX2, gemm-based ones for some shapes on AVX2 and many on SSE4.1), so a
machine can run kernels that no other machine here ran. A crash in one must not take a
training process down, and a wrong result must not train a model. So before
`conv_impl=auto` uses oneDNN, `trusted()` has a child process run every direction of a
few shapes (among them the 3x3 convolutions on 1x1 and 2x2 maps that get gemm-based
kernels), each created on one thread and run on another as XLA runs it, and compare each
result with XLA's convolution within float32 rounding. The verdict is cached per CPU
model, oneDNN release and instruction set under `$XDG_CACHE_HOME/resnet_jax` (by default
`~/.cache/resnet_jax`): a few seconds, once per machine. Where the check fails, one
warning line says why and `auto` keeps XLA's lowerings; delete the verdict file to check
again.
"""

import functools
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
from absl import logging

from resnet_jax.models.ops import onednn
from resnet_jax.models.ops.cpu_info import cpu_model

TIMEOUT_S = 120  # the child takes a few seconds; a hung kernel must not hang training
EPS = float(np.finfo(np.float32).eps)
# (input NHWC, kernel HWIO, strides, padding): the 3x3 convolutions on 1x1 and 2x2 maps
# (gemm-based weight gradients on AVX2, all directions on SSE4.1), a strided 3x3, a 7x7/2
# stem and a 1x1/2 projection.
SHAPES = (
  onednn.Shape((8, 1, 1, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
  onednn.Shape((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
  onednn.Shape((4, 9, 9, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
  onednn.Shape((2, 28, 28, 1), (7, 7, 1, 8), (2, 2), ((3, 3), (3, 3))),
  onednn.Shape((4, 8, 8, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
)


@functools.cache
def trusted() -> bool:
  """Whether oneDNN loads here and passed its check on this CPU (cached on disk)."""
  if not onednn.available():
    return False
  path = _verdict_path()
  try:
    verdict = json.loads(path.read_text())
  except (OSError, ValueError):
    verdict = _check_in_child()
    _save(path, verdict)
  if not verdict['ok']:
    logging.warning(
      "oneDNN failed its check on this CPU (%s); conv_impl=auto uses XLA's convolutions "
      '(verdict in %s)',
      verdict['why'],
      path,
    )
  return verdict['ok']


def _key() -> dict[str, str]:
  return {
    'cpu': cpu_model(),
    'onednn': onednn.version(),
    'isa': onednn.effective_isa(),
    'max_cpu_isa': os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
  }


def _verdict_path() -> pathlib.Path:
  cache = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  digest = hashlib.sha256(json.dumps(_key(), sort_keys=True).encode()).hexdigest()[:16]
  return pathlib.Path(cache) / 'resnet_jax' / f'onednn_check_{digest}.json'


def _child_command() -> list[str]:
  return [sys.executable, '-c', f'import {__name__} as c; c.check()']


def _check_in_child() -> dict:
  """Runs `check()` in a child process; its verdict, with the reason where it failed."""
  try:
    child = subprocess.run(
      _child_command(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
  except subprocess.TimeoutExpired:
    return {**_key(), 'ok': False, 'why': f'the check ran past {TIMEOUT_S} s'}
  if child.returncode == 0:
    return {**_key(), 'ok': True, 'why': ''}
  lines = child.stderr.strip().splitlines()
  why = f'the check exited with {_exit_status(child.returncode)}'
  return {**_key(), 'ok': False, 'why': f'{why}: {lines[-1]}' if lines else why}


def _exit_status(code: int) -> str:
  if code < 0:
    try:
      return f'signal {signal.Signals(-code).name}'
    except ValueError:
      return f'signal {-code}'
  return f'status {code}'


def _save(path: pathlib.Path, verdict: dict) -> None:
  """Writes the verdict atomically; an unwritable cache only means checking again."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
      json.dump(verdict, f, indent=1)
    os.replace(f.name, path)
  except OSError as e:
    logging.info('could not cache the oneDNN verdict in %s: %s', path, e)


def rounding_bounds(x, w, dy, strides, padding) -> tuple[tuple, tuple]:
  """XLA's y, dx, dw for the NHWC/HWIO convolution, and their float32 rounding bounds:
  2 K eps times the same sums over absolute values (K terms per sum), the standard bound
  for a sum of K products."""
  return _bounds_fn(tuple(strides), tuple(map(tuple, padding)))(x, w, dy)


@functools.cache
def _bounds_fn(strides: tuple, padding: tuple):
  import jax
  from jax import lax

  conv = lambda x, w: lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )

  def bounds(x, w, dy):
    y, vjp = jax.vjp(conv, x, w)
    _, abs_vjp = jax.vjp(conv, abs(x), abs(w))
    terms = (
      w.shape[0] * w.shape[1] * w.shape[2],
      w.shape[0] * w.shape[1] * w.shape[3],
      x.shape[0] * y.shape[1] * y.shape[2],
    )
    sums = (conv(abs(x), abs(w)), *abs_vjp(abs(dy)))
    return (y, *vjp(dy)), tuple(2 * k * EPS * a + 1e-30 for k, a in zip(terms, sums, strict=True))

  return jax.jit(bounds)


def compare(shape: onednn.Shape) -> None:
  """Runs each direction of `shape` with oneDNN on a thread of its own (the primitives
  created on this one, if they are new) and raises where a result is off XLA's by more
  than float32 rounding."""
  conv = onednn.convolution(shape)
  rng = np.random.default_rng(0)
  x, w, dy = (
    rng.standard_normal(s, np.float32) for s in (shape.x_shape, shape.w_shape, shape.y_shape)
  )
  want, bounds = rounding_bounds(x, w, dy, shape.strides, shape.padding)
  inputs = {'forward': (x, w), 'input_grad': (dy, w), 'weight_grad': (x, dy)}
  got = {d: np.full(np.shape(ref), np.nan, np.float32) for d, ref in zip(inputs, want, strict=True)}

  def run_all():
    for direction, (a, b) in inputs.items():
      conv.run(direction, a.ctypes.data, b.ctypes.data, got[direction].ctypes.data)

  thread = threading.Thread(target=run_all)
  thread.start()
  thread.join()
  for (direction, result), ref, bound in zip(got.items(), want, bounds, strict=True):
    excess = float(np.max(np.abs(result - np.asarray(ref)) / np.asarray(bound)))
    if not excess <= 1.0:  # NaN included: a direction that wrote nothing
      raise onednn.OneDnnError(
        f"{direction} of {shape} is {excess:.3g}x the rounding bound off XLA's "
        f'({onednn.implementations(shape)[direction]})'
      )


def check() -> None:
  """Every direction of every shape in SHAPES, each convolution created on this thread
  and run on another."""
  for shape in SHAPES:
    compare(shape)
