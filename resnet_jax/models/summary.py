"""Shapes, parameters and multiply-accumulates of a named architecture.

    python -m resnet_jax.models.summary resnet50 [--image_size 224] [--num_classes 1000] [--json]
    python -m resnet_jax.models.summary --list

Prints one row per stem / block / head with its output shape, parameters and GMACs,
then the totals; `--json` prints one JSON object instead. MACs count the convolutions
and the dense layer, as the paper's FLOP figures do (BN, ReLU, pooling and adds are
memory-bound and left out). Nothing is computed: the model is only traced.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import models
from resnet_jax.errors import UserError


@dataclasses.dataclass
class Row:
  """One top-level part of the network."""

  name: str
  shape: tuple[int, ...]
  params: int
  macs: int


def _layer_macs(module: nn.Module, out: Any) -> int:
  """MACs of one forward pass of a Conv or Dense layer for a single example."""
  if isinstance(module, nn.Conv):
    out = out[0] if isinstance(out, tuple) else out  # a fused conv also returns statistics
    in_features = module.variables['params']['kernel'].shape[-2]  # already per group
    return math.prod(out.shape[1:-1]) * out.shape[-1] * math.prod(module.kernel_size) * in_features
  if isinstance(module, nn.Dense):
    return math.prod(module.variables['params']['kernel'].shape)
  return 0


def summarize(model: models.ResNet, input_shape: tuple[int, int, int]) -> list[Row]:
  """Rows for the stem, every block and the head of `model` on one `input_shape` image."""
  macs: dict[str, int] = {}
  shapes: dict[str, tuple[int, ...]] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name == '__call__' and path:
      macs[path[0]] = macs.get(path[0], 0) + _layer_macs(context.module, out)
      if len(path) == 1:
        shapes[path[0]] = tuple(out.shape[1:])
    return out

  def init(x):
    return model.init(jax.random.key(0), x, train=False, mutable=True)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  params = variables['params']
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  stem_parts = [k for k in params if k.startswith('stem')]
  rows = [
    Row(
      'stem',
      tuple(variables['intermediates']['stem'][0].shape[1:]),
      count([params[k] for k in stem_parts]),
      sum(macs.get(k, 0) for k in stem_parts),
    )
  ]
  # `shapes` is in call order: blocks stage by stage, then the head.
  rows += [Row(k, shapes[k], count(params[k]), macs[k]) for k in shapes if k not in stem_parts]
  return rows


def _table(name: str, rows: list[Row]) -> str:
  lines = [f'{name}', f'{"layer":<18}{"output":>18}{"params":>14}{"GMACs":>10}']
  for r in rows:
    shape = 'x'.join(map(str, r.shape))
    lines.append(f'{r.name:<18}{shape:>18}{r.params:>14,}{r.macs / 1e9:>10.3f}')
  total_params = sum(r.params for r in rows)
  total_macs = sum(r.macs for r in rows)
  lines.append(f'{"total":<18}{"":>18}{total_params:>14,}{total_macs / 1e9:>10.3f}')
  return '\n'.join(lines)


_ABOUT = """\
Shapes, parameters and multiply-accumulates of a named architecture: one row per stem,
block and head with its output shape, parameters and GMACs, then the totals. Nothing is
computed: the model is only traced."""
_EXAMPLE = 'resnet-jax-summary resnet50  # or: python -m resnet_jax.models.summary resnet50'


def _formatter(prog: str) -> argparse.HelpFormatter:
  """The description as written, and each flag's help on one line (argparse would wrap
  it at the terminal's width)."""
  return argparse.RawDescriptionHelpFormatter(prog, max_help_position=28, width=100)


def _version() -> str:
  return f'resnet-jax {importlib.metadata.version("resnet-jax")}'


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit code."""
  p = argparse.ArgumentParser(
    description=_ABOUT,
    epilog=f'example:\n  {_EXAMPLE}',
    formatter_class=_formatter,
  )
  p.add_argument('name', nargs='?', help='architecture name, e.g. resnet50, cifar_plain56')
  p.add_argument('--list', action='store_true', help='print the names of all architectures')
  p.add_argument(
    '--image_size',
    type=int,
    metavar='N',
    help='input height and width (default: 224, cifar_*: 32, mnist_*: 28)',
  )
  p.add_argument(
    '--channels', type=int, metavar='N', help='input channels (default: 3, mnist_*: 1)'
  )
  p.add_argument(
    '--num_classes', type=int, metavar='N', help="classes of the head (default: the architecture's)"
  )
  p.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
  p.add_argument(
    '--version', action='version', version=_version(), help='print the version of resnet-jax'
  )
  a = p.parse_args(argv)
  if a.list:
    print('\n'.join(models.ARCHITECTURES))
    return 0
  if a.name is None:
    p.error('give an architecture name, or --list to see them all')
  try:
    overrides = {} if a.num_classes is None else {'num_classes': a.num_classes}
    model = models.build_model(a.name, **overrides)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  default_size, default_channels = models.default_input(a.name)
  shape = (
    a.image_size or default_size,
    a.image_size or default_size,
    a.channels or default_channels,
  )
  rows = summarize(model, shape)
  if a.json:
    print(
      json.dumps(
        {
          'model': a.name,
          'input_shape': shape,
          'params': sum(r.params for r in rows),
          'gmacs': sum(r.macs for r in rows) / 1e9,
          'layers': [dataclasses.asdict(r) for r in rows],
        }
      )
    )
  else:
    print(_table(f'{a.name} on {"x".join(map(str, shape))}', rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
