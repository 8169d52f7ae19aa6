"""Fine-tune an ImageNet ResNet (torchvision or timm weights) on CIFAR-10.

    python main.py --config=configs/finetune_cifar10.py --workdir=DIR \
        --config.init_from=resnet18.safetensors [--config.freeze=trunk]
    python main.py --config=configs/finetune_cifar10.py:resnet50 --workdir=DIR \
        --config.init_from=resnet50_a1_in1k.safetensors

The argument is the net (resnet18 by default; resnet34/50/101/152), which must be the
one the weights were trained as. init_from is required: a torchvision/timm state dict
(.safetensors, or .pth where torch is installed) or a workdir of this codebase. The
trunk starts from the weights and the head is new (10 classes, from the seed). Images
stay at CIFAR's 32x32, normalised per channel (CIFAR's statistics are within 0.03 of
ImageNet's); the ImageNet stem then leaves a 1x1 map in the last stage. SGD with
Nesterov momentum, lr 0.01 at batch 128, one warmup epoch, cosine over 15 epochs,
weight decay 5e-4. `--config.freeze=trunk` trains only the head (a linear probe);
`--config.freeze=bn_stats` keeps the pretrained BN statistics and trains every weight.
"""

import ml_collections

from configs import default


def get_config(arg: str = 'resnet18') -> ml_collections.ConfigDict:
  c = default.imagenet(arg)
  c.init_from = ml_collections.config_dict.placeholder(str)  # required: see above
  c.dataset = 'cifar10'
  c.image_size = 32
  c.normalize = 'per_channel'
  c.dtype = 'float32'
  c.batch_size = 128
  c.eval_batch_size = 500
  c.learning_rate = 0.02  # per 256 examples: 0.01 at batch 128
  c.num_epochs = 15.0
  c.warmup_epochs = 1.0
  c.weight_decay = 5e-4
  c.log_every_steps = 100
  c.eval_every_steps = -1  # once per epoch
  c.checkpoint_every_steps = 1000
  return c
