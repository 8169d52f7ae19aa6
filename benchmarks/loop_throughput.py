"""Images/s of the full training loop, to set beside train_throughput.py's for the same step.

    python -m benchmarks.loop_throughput --model resnet50 --batch 256 --dtype bf16 --steps 400

Runs `train.train_and_evaluate`, what `main.py` runs, in a fresh temporary workdir on the
synthetic dataset (batches made on the devices, as `train_throughput.py` has them): the
same train step, plus everything around it in the loop, i.e. a batch drawn per step,
metrics fetched and written (metrics.jsonl, TensorBoard, console) every `--log_every`
steps, async orbax checkpoints every `--checkpoint_every` steps and one eval at the end.
Prints `RESULT {json}` with the loop's own images/s of each logged window (the loop
leaves the compiling first step out) and their median without the first window, the
warm-up, as the harness leaves out its warm-up steps. Needs ml_collections (configs/).
"""

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks import train_throughput as tt
from configs import default
from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.training import metrics, train


def loop_config(args: argparse.Namespace) -> Any:
  """configs/default.py on synthetic data, sized and timed as `args` say."""
  c = default.imagenet(args.model)  # its zero-init of the last BN, as the harness
  for field, value in args.model_overrides.items():
    setattr(c.model_overrides, field, value)
  c.dataset = 'synthetic'
  c.image_size = args.image_size
  c.dtype = tt.DTYPES[args.dtype]
  c.batch_size = c.eval_batch_size = args.batch
  c.num_train_steps = args.steps
  c.warmup_steps = args.steps // 10
  c.log_every_steps = args.log_every
  c.eval_every_steps = args.steps  # one eval, at the end
  c.checkpoint_every_steps = args.checkpoint_every
  c.compilation_cache_dir = args.compilation_cache_dir
  return c


def measure(args: argparse.Namespace) -> dict[str, Any]:
  """Train for `args.steps` in a temporary workdir; one result row from its metrics."""
  config = loop_config(args)
  tt.enable_compilation_cache(config.compilation_cache_dir)
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rows = metrics.read_metrics(workdir)
  windows = [r['img_per_s'] for r in rows if 'img_per_s' in r]
  if len(windows) < 2:
    raise UserError('too few logged windows; make --steps at least 2x --log_every.')
  device = jax.devices()[0]
  return {
    'who': 'resnet_jax_loop',
    'label': args.label,
    'model': args.model,
    'batch': args.batch,
    'image_size': args.image_size,
    'dtype': config.dtype,
    'model_overrides': args.model_overrides,
    'steps': args.steps,
    'log_every': args.log_every,
    'checkpoint_every': args.checkpoint_every,
    'img_per_s': round(statistics.median(windows[1:]), 1),
    'img_per_s_windows': [round(w, 1) for w in windows],
    'eval_top1': next((r['eval_top1'] for r in reversed(rows) if 'eval_top1' in r), None),
    'train_loss_last': next(r['train_loss'] for r in reversed(rows) if 'train_loss' in r),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
  }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line arguments; the image size defaults per model (models.default_input)."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50')
  p.add_argument('--batch', type=int, default=256, help='global batch, over all devices')
  p.add_argument('--image_size', type=int, default=None)
  p.add_argument('--dtype', choices=sorted(tt.DTYPES), default='bf16')
  p.add_argument('--steps', type=int, default=400)
  p.add_argument('--log_every', type=int, default=100, help='one timed window per log')
  p.add_argument('--checkpoint_every', type=int, default=200)
  p.add_argument('--model_override', action='append', default=[], metavar='FIELD=VALUE')
  p.add_argument('--compilation_cache_dir', default='~/.cache/resnet_jax/xla')
  p.add_argument('--label', default='')
  args = p.parse_args(argv)
  args.image_size = args.image_size or models.default_input(args.model)[0]
  try:
    args.model_overrides = tt.parse_overrides(args.model_override)
  except UserError as e:
    p.error(str(e))
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; prints the RESULT line and returns the exit code."""
  return tt.report(lambda: measure(parse_args(argv)))


if __name__ == '__main__':
  sys.exit(main())
