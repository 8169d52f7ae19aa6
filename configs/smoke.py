"""A tiny run on synthetic data that exercises the whole loop in seconds.

python main.py --config=configs/smoke.py --workdir=/tmp/smoke
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = 'cifar_resnet20'
  c.dataset = 'synthetic'
  c.image_size = 32
  c.dtype = 'float32'
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 20
  c.warmup_steps = 2
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  return c
