"""The ResNet family of He et al. (2015) as Flax linen modules, plain and residual.

One constructor, `ResNet`, builds every network of the paper from a handful of fields
(stem, stage sizes and widths, block type, shortcut option, residual or plain); the
named architectures in `ARCHITECTURES` are small declarations over it and
`build_model` turns a name plus overrides into a module. Blocks receive `conv` and
`norm` partials from the constructor, so precision, initialisation and BatchNorm
flavour are decided in one place.

Imports no tensorflow: this module runs on machines that only have jax and flax.
"""

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError
from resnet_jax.models.ops import channel_stats, conv_lowering, fused_conv, max_pool

ModuleDef = Callable[..., nn.Module]

# BN after every conv, before the ReLU (paper section 3.4); torchvision's constants.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

KERNEL_INITS = {
  # He/MSRA init as the paper and torchvision (kaiming_normal_, mode='fan_out').
  'he_fan_out': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
  'flax_default': nn.linear.default_kernel_init,
}


class _BatchNormBase(nn.Module):
  """flax.linen.BatchNorm's fields, variables (names and initialisers) and running-average
  update, for the BatchNorms below that get their batch statistics their own way."""

  use_running_average: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.nowrap
  def _variables(self, features: int) -> tuple[jax.Array, jax.Array, Any, Any]:
    """The scale and bias parameters and the running mean and variance variables."""
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    return scale, bias, ra_mean, ra_var

  @nn.nowrap
  def _track(self, ra_mean: Any, ra_var: Any, mean: jax.Array, var: jax.Array) -> None:
    """Move the running averages toward this batch's `mean` and `var` (not at init)."""
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var


class GroupBatchNorm(_BatchNormBase, kw_only=True):
  """BatchNorm whose training statistics come from groups of `group_size` examples.

  MLPerf-style "BN groups": each group of consecutive examples is normalised with its
  own mean and variance (as if each small group were on its own device), which keeps
  the regulariser of small per-device batches when the global batch is large. The
  running averages track the mean over groups. Works under plain `jax.jit`: the
  grouping is a reshape of the (sharded) batch axis.
  """

  group_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale, bias, ra_mean, ra_var = self._variables(features)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      batch = x.shape[0]
      if batch % self.group_size:
        raise UserError(
          f'bn_group_size={self.group_size} does not divide the batch of '
          f'{batch}; choose a divisor of the per-device batch.'
        )
      xg = x.astype(jnp.float32).reshape(batch // self.group_size, -1, features)
      mean = xg.mean(axis=1, keepdims=True)
      var = jnp.maximum((xg * xg).mean(axis=1, keepdims=True) - mean * mean, 0.0)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      self._track(ra_mean, ra_var, mean.mean(axis=(0, 1)), var.mean(axis=(0, 1)))
    return (y * scale + bias).astype(self.dtype)


class FoldedBatchNorm(_BatchNormBase):
  """BatchNorm as a per-channel (scale, bias) for statistics computed elsewhere.

  The variables, their names and the running-average update are flax.linen.BatchNorm's;
  the batch statistics come in as float32 per-channel sums of x and of x*x (a fused
  convolution's epilogue). Returns `(scale, bias)` such that x * scale + bias is the BN's
  output: scale = gamma * rsqrt(var + eps), bias = beta - mean * scale.
  """

  @nn.compact
  def __call__(self, x: jax.Array, sums: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(scale, bias) for `x` (read for its shape only) whose sums are `sums`."""
    features = x.shape[-1]
    gamma, beta, ra_mean, ra_var = self._variables(features)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      count = x.size // features
      mean = sums[0] / count
      # E[x^2] - E[x]^2 clipped at 0, as flax's default (fast) variance.
      var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
      self._track(ra_mean, ra_var, mean, var)
    scale = gamma.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    return scale, beta.astype(jnp.float32) - mean * scale


def _shortcut(
  x: jax.Array, out: int, strides: int, option: str, conv: ModuleDef, norm: ModuleDef
) -> jax.Array:
  """The paper's shortcut (section 3.3) from `x` to a branch with `out` channels.

  A: identity; where the shape changes, stride-s subsampling and zero-padded extra
  channels (no parameters). B: a 1x1 projection + BN only where the shape changes.
  C: a projection on every block. Must be called inside a compact method.
  """
  changes_shape = strides != 1 or x.shape[-1] != out
  if option == 'C' or (option == 'B' and changes_shape):
    return norm(name='proj_bn')(conv(out, (1, 1), (strides, strides), name='proj_conv')(x))
  if not changes_shape:
    return x
  x = x[:, ::strides, ::strides, :]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out - x.shape[-1])))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets), then shortcut + ReLU."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, shortcut_gate: jax.Array | None = None) -> jax.Array:
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), name='conv2')(y)
    y = _last_norm(self, 'bn2')(y)
    return _join(self, x, y, shortcut_gate)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) (ResNet-50/101/152), then shortcut + ReLU.

  `stride_in_1x1` puts the stride in the first 1x1 as the paper does ("v1"); otherwise
  it sits in the 3x3 as torchvision does ("v1.5", more accurate, a little slower).
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'
  zero_init_last_bn: bool = False
  stride_in_1x1: bool = False
  expansion: int = 4
  # With both set, the 1x1 convolutions run fused with their BNs (`_fused_call`).
  fused_conv: ModuleDef | None = None
  folded_norm: ModuleDef | None = None

  @nn.compact
  def __call__(self, x: jax.Array, shortcut_gate: jax.Array | None = None) -> jax.Array:
    if self.fused_conv:
      return self._fused_call(x, shortcut_gate)
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (1, 1), s if self.stride_in_1x1 else (1, 1), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), (1, 1) if self.stride_in_1x1 else s, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name='conv3')(y)
    y = _last_norm(self, 'bn3')(y)
    return _join(self, x, y, shortcut_gate)

  def _fused_call(self, x: jax.Array, gate: jax.Array | None) -> jax.Array:
    """The same block with each 1x1 convolution fused (resnet_jax.models.ops.fused_conv): conv1 and
    the projection emit their BN statistics, conv3 also applies bn2 + ReLU to its input.
    Only the 3x3 convolution's input (bn1 + ReLU) and the block's output (bn3 + shortcut +
    ReLU) remain elementwise passes, and bn2's statistics a reduction. Same parameters,
    same variables, the same function to rounding (tests/test_fused_conv.py)."""
    s1, s2 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y, *sums = self.fused_conv(self.filters, strides=s1, name='conv1')(x)
    scale, bias = self.folded_norm(name='bn1')(y, sums)
    y = self.conv(self.filters, (3, 3), (s2, s2), name='conv2')(fused_conv.bn_relu(y, scale, bias))
    scale, bias = self.folded_norm(name='bn2')(y, channel_stats.channel_sums(y))
    y, *sums = self.fused_conv(self.filters * self.expansion, name='conv3')(y, scale, bias)
    scale, bias = _last_norm(self, 'bn3', self.folded_norm)(y, sums)
    out = y.astype(jnp.float32) * scale + bias
    if self.residual:
      out = out + self._fused_shortcut(x, y.shape[-1]) * (1.0 if gate is None else gate)
    return nn.relu(out).astype(y.dtype)

  def _fused_shortcut(self, x: jax.Array, out: int) -> jax.Array:
    """`_shortcut` in float32, a projection's BN statistics from its fused convolution."""
    changes_shape = self.strides != 1 or x.shape[-1] != out
    if self.shortcut == 'C' or (self.shortcut == 'B' and changes_shape):
      y, *sums = self.fused_conv(out, strides=self.strides, name='proj_conv')(x)
      scale, bias = self.folded_norm(name='proj_bn')(y, sums)
      return y.astype(jnp.float32) * scale + bias
    return _shortcut(x, out, self.strides, self.shortcut, self.conv, self.norm).astype(jnp.float32)


def _last_norm(block: nn.Module, name: str, norm: ModuleDef | None = None) -> nn.Module:
  """The block's last BN (`norm`, default the block's); zero scale makes a residual block
  start as the identity."""
  norm = norm or block.norm
  if block.zero_init_last_bn:
    return norm(name=name, scale_init=nn.initializers.zeros)
  return norm(name=name)


def _join(block: nn.Module, x: jax.Array, y: jax.Array, gate: jax.Array | None = None) -> jax.Array:
  """relu(y + shortcut(x)) for a residual block, relu(y) for its plain twin.

  A `gate` (0 or 1, possibly traced) multiplies the shortcut: a stack of twins that differ
  only in `residual` runs one program, each member with its own gate. y + 0 * s is y
  exactly, and no gradient reaches x through a zero gate.
  """
  if block.residual:
    s = _shortcut(x, y.shape[-1], block.strides, block.shortcut, block.conv, block.norm)
    y = y + (s if gate is None else s * gate.astype(s.dtype))
  return nn.relu(y)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}
STEMS = ('imagenet', 'cifar')
SHORTCUTS = ('A', 'B', 'C')
STRIDE_PLACEMENTS = ('v1', 'v1.5')
MAX_POOL_IMPLS = ('xla', 'index')
STEM_IMPLS = ('conv', 'space_to_depth')
CONV1X1_IMPLS = ('conv', 'dot')
BOTTLENECK_IMPLS = ('xla', 'fused')
CONV_IMPLS = conv_lowering.IMPLS
# Fields that choose how, not what: the same function and parameters either way.
IMPL_FIELDS = (
  'max_pool_impl',
  'stem_impl',
  'stem_input_channels',
  'conv1x1_impl',
  'bottleneck_impl',
  'conv_impl',
)


class ResNet(nn.Module):
  """A residual network, or its plain twin, of any depth and width.

  Input NHWC of any size and channel count; output float32 logits [N, num_classes]
  whatever the compute `dtype`. Parameters are kept in `param_dtype` (float32).
  """

  stage_sizes: Sequence[int]
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  block: str = 'basic'  # 'basic' | 'bottleneck'
  stem: str = 'imagenet'  # 'imagenet': 7x7/2 conv + 3x3/2 max pool; 'cifar': one 3x3 conv
  stem_width: int = 64
  residual: bool = True  # False: the plain net, the same stack with no shortcuts at all
  shortcut: str = 'B'  # 'A' | 'B' | 'C', paper section 3.3
  stride_placement: str = 'v1.5'  # 'v1': stride in the bottleneck's first 1x1 (paper)
  zero_init_last_bn: bool = False
  kernel_init: str = 'he_fan_out'  # 'he_fan_out' | 'flax_default'
  num_classes: int = 1000
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  bn_group_size: int = 0  # 0: statistics over the whole (global) batch
  # BN normalises with its running statistics in training too and never updates them
  # (fine-tuning with config.freeze; see resnet_jax.training.finetune).
  frozen_bn: bool = False
  # How, not what: each switch below computes the same function with the same parameters
  # another way, for speed on accelerators (issue 11; figures in benchmarks/RESULTS.md).
  # 'index': the stem's max pool with an index VJP (ops.max_pool; no select-and-scatter).
  max_pool_impl: str = 'xla'
  # 'space_to_depth': the 7x7/2 stem conv as a 4x4/1 conv over 2x2 blocks (12 channels).
  stem_impl: str = 'conv'
  # The stem sees the image's channels zero-padded to this many (e.g. 4), its kernel too.
  stem_input_channels: int = 0
  # 'dot': 1x1 convolutions as dot_general over channels (a GEMM library, not cuDNN).
  conv1x1_impl: str = 'conv'
  # 'fused': a bottleneck's 1x1 convolutions apply the pending BN + ReLU to their input
  # and emit their output's BN statistics (resnet_jax.models.ops.fused_conv; issue 13).
  bottleneck_impl: str = 'xla'
  # How each convolution's forward pass and two gradients are lowered (ops.conv_lowering):
  # 'auto' takes them per shape from the table measured on CPUs (XLA's convolution on
  # other backends), 'xla' is XLA's convolution everywhere, 'gemm'/'taps' force one
  # formulation (issue 22).
  conv_impl: str = 'auto'

  def __post_init__(self):
    _check_choice('block', self.block, BLOCKS)
    _check_choice('stem', self.stem, STEMS)
    _check_choice('shortcut', self.shortcut, SHORTCUTS)
    _check_choice('stride_placement', self.stride_placement, STRIDE_PLACEMENTS)
    _check_choice('kernel_init', self.kernel_init, KERNEL_INITS)
    _check_choice('max_pool_impl', self.max_pool_impl, MAX_POOL_IMPLS)
    _check_choice('stem_impl', self.stem_impl, STEM_IMPLS)
    _check_choice('conv1x1_impl', self.conv1x1_impl, CONV1X1_IMPLS)
    _check_choice('bottleneck_impl', self.bottleneck_impl, BOTTLENECK_IMPLS)
    _check_choice('conv_impl', self.conv_impl, CONV_IMPLS)
    if self.bottleneck_impl == 'fused' and (self.block != 'bottleneck' or self.bn_group_size):
      raise UserError(
        'bottleneck_impl=fused needs bottleneck blocks and whole-batch BN (bn_group_size=0); '
        'use bottleneck_impl=xla.'
      )
    if len(self.stage_sizes) != len(self.stage_widths):
      raise UserError(
        f'stage_sizes {tuple(self.stage_sizes)} and stage_widths '
        f'{tuple(self.stage_widths)} must have the same length.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = True, shortcut_gate: jax.Array | None = None
  ) -> jax.Array:
    """Logits for images `x`; `shortcut_gate` (a scalar, 0 or 1) scales every shortcut."""
    common = dict(
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=KERNEL_INITS[self.kernel_init],
      conv_general_dilated=conv_lowering.conv_general_dilated(self.conv_impl),
    )
    conv = functools.partial(_conv, dot_1x1=self.conv1x1_impl == 'dot', **common)
    norm = self._norm(train)
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = _StemConv(
        self.stem_width,
        (7, 7),
        (2, 2),
        impl=self.stem_impl,
        input_channels=self.stem_input_channels,
        name='stem_conv',
        **common,
      )(x)
      x = nn.relu(norm(name='stem_bn')(x))
      pool = max_pool.max_pool if self.max_pool_impl == 'index' else nn.max_pool
      x = pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.stem_width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    # Stage outputs are sown so tools and tests can read them (mutable=['intermediates']).
    self.sow('intermediates', 'stem', x)
    block_cls = BLOCKS[self.block]
    if self.block == 'bottleneck':
      block_cls = functools.partial(block_cls, stride_in_1x1=self.stride_placement == 'v1')
    if self.bottleneck_impl == 'fused':
      block_cls = functools.partial(
        block_cls,
        fused_conv=functools.partial(_FusedConv1x1, kernel_size=(1, 1), **common),
        folded_norm=self._norm(train, FoldedBatchNorm),
      )
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths, strict=True)):
      for j in range(size):
        x = block_cls(
          width,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          residual=self.residual,
          shortcut=self.shortcut,
          zero_init_last_bn=self.zero_init_last_bn,
          name=f'stage{i + 1}_block{j + 1}',
        )(x, shortcut_gate)
      self.sow('intermediates', f'stage{i + 1}', x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x.astype(jnp.float32)

  def _norm(self, train: bool, cls: ModuleDef | None = None) -> ModuleDef:
    common = dict(
      use_running_average=not train or self.frozen_bn,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.bn_group_size:
      return functools.partial(GroupBatchNorm, group_size=self.bn_group_size, **common)
    return functools.partial(cls or nn.BatchNorm, **common)


class _Conv(nn.Conv):
  """nn.Conv with torchvision's explicit padding (k // 2 each side), not 'SAME'.

  For stride 2 on even inputs 'SAME' pads only the bottom/right; symmetric padding
  gives the same output sizes as the paper's nets and matches torchvision numerically.
  """

  def __post_init__(self):
    if self.padding == 'SAME':
      object.__setattr__(self, 'padding', tuple((k // 2, k // 2) for k in self.kernel_size))
    super().__post_init__()

  @nn.nowrap
  def _promoted_kernel(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x` and the kernel parameter (nn.Conv's name, shape and init) in the compute dtype,
    for the subclasses that compute the convolution their own way."""
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
    return nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)

  @nn.nowrap
  def _stride_pair(self) -> tuple[int, int]:
    return (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)


class _DotConv(_Conv):
  """A bias-free 1x1 convolution as a dot_general over the channels of the strided input:
  the same function and kernel, computed by a GEMM library instead of a convolution one."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = self._promoted_kernel(x)
    sh, sw = self._stride_pair()
    x = x[:, ::sh, ::sw, :]
    return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())), precision=self.precision)


class _FusedConv1x1(_Conv):
  """A bias-free 1x1 convolution through ops.fused_conv: called as (x) or (x, scale,
  bias), it computes relu(x * scale + bias) convolved with its kernel (x alone without a
  scale) and returns (y, float32 sum of y, float32 sum of y*y) over N, H and W."""

  @nn.compact
  def __call__(
    self, x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, kernel = self._promoted_kernel(x)
    return fused_conv.conv1x1_bn_nhwc(
      x, scale, bias, kernel[0, 0], stride=self._stride_pair()[0], prologue=scale is not None
    )


def _conv(features: int, kernel_size: Sequence[int], *args, dot_1x1: bool, **kwargs) -> nn.Conv:
  """The blocks' convolution: a _Conv, or a _DotConv for a 1x1 kernel with `dot_1x1`."""
  is_1x1 = tuple(kernel_size) == (1, 1) and not kwargs.get('use_bias', True)
  cls = _DotConv if dot_1x1 and is_1x1 else _Conv
  return cls(features, kernel_size, *args, **kwargs)


class _StemConv(_Conv):
  """The ImageNet stem's 7x7/2 convolution (torchvision's padding 3), computed either as
  that convolution or as a 4x4/1 convolution over 2x2 space-to-depth blocks.

  Space to depth: H x W x C becomes H/2 x W/2 x 4C and the kernel, zero-padded in front to
  8x8, becomes 4x4 x 4C; output (i, j) then reads the blocks i-2..i+1, which are exactly
  rows 2i-4..2i+3 of the image, the first of them under the zero row. The parameter is
  the 7x7 kernel either way (checkpoints and torchvision weights are unchanged), and
  `input_channels` zero-pads the image's channels and the kernel's to match.
  """

  impl: str = 'conv'
  input_channels: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = self._promoted_kernel(x)
    extra = max(self.input_channels - x.shape[-1], 0)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    if self.impl == 'space_to_depth':
      x, kernel = _space_to_depth(x), _space_to_depth_kernel(kernel)
      strides, padding = (1, 1), ((2, 1), (2, 1))
    else:
      strides, padding = (2, 2), ((3, 3), (3, 3))
    dimensions = ('NHWC', 'HWIO', 'NHWC')
    return (self.conv_general_dilated or jax.lax.conv_general_dilated)(
      x, kernel, strides, padding, dimension_numbers=dimensions, precision=self.precision
    )


def _space_to_depth(x: jax.Array) -> jax.Array:
  """N x H x W x C -> N x H/2 x W/2 x 4C, channel (a, b, c) from pixel (2i + a, 2j + b)."""
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise UserError(
      f'stem_impl=space_to_depth needs an even image size, got {h}x{w}; use stem_impl=conv.'
    )
  x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // 2, w // 2, 4 * c)


def _space_to_depth_kernel(kernel: jax.Array) -> jax.Array:
  """7 x 7 x C x F -> 4 x 4 x 4C x F, laid out as _space_to_depth lays out the input."""
  _, _, c, f = kernel.shape
  kernel = jnp.pad(kernel, ((1, 0), (1, 0), (0, 0), (0, 0)))
  kernel = kernel.reshape(4, 2, 4, 2, c, f).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(4, 4, 4 * c, f)


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise UserError(f'unknown model {field} {value!r}; choose one of {", ".join(choices)}.')


# --- Named architectures -------------------------------------------------------------

_IMAGENET_STAGES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
}


def _imagenet_net(depth: int, residual: bool) -> dict[str, Any]:
  return dict(
    stage_sizes=_IMAGENET_STAGES[depth],
    residual=residual,
    block='basic' if depth < 50 else 'bottleneck',
  )


def _cifar_net(depth: int, residual: bool) -> dict[str, Any]:
  """The paper's 6n+2-layer CIFAR nets (section 4.2), option A shortcuts."""
  n = (depth - 2) // 6
  return dict(
    stage_sizes=(n, n, n),
    stage_widths=(16, 32, 64),
    stem='cifar',
    stem_width=16,
    shortcut='A',
    residual=residual,
    num_classes=10,
  )


ARCHITECTURES: dict[str, dict[str, Any]] = {
  **{f'resnet{d}': _imagenet_net(d, True) for d in (18, 34, 50, 101, 152, 200)},
  **{f'plain{d}': _imagenet_net(d, False) for d in (18, 34, 50, 101, 152)},
  **{f'cifar_resnet{d}': _cifar_net(d, True) for d in (20, 32, 44, 56, 110, 1202)},
  **{f'cifar_plain{d}': _cifar_net(d, False) for d in (20, 32, 44, 56, 110)},
  # The design note's experiment: ResNet-34 on 28x28x1 MNIST (the map is 1x1 at the end).
  'mnist_resnet34': dict(_imagenet_net(34, True), num_classes=10),
}

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ResNet) if f.name not in ('parent', 'name'))


def model_kwargs(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The constructor arguments of architecture `name` with `overrides` applied."""
  if name not in ARCHITECTURES:
    close = difflib.get_close_matches(name, ARCHITECTURES, n=3, cutoff=0.5)
    hint = f'did you mean {" or ".join(close)}? ' if close else ''
    raise UserError(
      f'unknown model {name!r}; {hint}`resnet-jax-summary --list` lists all '
      f'{len(ARCHITECTURES)} models.'
    )
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(MODEL_FIELDS))
  if unknown:
    raise UserError(
      f'unknown model field(s) {", ".join(unknown)}; model fields are: {", ".join(MODEL_FIELDS)}.'
    )
  kwargs = {**ARCHITECTURES[name], **overrides}
  for key in ('dtype', 'param_dtype'):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return kwargs


def default_input(name: str) -> tuple[int, int]:
  """(image size, channels) that architecture `name` is made for: 32x32x3 for the CIFAR
  nets, 28x28x1 for the MNIST ones, else ImageNet's 224x224x3."""
  return {'cifar': (32, 3), 'mnist': (28, 1)}.get(name.split('_')[0], (224, 3))


def variable_shapes(model: ResNet, input_shape: Sequence[int]) -> dict[str, Any]:
  """Shapes and dtypes of `model`'s variables ('params', 'batch_stats') for inputs of
  `input_shape` (H, W, C), not computed."""
  init = lambda x: model.init(jax.random.key(0), x, train=False)
  return jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))


def build_model(name: str, **overrides: Any) -> ResNet:
  """The architecture `name` from ARCHITECTURES, with any ResNet field overridden."""
  return ResNet(**model_kwargs(name, overrides))
