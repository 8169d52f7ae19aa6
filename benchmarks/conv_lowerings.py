"""Times every lowering of every convolution of the given models, per direction, and
writes the table that `conv_impl=auto` reads (resnet_jax/models/ops/cpu_conv_table.json).

    python -m benchmarks.conv_lowerings --models cifar_resnet20,mnist_resnet34,resnet18 \
        --batch 128 --write resnet_jax/models/ops/cpu_conv_table.json

For each distinct convolution (input shape without the batch, kernel, strides, padding,
dtype) and each direction (forward, input gradient, weight gradient) every formulation of
resnet_jax.models.ops.conv_lowering is compiled alone and timed in alternating windows
(the machine is shared: the candidates see the same noise); the median per call wins,
XLA's convolution unless another is at least `--margin` faster; where oneDNN loads, a
second choice (`choices_with_onednn`) takes oneDNN where it is `--margin` faster than that.
Prints one `RESULT` row per convolution and direction with every candidate's ms. `--write`
merges the choices into the table (other shapes' entries stay).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from benchmarks.bn_stats import layer_calls
from resnet_jax import models
from resnet_jax.models.ops import conv_lowering as cl

DIRECTIONS = {
  'forward': (cl.FORWARD, lambda f, g: lambda x, w, dy: f(x, w, g)),
  'input_grad': (cl.INPUT_GRAD, lambda f, g: lambda x, w, dy: f(dy, w, g)),
  'weight_grad': (cl.WEIGHT_GRAD, lambda f, g: lambda x, w, dy: f(x, dy, g)),
}


def model_geometries(name: str, batch: int, dtype: str, imagenet_size: int) -> list[cl.Geometry]:
  """The distinct convolutions of `name`'s training forward pass at `batch`, in order
  (ImageNet-stem nets at `imagenet_size`)."""
  image, channels = models.default_input(name)
  image = imagenet_size if image == 224 else image
  model = models.build_model(name, dtype=dtype, conv_impl='xla')
  found = []
  for module, shape in layer_calls(model, (image, image, channels)):
    if not isinstance(module, nn.Conv):
      continue
    kernel = (*module.kernel_size, shape[-1], module.features)
    strides = module.strides if isinstance(module.strides, Sequence) else (module.strides,) * 2
    geometry = cl.Geometry((batch, *shape[1:]), kernel, tuple(strides), tuple(module.padding))
    if geometry not in found:
      found.append(geometry)
  return found


def time_candidates(
  fns: dict[str, Callable], args: Sequence[jax.Array], windows: int, reps: int
) -> dict[str, float]:
  """Median ms per call of each compiled fn, over `windows` alternating windows."""
  compiled = {k: jax.jit(f).lower(*args).compile() for k, f in fns.items()}
  for f in compiled.values():
    jax.block_until_ready(f(*args))
  samples = {k: [] for k in compiled}
  for _ in range(windows):
    for k, f in compiled.items():
      start = time.perf_counter()
      for _ in range(reps):
        out = f(*args)
      jax.block_until_ready(out)
      samples[k].append((time.perf_counter() - start) * 1e3 / reps)
  return {k: statistics.median(v) for k, v in samples.items()}


def measure(g: cl.Geometry, dtype: str, windows: int, reps: int, margin: float) -> list[dict]:
  """One row per direction: every candidate's ms and the choice."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], g.x_shape, dtype)
  w = jax.random.normal(keys[1], g.w_shape, dtype)
  dy = jax.random.normal(keys[2], (g.x_shape[0], *g.out_hw, g.w_shape[3]), dtype)
  rows = []
  for direction, (table, bind) in DIRECTIONS.items():
    fns = {
      name: bind(f, g)
      for name, f in table.items()
      if name != 'onednn' or cl.onednn_takes(g, jax.numpy.dtype(dtype))
    }
    ms = time_candidates(fns, (x, w, dy), windows, reps)
    # Two choices: among XLA's formulations (what `auto` uses where oneDNN does not load,
    # or the program spans several devices), and that or oneDNN.
    best = min((k for k in ms if k != 'onednn'), key=ms.get)
    choice = best if ms[best] < (1 - margin) * ms['xla'] else 'xla'
    with_onednn = choice
    if 'onednn' in ms and ms['onednn'] < (1 - margin) * ms[choice]:
      with_onednn = 'onednn'
    rows.append(
      {
        'conv': g.key(dtype),
        'batch': g.x_shape[0],
        'direction': direction,
        'ms': {k: round(v, 3) for k, v in ms.items()},
        'choice': choice,
        'speedup_vs_xla': round(ms['xla'] / ms[choice], 3),
        'choice_with_onednn': with_onednn,
      }
    )
  return rows


def write_table(path: str, rows: list[dict], args: argparse.Namespace) -> None:
  """Merge `rows`' choices into the table at `path`; a missing table, or one measured on
  another CPU model (its timings do not carry over), is replaced."""
  try:
    with open(path) as f:
      table = json.load(f)
  except FileNotFoundError:
    table = {'choices': {}, 'measured': {}}
  if table['measured'].get('cpu') not in (None, cl.cpu_model()):
    table = {'choices': {}, 'measured': {}}  # and no choices_with_onednn
  for row in rows:
    table['choices'].setdefault(row['conv'], {})[row['direction']] = row['choice']
    if 'onednn' in row['ms']:
      with_onednn = table.setdefault('choices_with_onednn', {})
      with_onednn.setdefault(row['conv'], {})[row['direction']] = row['choice_with_onednn']
  table['measured'] = {
    'by': 'python -m benchmarks.conv_lowerings',
    'models': args.models,
    'batch': args.batch,
    'cpu': cl.cpu_model(),
    'jax': jax.__version__,
    'note': (
      f'batch {args.batch}, {args.dtype}, {args.windows} alternating windows of {args.reps} '
      f"calls, medians; a formulation other than XLA's only when {args.margin:.0%} faster"
    ),
  }
  for section in ('choices', 'choices_with_onednn'):
    if section in table:
      table[section] = dict(sorted(table[section].items()))
  with open(path, 'w') as f:
    json.dump(table, f, indent=1)
    f.write('\n')


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='cifar_resnet20,mnist_resnet34,resnet18')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--imagenet_size', type=int, default=64, help='image size of resnet*/plain*')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--margin', type=float, default=0.05, help='a non-XLA win must be this much')
  p.add_argument('--write', default='', help='merge the choices into this table file')
  args = p.parse_args(argv)
  geometries: list[cl.Geometry] = []
  for name in args.models.split(','):
    geometries += [
      g
      for g in model_geometries(name, args.batch, args.dtype, args.imagenet_size)
      if g not in geometries
    ]
  rows = []
  for g in geometries:
    for row in measure(g, args.dtype, args.windows, args.reps, args.margin):
      print('RESULT', json.dumps(row), flush=True)
      rows.append(row)
  if args.write:
    write_table(args.write, rows, args)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
