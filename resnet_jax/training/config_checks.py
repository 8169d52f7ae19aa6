"""Every config value checked in one place, before any work starts.

`validate(config)` raises a UserError naming the first bad field, its value and what it
should be, so that a typo costs one line instead of a traceback or, worse, a silently
meaningless run (a negative learning rate, a head with fewer classes than the labels).
"""

from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from resnet_jax.data import datasets
from resnet_jax.errors import UserError
from resnet_jax.training import finetune, optim

DTYPES = ('float32', 'bfloat16', 'float16')
NONFINITE_POLICIES = ('stop', 'skip')


def _fail(field: str, value: Any, should: str) -> None:
  raise UserError(f'{field}={value!r} is invalid: it must be {should}; set --config.{field}.')


def _int(config: Any, field: str, minimum: int, should: str, allowed: Sequence[int] = ()) -> None:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, Integral):
    _fail(field, value, 'an integer')
  if value < minimum and value not in allowed:
    _fail(field, value, should)


def _real(
  config: Any, field: str, low: float, high: float = float('inf'), should: str = ''
) -> None:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
    _fail(field, value, should or f'a number in [{low}, {high}]')


def _choice(config: Any, field: str, choices: Sequence[str]) -> None:
  if config[field] not in choices:
    _fail(field, config[field], f'one of {", ".join(choices)}')


def _steps(config: Any, field: str) -> None:
  """A tuple of increasing positive numbers (an int alone is a common slip for (int,))."""
  value = config[field]
  if not isinstance(value, (tuple, list)):
    _fail(field, value, f"a tuple, e.g. --config.{field}='({value},)'")
  if any(isinstance(v, bool) or not isinstance(v, Real) or v <= 0 for v in value):
    _fail(field, value, 'positive numbers')
  if list(value) != sorted(set(value)):
    _fail(field, value, 'increasing')


def validate(config: Any) -> None:
  """Raise a UserError for the first config field that cannot be meant as given."""
  spec = datasets.get_spec(config.dataset)  # unknown dataset: its own error
  _int(config, 'batch_size', 1, 'positive')
  _int(config, 'eval_batch_size', 1, 'positive')
  _int(config, 'image_size', 1, 'positive')
  _choice(config, 'dtype', DTYPES)
  param_dtype = config.model_overrides.get('param_dtype')
  if param_dtype is not None and param_dtype not in DTYPES:
    _fail('model_overrides.param_dtype', param_dtype, f'one of {", ".join(DTYPES)}')
  num_classes = config.model_overrides.get('num_classes')
  if num_classes is not None and num_classes < spec.num_classes:
    _fail(
      'model_overrides.num_classes',
      num_classes,
      f'at least the {spec.num_classes} classes of {spec.name} (or unset)',
    )
  _real(config, 'learning_rate', 0.0, should='>= 0 (it is per 256 examples)')
  _int(config, 'num_train_steps', 1, 'positive, or -1 to use num_epochs', allowed=(-1,))
  if config.num_train_steps == -1:
    _real(config, 'num_epochs', 0.0, should='> 0 (or set num_train_steps)')
    if config.num_epochs == 0:
      _fail('num_epochs', config.num_epochs, '> 0 (or set num_train_steps)')
  _int(config, 'warmup_steps', 0, '>= 0, or -1 to use warmup_epochs', allowed=(-1,))
  _real(config, 'warmup_epochs', 0.0, should='>= 0')
  _real(config, 'warmup_factor', 0.0, 1.0)
  _steps(config, 'lr_boundaries')
  _steps(config, 'lr_boundaries_epochs')
  _real(config, 'lr_decay', 0.0, 1.0)
  _real(config, 'momentum', 0.0, 1.0)
  _real(config, 'weight_decay', 0.0, should='>= 0')
  _real(config, 'label_smoothing', 0.0, 0.99)
  _choice(config, 'lr_schedule', optim.SCHEDULES)
  for field in ('lr_boundaries', 'lr_boundaries_epochs'):
    if config[field] and config.lr_schedule != 'step':
      _fail(
        field, config[field], f"empty unless lr_schedule='step' ({config.lr_schedule!r} ignores it)"
      )
  _choice(config, 'warmup', optim.WARMUPS)
  _choice(config, 'optimizer', optim.OPTIMIZERS)
  _choice(config, 'on_nonfinite_loss', NONFINITE_POLICIES)
  _choice(config, 'normalize', datasets.NORMALIZATIONS)
  _choice(config, 'train_augment', datasets.TRAIN_AUGMENTS)
  _int(config, 'bn_group_size', 0, '>= 0 (0: the global batch)')
  _int(config, 'log_every_steps', 1, 'positive')
  _int(config, 'eval_every_steps', 1, 'positive, or -1 for once per epoch', allowed=(-1,))
  _int(config, 'checkpoint_every_steps', 0, '>= 0 (0: only at the end and on preemption)')
  _int(config, 'keep_checkpoints', 1, 'at least 1')
  _int(config, 'profile_steps', 0, '>= 0')
  _int(config, 'prefetch_batches', 0, '>= 0')
  _int(config, 'shuffle_buffer', 1, 'positive')
  if not isinstance(config.init_from, str):
    should = 'the weights to start from: a .safetensors/.pth file or a workdir'
    _fail('init_from', config.init_from, should if config.init_from is None else "a path ('')")
  _choice(config, 'init_head', finetune.INIT_HEADS)
  _choice(config, 'freeze', finetune.FREEZES)
