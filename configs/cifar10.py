"""CIFAR-10 with the paper's recipe (section 4.2), for any of its plain or residual nets.

    python main.py --config=configs/cifar10.py:resnet110 --workdir=DIR
    python main.py --config=configs/cifar10.py:plain56 --workdir=DIR

The argument is resnetN or plainN (N = 20, 32, 44, 56, 110; resnet1202 too). SGD
momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k
iterations, stop at 64k; pad-4 random crops, flips, per-pixel mean subtracted. ResNet-110
warms up at lr 0.01 for 400 iterations, as the paper does.
"""

import ml_collections

from configs import default


def get_config(arg: str = 'resnet20') -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = f'cifar_{arg}'
  c.dataset = 'cifar10'
  c.image_size = 32
  c.normalize = 'per_pixel_mean'
  c.dtype = 'float32'
  c.batch_size = 128
  c.eval_batch_size = 500
  c.learning_rate = 0.2  # per 256 examples: 0.1 at the paper's batch of 128
  c.lr_schedule = 'step'
  c.lr_boundaries = (32_000, 48_000)
  c.num_train_steps = 64_000
  c.warmup_steps = 400 if arg in ('resnet110', 'resnet1202') else 0
  c.warmup = 'constant'
  c.warmup_factor = 0.1
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on_norm_and_bias = True  # the paper decays every weight
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  return c
