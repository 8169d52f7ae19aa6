"""Pretrained weights in and out: torchvision/timm state dicts <-> this codebase's workdirs.

    # a torchvision or timm ResNet -> a workdir that --mode=eval and training use
    python -m resnet_jax.commands.convert --config=configs/resnet50_imagenet.py --workdir=DIR \
        --from=resnet50.safetensors          # or a torch .pth (needs torch)
    # a checkpoint of DIR -> a torchvision-layout safetensors file for PyTorch
    python -m resnet_jax.commands.convert --config=configs/resnet50_imagenet.py --workdir=DIR \
        --to=resnet50_ours.safetensors [--checkpoint_step=N] [--member=NAME]

The library half (import_weights, export_weights) is resnet_jax.training.torch_weights;
to fine-tune another task from weights, set --config.init_from instead
(resnet_jax.training.finetune).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.errors import UserError
from resnet_jax.training.metrics import console_logging
from resnet_jax.training.torch_weights import export_weights, import_weights

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'The config the workdir is (to be) trained with.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'The workdir to import into (new) or export from.')
flags.DEFINE_string('from', None, 'Import: a torchvision/timm .safetensors or .pth file.')
flags.DEFINE_string('to', None, 'Export: the .safetensors file to write (must not exist).')
flags.DEFINE_integer('checkpoint_step', None, 'Export: the step to export (default: latest).')
flags.DEFINE_string('member', None, 'Export from a stack: the member to export.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(_) -> None:
  console_logging()
  source, target = FLAGS['from'].value, FLAGS.to
  if (source is None) == (target is None):
    raise UserError('give either --from=FILE (import) or --to=FILE (export).')
  if source is not None:
    print(import_weights(FLAGS.config, FLAGS.workdir, source))
  else:
    print(export_weights(FLAGS.config, FLAGS.workdir, target, FLAGS.checkpoint_step, FLAGS.member))


def main() -> None:
  try:
    app.run(run)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
