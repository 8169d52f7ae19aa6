"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, the console.

Only process 0 writes; the others get a writer that does nothing, so the loop never
asks which process it is on. Event files are written with TensorBoard's own writer
(no tensorflow needed).
"""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All rows of WORKDIR/metrics.jsonl (empty if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drop rows logged after `last_step`, atomically.

  A run resumed from a checkpoint at `last_step` logs those steps again (with the same
  values, as training is deterministic); keeping the first copies would duplicate them.
  """
  rows = read_metrics(workdir)
  kept = [r for r in rows if r['step'] <= last_step]
  if len(kept) == len(rows):
    return
  path = os.path.join(workdir, METRICS_FILE)
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  os.replace(path + '.tmp', path)


class MetricWriter:
  """Appends metric rows to metrics.jsonl and TensorBoard; prints a progress line."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self._enabled = enabled
    self._total = total_steps
    self._start: tuple[float, int] | None = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')  # noqa: SIM115
      self._events = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """One row: floats at full precision, flushed so a kill loses nothing written."""
    if not self._enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    values = [
      summary_pb2.Summary.Value(tag=k, simple_value=v)
      for k, v in row.items()
      if k != 'step' and isinstance(v, float)
    ]
    self._events.add_event(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )
    self._events.flush()

  def progress(self, step: int, metrics: Mapping[str, float], with_eta: bool = True) -> None:
    """A console line: step/total, the given metrics and (training) the time left."""
    if not self._enabled:
      return
    now = time.time()
    if self._start is None:
      self._start = (now, step)
    t0, s0 = self._start
    parts = [f'step {step}/{self._total}'] + [
      f'{k} {v:.4g}' for k, v in metrics.items() if v is not None
    ]
    if with_eta:
      eta = (now - t0) / (step - s0) * (self._total - step) if step > s0 else math.nan
      parts.append(f'ETA {_duration(eta)}')
    print(' | '.join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._events.close()


def _plain(v: Any) -> Any:
  """JSON-friendly Python scalars from numpy/jax scalars."""
  if hasattr(v, 'item'):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  h, rest = divmod(int(seconds), 3600)
  return f'{h}h{rest // 60:02d}m' if h else f'{rest // 60}m{rest % 60:02d}s'
