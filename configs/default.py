"""Defaults shared by every config: the modern ImageNet recipe for ResNet-50.

Each runnable config starts from `get_config()` here and changes what its setup
needs. Every field can be overridden on the command line as `--config.FIELD=VALUE`.
"""

import dataclasses

import ml_collections

from resnet_jax import models


def get_config() -> ml_collections.ConfigDict:
  """The full set of fields, with the ResNet-50 / ImageNet values."""
  c = ml_collections.ConfigDict()

  # Model: a name from resnet_jax.models.ARCHITECTURES; any of its fields
  # (resnet_jax.models.ResNet) can be changed in model_overrides.
  c.model = 'resnet50'
  c.model_overrides = _model_overrides()
  c.dtype = 'bfloat16'  # compute dtype; params, optimizer state, BN stats, loss stay float32
  c.bn_group_size = 0  # 0: BN statistics over the global batch; N: over groups of N examples

  # Data: resnet_jax.data.DATASETS names the datasets.
  c.dataset = 'imagenet2012'
  c.data_dir = ml_collections.config_dict.placeholder(str)  # None -> $TFDS_DATA_DIR / tfds default
  c.image_size = 224
  c.train_augment = 'inception'  # imagenet: 'inception' (random-resized crop) or 'scale' (paper)
  c.normalize = 'per_channel'  # cifar: 'per_pixel_mean' (paper) or 'per_channel'
  c.device_resident_data = False  # small datasets: whole train split on the devices
  c.shuffle_buffer = 16 * 1024
  c.prefetch_batches = 2

  # Schedule and optimizer.
  c.batch_size = 1024  # global, over all devices and processes
  c.eval_batch_size = 1024
  c.num_epochs = 100.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.learning_rate = 0.1  # per 256 examples; scaled by batch_size / 256
  c.lr_schedule = 'cosine'  # 'cosine' | 'step' | 'constant'
  c.lr_boundaries = ()  # 'step': steps where lr is multiplied by lr_decay ...
  c.lr_boundaries_epochs = ()  # ... or the same in epochs
  c.lr_decay = 0.1
  c.warmup_epochs = 5.0
  c.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.warmup = 'linear'  # 'linear' from 0, or 'constant' at warmup_factor x the peak (paper, R-110)
  c.warmup_factor = 0.1
  c.optimizer = 'sgd'  # 'sgd' | 'lars'
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.weight_decay_on_norm_and_bias = False
  c.label_smoothing = 0.0

  # Fine-tuning (resnet_jax.training.finetune): a run with no checkpoint yet starts from these
  # weights instead of its seed; docs/pretrained.md.
  c.init_from = ''  # a .safetensors/.pth in torchvision/timm layout, or a workdir ('': none)
  c.init_head = 'auto'  # 'auto': the source's head if its shape fits, else new; 'new': new
  c.freeze = 'none'  # 'none' | 'bn_stats' (BN in inference mode) | 'trunk' (train the head only)

  # Bookkeeping.
  c.seed = 0
  # A stack of runs trained as one program (resnet_jax.training.stack): one entry per member, or
  # () for the run's own value; e.g. stack_seeds=(0, 1) with stack_residual=(False, True).
  c.stack_seeds = ()
  c.stack_residual = ()
  c.stack_lr_scale = ()
  c.stack_method = 'auto'  # 'vmap' | 'unroll' | 'auto': unroll on CPUs, vmap on accelerators
  c.log_every_steps = 100
  c.eval_every_steps = -1  # -1: once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.on_nonfinite_loss = 'stop'  # 'stop' | 'skip'
  c.profile_steps = 0  # > 0: trace that many steps into WORKDIR/profile
  c.compilation_cache_dir = '~/.cache/resnet_jax/xla'  # '' disables the persistent cache
  return c


def imagenet(model: str) -> ml_collections.ConfigDict:
  """The modern ImageNet recipe (REFERENCE.md section 2) for `model`."""
  c = get_config()
  c.model = model
  # Zero-init of the last BN helps residual nets; plain nets have no identity to start from.
  c.model_overrides.zero_init_last_bn = model.startswith('resnet')
  return c


# ResNet fields whose default is not of the type a command-line value should have.
_FIELD_TYPES = {'stage_sizes': tuple, 'stage_widths': tuple, 'dtype': str, 'param_dtype': str}


def _model_overrides() -> ml_collections.ConfigDict:
  """Every field of models.ResNet, unset (None) until a config or flag sets it.

  Listing them lets `--config.model_overrides.shortcut=A` work on a locked config, and
  makes a misspelt field an error instead of a silently ignored one.
  """
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(models.ResNet):
    if f.name in models.MODEL_FIELDS:
      default = None if f.default is dataclasses.MISSING else f.default
      c[f.name] = ml_collections.config_dict.placeholder(_FIELD_TYPES.get(f.name, type(default)))
  return c
