"""How long an async checkpoint save blocks the training loop, and how long it takes.

    python -m benchmarks.checkpoint_save --model resnet50 [--saves 3] [--workdir DIR]

Builds the model's full train state (parameters, BN statistics, SGD momentum) with the
training loop's own code, saves it through `resnet_jax.training.checkpoints.Checkpoints` as the
loop does, and prints one `RESULT {json}` line per save: `blocked_s` (what the loop
waits for: the fingerprints, the copy off the devices and the start of the write),
`fingerprint_s` (the part of it that computes the arrays' fingerprints, already compiled)
and `total_s` (until the files are committed on disk), with the state's size.
"""

import argparse
import json
import tempfile
import time

import jax

from benchmarks.train_throughput import build_model, optimizer_config
from resnet_jax import sharding
from resnet_jax.training import optim
from resnet_jax.training import step as ts
from resnet_jax.training.checkpoints import Checkpoints, fingerprints


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet50')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--saves', type=int, default=3)
  p.add_argument('--workdir', default=None, help='default: a new temporary directory')
  a = p.parse_args()
  mesh = sharding.make_mesh()
  model = build_model(a.model, 'float32')
  tx, _ = optim.create_optimizer(optimizer_config(256), 1000, 100_000)
  state = ts.create_train_state(model, tx, (a.image_size, a.image_size, 3), 0, mesh)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  checkpoints = Checkpoints(a.workdir or tempfile.mkdtemp(prefix='ckpt_bench_'))
  start = time.perf_counter()
  fingerprints(state)
  compile_s = time.perf_counter() - start
  for step in range(1, a.saves + 1):
    start = time.perf_counter()
    fingerprints(state)
    fingerprint_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpoints.save(step, state)
    blocked = checkpoints.last_save_blocked_s
    checkpoints.wait()
    total = time.perf_counter() - start
    print(
      'RESULT '
      + json.dumps(
        {
          'model': a.model,
          'state_mb': round(size / 2**20, 1),
          'save': step,
          'blocked_s': round(blocked, 3),
          'fingerprint_s': round(fingerprint_s, 4),
          'fingerprint_first_s': round(compile_s, 3),
          'total_s': round(total, 3),
          'device': jax.devices()[0].device_kind,
          'jax': jax.__version__,
        }
      ),
      flush=True,
    )
  checkpoints.close()


if __name__ == '__main__':
  main()
