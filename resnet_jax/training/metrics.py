"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, the console.

Only process 0 writes; the others get a writer that does nothing, so the loop never
asks which process it is on. Event files are written with TensorBoard's own records and
protos (no tensorflow needed); where tensorboard is not installed (the bare accelerator
machines), metrics.jsonl alone is written and a warning says so.
"""

import itertools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from resnet_jax.errors import UserError

try:
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter
except ImportError:
  RecordWriter = None

log = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'
DROPPED_FILE = 'metrics.dropped.jsonl'  # rows a resume took out of metrics.jsonl


def _parse_rows(path: str) -> tuple[list[dict[str, Any]], bool]:
  """(rows, whole): the file's rows; whole is False if its last line was cut short.

  A kill in the middle of a write leaves a partial last line; that line is left out. A
  bad line anywhere else is not something a kill does, so it is an error.
  """
  with open(path) as f:
    text = f.read()
  lines = text.splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError as e:
      if i == len(lines) - 1 and not text.endswith('\n'):
        return rows, False
      raise UserError(
        f'{path} line {i + 1} is not JSON ({e}); repair or remove that line, then rerun.'
      ) from e
  return rows, True


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete rows of WORKDIR/metrics.jsonl (empty if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  return _parse_rows(path)[0] if os.path.exists(path) else []


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Make metrics.jsonl end at `last_step`, atomically, before a resumed run appends to it.

  A run resumed from a checkpoint at `last_step` logs the later steps again (with the
  same values, as training is deterministic); keeping the first copies would duplicate
  them. The rows taken out are appended to metrics.dropped.jsonl, so nothing is lost; a
  partial last line (a kill mid-write) is dropped so the next row starts on its own line.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  rows, whole = _parse_rows(path)
  kept = [r for r in rows if r['step'] <= last_step]
  if len(kept) == len(rows) and whole:
    return
  with open(os.path.join(workdir, DROPPED_FILE), 'a') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows if r['step'] > last_step)
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)


_event_files = itertools.count()  # tells apart two files a process opens in one second


class EventFile:
  """A TensorBoard event file: Event protos in TFRecord frames, the file version first.

  What TensorBoard's EventFileWriter writes, through a plain file: that writer opens its
  file with `tensorboard.compat.tf`, which imports all of tensorflow where it is installed
  (3.6 s of a 20 s smoke run, for runs whose data need none). Every event is flushed, so a
  kill loses none.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (
      f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
      f'.{next(_event_files)}'
    )
    # 'x': a new file, never an existing one truncated.
    self._records = RecordWriter(open(os.path.join(logdir, name), 'xb'))  # noqa: SIM115
    self.add(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add(self, event: 'event_pb2.Event') -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  """Appends metric rows to metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')  # noqa: SIM115
      self._events = None
      if RecordWriter is None:
        log.warning('tensorboard is not installed: %s gets metrics.jsonl only', workdir)
      else:
        self._events = EventFile(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """One row: floats at full precision, flushed so a kill loses nothing written."""
    if not self._enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    if self._events is None:
      return
    values = [
      summary_pb2.Summary.Value(tag=k, simple_value=v)
      for k, v in row.items()
      if k != 'step' and isinstance(v, float)
    ]
    self._events.add(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      if self._events is not None:
        self._events.close()


class Console:
  """The run's lines on stderr: logged metrics, and a live progress line in between.

  The live line (step, img/s, ETA) is redrawn in place every `tty_interval` seconds on a
  terminal and written as a plain line every `plain_interval` seconds otherwise (logs of
  batch jobs). Images/s and the ETA come from the steps timed since `start_timing`
  (after the first step, which compiles), so no line shows an ETA before it is known.
  """

  def __init__(
    self,
    total_steps: int,
    batch_size: int,
    enabled: bool = True,
    stream: TextIO | None = None,
    tty_interval: float = 2.0,
    plain_interval: float = 30.0,
  ):
    self._total = total_steps
    self._batch = batch_size
    self._enabled = enabled
    self._stream = stream or sys.stderr
    self._tty = self._stream.isatty()
    self._interval = tty_interval if self._tty else plain_interval
    self._timed: tuple[float, int] | None = None
    self._last_draw = 0.0
    self._live = False

  def start_timing(self, step: int) -> None:
    """Steps after `step` (done now) count for images/s and the ETA."""
    self._timed = (time.perf_counter(), step)
    self._last_draw = time.perf_counter()

  def tick(self, step: int) -> None:
    """Called after each step: redraws the live line when its interval has passed."""
    now = time.perf_counter()
    if not self._enabled or self._timed is None or now - self._last_draw < self._interval:
      return
    if step <= self._timed[1]:
      return
    self._last_draw = now
    line = ' | '.join([f'step {step}/{self._total}', *self._rate(step, now)])
    if self._tty:
      self._stream.write(f'\r\033[K{line}')
      self._live = True
    else:
      self._stream.write(line + '\n')
    self._stream.flush()

  def line(self, step: int, metrics: Mapping[str, float | None], with_eta: bool = True) -> None:
    """A permanent line: step/total, the given metrics and (training) the time left."""
    if not self._enabled:
      return
    parts = [f'step {step}/{self._total}'] + [
      f'{k} {_format(v)}' for k, v in metrics.items() if v is not None
    ]
    if with_eta:
      parts += self._rate(step, time.perf_counter())
    self._clear_live()
    self._stream.write(' | '.join(parts) + '\n')
    self._stream.flush()

  def _rate(self, step: int, now: float) -> list[str]:
    """['img/s X', 'ETA Y'] from the timed steps; [] before two steps are done."""
    if self._timed is None or step <= self._timed[1] or now <= self._timed[0]:
      return []
    t0, s0 = self._timed
    per_step = (now - t0) / (step - s0)
    eta = _duration(per_step * (self._total - step))
    return [f'img/s {self._batch / per_step:.4g}', f'ETA {eta}']

  def _clear_live(self) -> None:
    if self._live:
      self._stream.write('\r\033[K')
      self._live = False

  def close(self) -> None:
    if self._enabled:
      self._clear_live()
      self._stream.flush()


def _format(v: float | int | str) -> str:
  """Counts as integers (10000, not 1e+04), other numbers to 4 significant digits."""
  if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
    return str(int(v))
  return f'{v:.4g}' if isinstance(v, float | int) else str(v)


def _plain(v: Any) -> Any:
  """JSON-friendly Python scalars from numpy/jax scalars."""
  if hasattr(v, 'item'):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def _duration(seconds: float) -> str:
  h, rest = divmod(int(seconds), 3600)
  return f'{h}h{rest // 60:02d}m' if h else f'{rest // 60}m{rest % 60:02d}s'


class _OwnLinesOnly(logging.Filter):
  """Console: our own log lines, other libraries' from ERROR, and none of orbax's.

  Orbax warns on every eval and logs each failed background save with tracebacks from
  several threads; resnet_jax.training.checkpoints reports those failures in one line itself.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name.startswith('resnet_jax'):
      return True
    return record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' not in record.pathname


def console_logging() -> None:
  """The console of main.py and the other command-line tools: our INFO lines, the
  libraries' errors (orbax's excepted), nothing else."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # the libraries: no INFO records at all
  absl_logging.get_absl_handler().addFilter(_OwnLinesOnly())
  logging.getLogger('resnet_jax').setLevel(logging.INFO)
