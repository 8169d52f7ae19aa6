"""Training throughput of the real train step on synthetic batches that live on the devices.

    python -m benchmarks.train_throughput --model resnet50 --batch 256 --dtype bf16 --steps 20

Runs the training loop's own step (`make_train_step` over `create_optimizer`'s SGD with
Nesterov momentum and weight decay) on a global batch sharded over every device of the
mesh, the input state donated. Prints one line `RESULT {json}`: images/s and step time
(median of `--windows` timed windows of `--steps` steps after warm-up), compile time and
whether it came from the persistent compilation cache, XLA's FLOPs and the model's with
the TFLOP/s and MFU they give, device memory, the loss before and after, and versions.
On GPUs XLA's FLOPs leave out cuDNN's convolutions (custom calls); use the model's.
Imports no tensorflow, and no ml_collections where that is missing (the GPU machines).
"""

import argparse
import ast
import itertools
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax

from resnet_jax import models, sharding
from resnet_jax.data import on_device
from resnet_jax.errors import UserError
from resnet_jax.models import summary
from resnet_jax.models.ops.cpu_info import cpu_model
from resnet_jax.training import optim
from resnet_jax.training import step as ts

# Untimed steps after the first, by default. On a CPU the heap grows over the first steps
# until its freed blocks can hold a step's temporaries (resnet_jax.host_memory): up to the
# 8th step for cifar_resnet56 at batch 128, each such step faulting in an 830 MB block
# (0.5-1.3 s more than the 0.65 s step on 2 cores). Timing earlier measures that transient.
WARMUP_STEPS = 10

DTYPES = {'bf16': 'bfloat16', 'bfloat16': 'bfloat16', 'fp32': 'float32', 'float32': 'float32'}

# Dense datasheet peaks per device in TFLOP/s, (bfloat16, float32), first match of the
# device kind wins. The float32 column is the TF32 tensor-core rate: at jax's default
# precision XLA runs float32 convolutions and matmuls in TF32 on these GPUs.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
  ('H100 PCIe', 756.0, 378.0),
  ('H100 NVL', 835.5, 417.5),
  ('H100', 989.4, 494.7),
  ('H200 NVL', 835.5, 417.5),
  ('H200', 989.4, 494.7),
  ('A100', 312.0, 156.0),
)

# The optimizer fields of configs/default.py, for machines without ml_collections;
# tests/test_benchmarks.py keeps the two equal.
DEFAULT_RECIPE: dict[str, Any] = {
  'batch_size': 1024,
  'learning_rate': 0.1,
  'lr_schedule': 'cosine',
  'lr_boundaries': (),
  'lr_boundaries_epochs': (),
  'lr_decay': 0.1,
  'warmup_epochs': 5.0,
  'warmup_steps': -1,
  'warmup': 'linear',
  'warmup_factor': 0.1,
  'optimizer': 'sgd',
  'momentum': 0.9,
  'nesterov': True,
  'weight_decay': 1e-4,
  'weight_decay_on_norm_and_bias': False,
  'label_smoothing': 0.0,
  'on_nonfinite_loss': 'stop',
}

CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def optimizer_config(batch: int, optimizer: str = 'sgd') -> Any:
  """The default recipe's optimizer for a global `batch`, at its constant peak rate.

  A constant rate (no warmup) makes the loss of the fixed synthetic batch fall within the
  timed steps, a correctness check for free; the schedule is one scalar per step, so the
  step costs what it costs in training.
  """
  try:
    from configs import default

    config = default.get_config()
  except ModuleNotFoundError as e:  # no ml_collections on the GPU machines (REFERENCE.md s. 5)
    if e.name != 'ml_collections':
      raise
    config = types.SimpleNamespace(**DEFAULT_RECIPE)
  config.batch_size = batch
  config.optimizer = optimizer
  config.lr_schedule = 'constant'
  config.warmup_steps = 0
  return config


def build_model(name: str, dtype: str, overrides: dict[str, Any] | None = None) -> models.ResNet:
  """`name` in `dtype`, initialised as the ImageNet recipe does (configs/default.py)."""
  # Zero-init of each residual branch's last BN; it changes the start, not the cost.
  kwargs = {'zero_init_last_bn': name.startswith('resnet'), **(overrides or {})}
  return models.build_model(name, dtype=dtype, **kwargs)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """`FIELD=VALUE` strings as model overrides; values are Python literals or strings."""
  overrides = {}
  for item in items:
    field, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'model override {item!r} is not FIELD=VALUE, e.g. shortcut=A.')
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value
  return overrides


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The datasheet's dense peak of one device for `dtype`, or None when unknown."""
  for kind, bf16, fp32 in PEAK_TFLOPS:
    if kind in device_kind:
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def model_train_flops(model: models.ResNet, shape: tuple[int, int, int]) -> float:
  """Training FLOPs per image as usually quoted: 3x the forward's 2 x MACs (convs + head)."""
  return 6.0 * sum(row.macs for row in summary.summarize(model, shape))


def enable_compilation_cache(path: str) -> str | None:
  """XLA's persistent compilation cache in `path`, as main.py sets it ('' disables)."""
  if not path:
    return None
  path = os.path.expanduser(path)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return path


def prepare(args: argparse.Namespace) -> types.SimpleNamespace:
  """The mesh, model, jitted train step, initial state and resident batches `args` ask for."""
  dtype = DTYPES[args.dtype]
  mesh = sharding.make_mesh()
  sharding.check_batch_divisible(args.batch, mesh, 'batch')
  model = build_model(args.model, dtype, args.model_overrides)
  shape = (args.image_size, args.image_size, args.channels)
  config = optimizer_config(args.batch, args.optimizer)
  total_steps = 1 + args.warmup + args.windows * args.steps
  tx, schedule = optim.create_optimizer(config, total_steps, total_steps)
  step_fn = ts.make_train_step(
    model, tx, mesh, config.label_smoothing, config.on_nonfinite_loss == 'skip', schedule
  )
  state = ts.create_train_state(model, tx, shape, args.seed, mesh)
  batches = list(
    itertools.islice(
      on_device.synthetic_train_batches(shape, model.num_classes, args.batch, mesh, (args.seed,)),
      args.num_batches,
    )
  )
  jax.block_until_ready((state, batches))
  return types.SimpleNamespace(
    dtype=dtype, mesh=mesh, model=model, shape=shape, step_fn=step_fn, state=state, batches=batches
  )


def measure(args: argparse.Namespace) -> dict[str, Any]:
  """Compile, warm up and time the train step as `args` say; one result row."""
  t_start = time.perf_counter()
  run = prepare(args)
  step_fn, state, batches = run.step_fn, run.state, run.batches
  devices = list(run.mesh.devices.flat)

  cache_hits = []
  listener = lambda event, **_: cache_hits.append(event) if event == CACHE_HIT_EVENT else None
  jax.monitoring.register_event_listener(listener)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    # The jitted step reuses the executable just compiled: the training loop's call path.
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    loss_first = float(metrics['loss'])
    first_step_s = time.perf_counter() - t0
  jax.monitoring.unregister_event_listener(listener)
  time_to_first_step_s = time.perf_counter() - t_start
  startup_s = _process_age_s()

  for i in range(args.warmup):
    state, metrics = step_fn(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  windows = []
  for _ in range(args.windows):
    # No host sync inside a window: steps queue up and the device runs them back to back.
    t0 = time.perf_counter()
    for i in range(args.steps):
      state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    windows.append(time.perf_counter() - t0)

  step_s = statistics.median(windows) / args.steps
  xla_flops = _xla_flops(compiled, len(devices))
  model_flops = model_train_flops(run.model, run.shape) * args.batch
  peak = peak_tflops(devices[0].device_kind, run.dtype)
  return {
    'who': 'resnet_jax',
    'label': args.label,
    'model': args.model,
    'batch': args.batch,
    'per_device_batch': args.batch // len(devices),
    'image_size': args.image_size,
    'dtype': run.dtype,
    'optimizer': args.optimizer,
    'model_overrides': args.model_overrides,
    'steps': args.steps,
    'windows': args.windows,
    'img_per_s': round(args.batch / step_s, 1),
    'img_per_s_windows': [round(args.batch * args.steps / w, 1) for w in windows],
    'step_ms': round(1000 * step_s, 3),
    'compile_s': round(compile_s, 3),
    'cache_hit': bool(cache_hits),
    'first_step_s': round(first_step_s, 3),
    'time_to_first_step_s': round(time_to_first_step_s, 3),
    'startup_s': None if startup_s is None else round(startup_s, 2),
    'xla_flops_per_step': xla_flops,
    'model_flops_per_step': model_flops,
    'tflops_per_s': _div(xla_flops, step_s * 1e12, 4),
    'model_tflops_per_s': _div(model_flops, step_s * 1e12, 4),
    'peak_tflops_per_device': peak,
    'mfu': _div(xla_flops, step_s * 1e12 * peak * len(devices), 4) if peak else None,
    'model_mfu': _div(model_flops, step_s * 1e12 * peak * len(devices), 4) if peak else None,
    'peak_bytes_in_use': _peak_bytes(devices),
    'program_bytes': _program_bytes(compiled),
    'donation_ok': not any('donated' in str(w.message) for w in caught),
    'loss_first': loss_first,
    'loss_last': float(metrics['loss']),
    'finite': bool(metrics['finite']),
    'device_kind': devices[0].device_kind,
    'platform': devices[0].platform,
    'device_count': len(devices),
    'jax': jax.__version__,
    'jaxlib': _jaxlib_version(),
    'flax': flax.__version__,
    'python': platform.python_version(),
    'host_cpu': cpu_model(),
    'host_cores': os.cpu_count(),
    'host_load_1m': round(os.getloadavg()[0], 2),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'extra_xla_flags': args.xla_flags,
    'compilation_cache_dir': args.cache_path,
  }


def _xla_flops(compiled: jax.stages.Compiled, num_devices: int) -> float | None:
  """FLOPs of one step over all devices by XLA's cost analysis; None if it gives none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older jax versions
    cost = cost[0] if cost else None
  # The analysis is of one device's partition of the program.
  return cost['flops'] * num_devices if cost and cost.get('flops') else None


def _program_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Device memory one step needs by XLA's buffer assignment (per device, state included)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )


def _div(num: float | None, den: float, digits: int) -> float | None:
  return None if num is None else round(num / den, digits)


def _peak_bytes(devices: Sequence[jax.Device]) -> int | None:
  """The allocator's high-water mark, largest over devices; None where not reported (CPU)."""
  stats = [d.memory_stats() for d in devices]
  if any(s is None or 'peak_bytes_in_use' not in s for s in stats):
    return None
  return max(s['peak_bytes_in_use'] for s in stats)


def _process_age_s() -> float | None:
  """Seconds since this process started (Linux), so start-up includes the imports."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None
  return uptime - start_ticks / os.sysconf('SC_CLK_TCK')


def _jaxlib_version() -> str:
  import jaxlib

  return jaxlib.__version__


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line arguments, with the image size and channels filled in per model."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50', help='a name from models.ARCHITECTURES')
  p.add_argument('--batch', type=int, default=256, help='global batch, over all devices')
  p.add_argument(
    '--image_size',
    type=int,
    default=None,
    help='height and width (default: 224, 32 for cifar_*, 28 for mnist_*)',
  )
  p.add_argument('--channels', type=int, default=None, help='default 3 (1 for mnist_*)')
  p.add_argument('--dtype', choices=sorted(DTYPES), default='bf16', help='compute dtype')
  p.add_argument('--steps', type=int, default=20, help='steps per timed window')
  p.add_argument('--windows', type=int, default=5, help='timed windows; the median is reported')
  p.add_argument('--warmup', type=int, default=WARMUP_STEPS, help='untimed steps after the first')
  p.add_argument(
    '--num_batches',
    type=int,
    default=1,
    help='distinct resident batches, cycled (1, like torch_reference.py)',
  )
  p.add_argument('--optimizer', choices=optim.OPTIMIZERS, default='sgd')
  p.add_argument(
    '--model_override',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='a models.ResNet field, e.g. shortcut=A (repeatable)',
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument(
    '--compilation_cache_dir',
    default='~/.cache/resnet_jax/xla',
    help="XLA's persistent compilation cache ('' disables)",
  )
  p.add_argument('--xla_flags', default='', help='appended to $XLA_FLAGS for this run only')
  p.add_argument('--label', default='', help='copied into the result row')
  args = p.parse_args(argv)
  default_size, default_channels = models.default_input(args.model)
  args.image_size = args.image_size or default_size
  args.channels = args.channels or default_channels
  if min(args.steps, args.windows, args.num_batches) < 1 or args.warmup < 0:
    p.error('--steps, --windows and --num_batches must be >= 1, --warmup >= 0')
  try:
    args.model_overrides = parse_overrides(args.model_override)
  except UserError as e:
    p.error(str(e))
  return args


def configure_process(args: argparse.Namespace) -> None:
  """`args.xla_flags` into $XLA_FLAGS and the compilation cache on, before jax starts."""
  if args.xla_flags:
    # XLA reads the flags when the backend starts, at the first device query.
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {args.xla_flags}'.strip()
  args.cache_path = enable_compilation_cache(args.compilation_cache_dir)


def report(measure_row: Callable[[], dict[str, Any]], show: Callable | None = None) -> int:
  """Print `measure_row()` as a RESULT line (after `show(row)`, if given) and return 0, or
  a UserError it raises as one `error:` line and return 2."""
  try:
    row = measure_row()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if show:
    print(show(row))
  print('RESULT ' + json.dumps(row), flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; prints the RESULT line and returns the exit code."""
  args = parse_args(argv)
  configure_process(args)
  return report(lambda: measure(args))


if __name__ == '__main__':
  sys.exit(main())
