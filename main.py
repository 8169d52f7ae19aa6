"""Train or evaluate a ResNet from a config file (the same as the `resnet-jax-train` command).

    python main.py --config=configs/resnet50_imagenet.py --workdir=DIR
    python main.py --config=configs/cifar10.py:resnet110 --workdir=DIR --config.batch_size=256
    python main.py --config=... --workdir=DIR --mode=eval [--checkpoint_step=N]

`python main.py --help` lists the flags; docs/training.md says the rest.
"""

from resnet_jax.commands.main import main

if __name__ == '__main__':
  main()
