"""The networks: the ResNet constructor, its blocks and the named architectures.

`build_model(name, **overrides)` makes any network of the paper; `ARCHITECTURES` lists
the names. `resnet` holds the constructor and blocks, `summary` the per-layer table,
`ops/` the implementation switches' kernels (same function, another lowering).

May import: jax, flax, `resnet_jax.errors`. Never tensorflow, data, training or weights.
"""

from resnet_jax.models.resnet import (
  ARCHITECTURES,
  IMPL_FIELDS,
  MODEL_FIELDS,
  STEM_IMPLS,
  BasicBlock,
  BottleneckBlock,
  FoldedBatchNorm,
  GroupBatchNorm,
  ResNet,
  build_model,
  default_input,
  model_kwargs,
  variable_shapes,
)

__all__ = [
  'ARCHITECTURES',
  'IMPL_FIELDS',
  'MODEL_FIELDS',
  'STEM_IMPLS',
  'BasicBlock',
  'BottleneckBlock',
  'FoldedBatchNorm',
  'GroupBatchNorm',
  'ResNet',
  'build_model',
  'default_input',
  'model_kwargs',
  'variable_shapes',
]
