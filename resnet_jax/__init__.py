"""resnet-jax: the deep residual networks of He et al. (2015) in JAX/Flax.

The public API, for notebooks and scripts::

    import resnet_jax
    model = resnet_jax.build_model('cifar_resnet20')       # any name in ARCHITECTURES
    resnet_jax.train_and_evaluate(config, workdir)         # what `python main.py` runs
    checkpoint = resnet_jax.load_variables(config, workdir)  # model, variables, step

Subpackages, each importing only those listed before it (import-linter contracts in
pyproject.toml): `models` (networks and their kernels), `data` and `weights`
(torchvision/timm formats), `training` (loop, step, checkpoints, workdirs), `commands`
(the console commands). `errors` and `sharding` serve them all.
"""

import importlib
from typing import Any

# Name -> the module that defines it. Imported on first use (PEP 562), so that
# `import resnet_jax.models` stays as light as the models themselves: no orbax, optax or
# tensorboard on a machine that only runs networks.
_EXPORTS = {
  'ARCHITECTURES': 'resnet_jax.models',
  'ResNet': 'resnet_jax.models',
  'build_model': 'resnet_jax.models',
  'UserError': 'resnet_jax.errors',
  'train_and_evaluate': 'resnet_jax.training.train',
  'evaluate_checkpoint': 'resnet_jax.training.train',
  'load_variables': 'resnet_jax.training.train',
  'Checkpoint': 'resnet_jax.training.train',
  'import_weights': 'resnet_jax.training.torch_weights',
  'export_weights': 'resnet_jax.training.torch_weights',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f'module resnet_jax has no attribute {name!r}')
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
