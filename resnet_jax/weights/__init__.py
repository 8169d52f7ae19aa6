"""Weights in other frameworks' formats: torchvision/timm state dicts <-> our variables,
and their `.safetensors`/`.pth` files (`torch_format`). Pure mappings of arrays: moving
them into or out of a workdir is `resnet_jax.commands.convert`, fine-tuning from them
`resnet_jax.training.finetune`.

May import: numpy, safetensors, torch (lazily, optional), `resnet_jax.errors`.
"""
