"""Throughput of stacked training: one program with K members against one run (K=1).

    python -m benchmarks.stack_throughput --models cifar_resnet20,cifar_resnet56 \\
        --members 1,2,4,8,16 --methods auto [--batch 128] [--steps 10] \\
        [--model_override shortcut=B]

For each model and K, times the stacked train step (resnet_jax.training.stack) of K members, each
with its own seed and a batch of `--batch` images, on synthetic batches that live on the
devices; K=1 is the single run's own step. Prints one `RESULT {json}` line per row as
it finishes (so a run that times out keeps the rows it has), then a table: ms per step,
images/s over all members, and the speedup over K=1 (total images/s / K=1's). Methods:
'vmap' (one batched program, grouped convolutions), 'unroll' (the step written out per
member), 'auto' (what training uses on this platform). Imports no tensorflow and no
ml_collections, so it runs on the bare GPU machines.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks import train_throughput as tt
from resnet_jax import sharding
from resnet_jax.data import on_device
from resnet_jax.errors import UserError
from resnet_jax.training import optim, stack
from resnet_jax.training import step as ts


def measure(model_name: str, k: int, method: str, args: argparse.Namespace) -> dict[str, Any]:
  """One row: the step of a K-member stack (K=1: the single run's step), timed."""
  mesh = sharding.make_mesh()
  overrides = {'zero_init_last_bn': False, **args.model_overrides}
  model = tt.build_model(model_name, tt.DTYPES[args.dtype], overrides)
  shape = (32, 32, 3)
  config = tt.optimizer_config(args.batch)
  config.nesterov, config.weight_decay_on_norm_and_bias = False, True  # the CIFAR recipe
  total = 1 + args.warmup + args.windows * args.steps
  tx, schedule = optim.create_optimizer(config, total, total)
  seeds = tuple(range(k))
  t0 = time.perf_counter()
  if k == 1 and method == 'single':
    step_fn = ts.make_train_step(model, tx, mesh, 0.0, False, schedule)
    state = ts.create_train_state(model, tx, shape, 0, mesh)
  else:
    members = [stack.Member(s, True, 1.0, f'seed{s}') for s in seeds]
    method = stack.resolve_method(method, mesh)
    step_fn = stack.make_train_step(model, tx, mesh, members, 0.0, False, schedule, method)
    state = stack.create_state(model, tx, shape, members, mesh)
  batches = on_device.synthetic_train_batches(
    shape, model.num_classes, args.batch, mesh, seeds, stacked=method != 'single'
  )
  batches = list(itertools.islice(batches, 2))
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = step_fn(state, batches[i % 2])
  windows = []
  for _ in range(args.windows):
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(args.steps):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(state)
    windows.append((time.perf_counter() - start) / args.steps)
  step_s = statistics.median(windows)
  return {
    'model': model_name,
    'model_overrides': args.model_overrides,
    'members': k,
    'method': method,
    'batch_per_member': args.batch,
    'dtype': tt.DTYPES[args.dtype],
    'step_ms': round(step_s * 1e3, 2),
    'img_per_s': round(k * args.batch / step_s, 1),
    'compile_s': round(compile_s, 1),
    'final_loss': float(jax.device_get(metrics['loss']).mean()),
    'device': jax.devices()[0].device_kind,
    'num_devices': jax.device_count(),
    'jax': jax.__version__,
  }


def table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: each row with its speedup over the same model's K=1 row."""
  base = {r['model']: r['img_per_s'] for r in rows if r['method'] == 'single'}
  lines = [
    '| model | K | method | ms/step | img/s (all members) | speedup over K=1 | compile s |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    speedup = r['img_per_s'] / base[r['model']] if r['model'] in base else float('nan')
    lines.append(
      f'| {r["model"]} | {r["members"]} | {r["method"]} | {r["step_ms"]:.1f} | '
      f'{r["img_per_s"]:.0f} | {speedup:.2f} | {r["compile_s"]:.0f} |'
    )
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='cifar_resnet20,cifar_resnet56,cifar_resnet110')
  p.add_argument('--members', default='1,2,4,8,16', help='K values; K=1 also times the single run')
  p.add_argument('--methods', default='auto', help='comma list of auto, vmap, unroll')
  p.add_argument('--batch', type=int, default=128, help='images per member per step')
  p.add_argument('--dtype', choices=sorted(tt.DTYPES), default='fp32')
  p.add_argument('--steps', type=int, default=10, help='steps per timed window')
  p.add_argument('--windows', type=int, default=3, help='timed windows; the median is reported')
  p.add_argument(
    '--warmup', type=int, default=tt.WARMUP_STEPS, help='untimed steps after the first'
  )
  p.add_argument(
    '--model_override',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='a models.ResNet field of every model, e.g. shortcut=B (repeatable)',
  )
  p.add_argument('--compilation_cache_dir', default='', help="XLA's persistent cache ('' off)")
  args = p.parse_args(argv)
  try:
    args.model_overrides = tt.parse_overrides(args.model_override)
  except UserError as e:
    p.error(str(e))
  args.models = args.models.split(',')
  args.members = [int(k) for k in args.members.split(',')]
  args.methods = args.methods.split(',')
  if min(args.members) < 1 or min(args.steps, args.windows) < 1:
    p.error('--members, --steps and --windows must be >= 1')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  tt.enable_compilation_cache(args.compilation_cache_dir)
  rows = []
  for model in args.models:
    plan = [(1, 'single')] + [(k, m) for k in args.members for m in args.methods]
    for k, method in plan:
      row = measure(model, k, method, args)
      rows.append(row)
      print('RESULT ' + json.dumps(row), flush=True)
  print(table(rows), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
