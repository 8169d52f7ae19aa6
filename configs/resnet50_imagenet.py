"""ResNet-50 on ImageNet: the design card's main run.

90-100 epochs of the modern recipe (REFERENCE.md section 2): lr 0.1 x batch/256, 5
warmup epochs then cosine, Nesterov SGD, weight decay 1e-4 off BN/biases, bf16 compute,
zero-init of each block's last BN. Needs imagenet2012 prepared in TFDS (manual download).

    python main.py --config=configs/resnet50_imagenet.py --workdir=DIR
"""

from configs import default


def get_config():
  return default.imagenet('resnet50')
