"""The design note's experiment: ResNet-34 on MNIST (28x28x1, the map is 1x1 at the end).

    python main.py --config=configs/mnist_resnet34.py --workdir=DIR

Two epochs of Nesterov SGD with warmup + cosine reaches >= 99% test top-1.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = 'mnist_resnet34'
  c.model_overrides.zero_init_last_bn = True
  c.dataset = 'mnist'
  c.dtype = 'float32'  # CPU-friendly; bf16 works on accelerators
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 2.0
  c.learning_rate = 0.2  # per 256 examples: 0.1 at batch 128
  c.warmup_epochs = 0.1
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  return c
