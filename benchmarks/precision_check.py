"""float32 vs bfloat16: how far a ResNet's training-mode forward pass moves.

    python -m benchmarks.precision_check --model resnet50 --batch 16

Initialises the model once as the training recipe does, then runs the same parameters on
the same random batch as a reference (float32 at 'highest' matmul precision), as float32
at jax's default precision (TF32 on recent NVIDIA GPUs) and with bfloat16 compute, all in
training mode (batch statistics). Prints `RESULT {json}` with ||logits - ref|| / ||ref||
and the loss of each, and exits 1 where an error is over its bound. For scale it also
gives the error of the reference fed the input rounded to bfloat16: the part of the
bfloat16 error that no arithmetic can avoid.
"""

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_throughput import build_model
from resnet_jax import models
from resnet_jax.training import step as ts

# Relative error bounds on the logits. ResNet-50 (recipe init, batch 8, 64x64, CPU) measured
# 7.5e-3 in bfloat16, where rounding only the input gives 2.9e-3 (benchmarks/RESULTS.md).
BOUNDS = {'float32': 1e-2, 'bfloat16': 5e-2}


def _forward(model: models.ResNet, variables: Any, images: jax.Array) -> jax.Array:
  logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  return logits


def relative_errors(
  name: str, batch: int, image_size: int, channels: int = 3, seed: int = 0
) -> dict[str, Any]:
  """Logit errors of float32 (default precision) and bfloat16 against float32 'highest'.

  Without the recipe's zero-init of the last BN of each block, a freshly initialised
  ResNet-50 is chaotic: a 4e-3 relative change of the input moves its logits by ~25%,
  in float32 too, which would swamp the arithmetic's error.
  """
  reference = build_model(name, 'float32')
  init_key, data_key, label_key = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(data_key, (batch, image_size, image_size, channels))
  labels = jax.random.randint(label_key, (batch,), 0, reference.num_classes)
  variables = jax.jit(lambda x: reference.init(init_key, x, train=False))(images[:1])
  forward = jax.jit(functools.partial(_forward, reference))
  with jax.default_matmul_precision('highest'):
    ref = forward(variables, images)
    rounded_input = forward(variables, images.astype(jnp.bfloat16).astype(jnp.float32))
  outputs = {
    'float32': forward(variables, images),
    'bfloat16': jax.jit(functools.partial(_forward, build_model(name, 'bfloat16')))(
      variables, images
    ),
  }
  ref64 = np.asarray(ref, np.float64)
  rel = lambda logits: float(
    np.linalg.norm(np.asarray(logits, np.float64) - ref64) / np.linalg.norm(ref64)
  )
  loss = lambda logits: float(ts.cross_entropy(logits, labels, reference.num_classes).mean())
  row: dict[str, Any] = {'loss_reference': loss(ref), 'rel_err_input_rounding': rel(rounded_input)}
  for dtype, logits in outputs.items():
    row[f'rel_err_{dtype}'] = rel(logits)
    row[f'loss_{dtype}'] = loss(logits)
    row[f'bound_{dtype}'] = BOUNDS[dtype]
  row['ok'] = all(row[f'rel_err_{d}'] <= b for d, b in BOUNDS.items())  # False for NaN too
  return row


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; prints the RESULT line, returns 1 when a bound is broken."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  row = relative_errors(a.model, a.batch, a.image_size, seed=a.seed)
  device = jax.devices()[0]
  result = {
    'who': 'precision',
    'model': a.model,
    'batch': a.batch,
    'image_size': a.image_size,
    **row,
    'device_kind': device.device_kind,
    'jax': jax.__version__,
  }
  print('RESULT ' + json.dumps(result), flush=True)
  return 0 if row['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
