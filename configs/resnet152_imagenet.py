"""ResNet-152 on ImageNet with the modern recipe (see configs/default.py)."""

from configs import default


def get_config():
  return default.imagenet('resnet152')
