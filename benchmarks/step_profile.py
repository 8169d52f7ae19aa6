"""Where the train step's device time goes: a profiler trace summed per XLA op and kind.

    python -m benchmarks.step_profile --model resnet50 --batch 256 --dtype bf16 --steps 5

Builds the step exactly as train_throughput.py does (same flags, `--model_override` too),
warms it up, traces `--steps` steps with `jax.profiler.trace` and reads the trace back
with `jax.profiler.ProfileData`: every device event that names its HLO op is summed per
op and per kind of op (convolutions, reductions, elementwise fusions, ...). Prints the
top ops as a table and one `RESULT {json}` line with ms per step per kind. On a GPU the
events are its kernels; on CPU, XLA's thunks. `--keep_trace DIR` keeps the raw trace
(open it in TensorBoard's profile plugin or xprof).
"""

import argparse
import collections
import contextlib
import glob
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from benchmarks import train_throughput as tt
from resnet_jax.errors import UserError

# The kind of an HLO op by its name; first match wins. cuDNN convolutions are custom calls
# named after their target; XLA's fusions are named after their root and fusion kind.
KINDS: tuple[tuple[str, str], ...] = (
  ('convolution', r'cudnn|convolution'),
  ('gemm', r'gemm|dot|cublas'),
  ('max pool', r'select-and-scatter|reduce.window|scatter'),
  ('reduction fusion', r'reduce|reduction'),
  ('elementwise fusion', r'fusion'),
  ('copy/transpose', r'copy|transpose'),
)


def op_kind(hlo_op: str) -> str:
  """The KINDS entry `hlo_op` falls under, or 'other'."""
  for kind, pattern in KINDS:
    if re.search(pattern, hlo_op):
      return kind
  return 'other'


def device_events(path: str) -> Iterator[tuple[str, float]]:
  """(HLO op, duration ns) of every event in the trace at `path` that names its op.

  Device planes (GPU streams) when the trace has them, else the host's XLA thunks (CPU).
  """
  profile = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in profile.planes if p.name.startswith('/device:')]
  planes = planes or [p for p in profile.planes if p.name == '/host:CPU']
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        hlo_op = next((value for name, value in event.stats if name == 'hlo_op'), None)
        if hlo_op:
          yield str(hlo_op), event.duration_ns


def summarize(events: Iterator[tuple[str, float]], steps: int, top: int) -> dict[str, Any]:
  """Milliseconds per step per kind and for the `top` ops (numbered ops merged by name)."""
  per_op: collections.Counter = collections.Counter()
  for hlo_op, ns in events:
    per_op[re.sub(r'\.\d+$', '', hlo_op)] += ns / 1e6 / steps
  per_kind: collections.Counter = collections.Counter()
  for op, ms in per_op.items():
    per_kind[op_kind(op)] += ms
  total = sum(per_op.values())
  if not total:
    raise UserError('the trace holds no device events with an HLO op; is the profiler working?')
  return {
    'device_ms_per_step': round(total, 3),
    'kinds': {k: round(ms, 3) for k, ms in per_kind.most_common()},
    'top_ops': [(op, round(ms, 3)) for op, ms in per_op.most_common(top)],
  }


def profile(args: argparse.Namespace) -> dict[str, Any]:
  """Trace `args.steps` warm steps of the harness's step; the summary row."""
  run = tt.prepare(args)
  state, batch = run.state, run.batches[0]
  for _ in range(1 + args.warmup):
    state, _ = run.step_fn(state, batch)
  jax.block_until_ready(state)
  # Without --keep_trace the trace lives in a temporary directory, removed once read.
  trace_dir_context = (
    contextlib.nullcontext(args.keep_trace)
    if args.keep_trace
    else tempfile.TemporaryDirectory(prefix='step_profile_')
  )
  with trace_dir_context as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, _ = run.step_fn(state, batch)
      jax.block_until_ready(state)
    paths = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))
    if not paths:
      raise UserError(f'jax.profiler wrote no .xplane.pb under {trace_dir}.')
    row = summarize(device_events(paths[-1]), args.steps, args.top)
  device = run.mesh.devices.flat[0]
  return {
    'who': 'step_profile',
    'label': args.label,
    'model': args.model,
    'batch': args.batch,
    'image_size': args.image_size,
    'dtype': run.dtype,
    'model_overrides': args.model_overrides,
    'steps': args.steps,
    **row,
    'device_kind': device.device_kind,
    'jax': jax.__version__,
    'trace': paths[-1] if args.keep_trace else None,
  }


def table(row: dict[str, Any]) -> str:
  """The row as text: kinds, then the top ops, in ms per step and % of device time."""
  total = row['device_ms_per_step']
  lines = [f'{row["model"]} batch {row["batch"]} {row["dtype"]}: {total:.2f} ms device time/step']
  for name, ms in list(row['kinds'].items()) + [('---', None)] + row['top_ops']:
    lines.append('-' * 40 if ms is None else f'{ms:9.3f} ms {100 * ms / total:5.1f}%  {name}')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: the table, then the RESULT line."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument('--top', type=int, default=25, help='ops to list')
  p.add_argument('--keep_trace', default='', help='write the trace here and keep it')
  own, rest = p.parse_known_args(argv)
  args = tt.parse_args(rest)
  args.top, args.keep_trace = own.top, own.keep_trace
  tt.configure_process(args)
  return tt.report(lambda: profile(args), show=table)


if __name__ == '__main__':
  sys.exit(main())
