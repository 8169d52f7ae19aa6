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

from resnet_jax.commands import usage
from resnet_jax.errors import UserError
from resnet_jax.training.metrics import console_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'the config the workdir is (to be) trained with', lock_config=True
)
flags.DEFINE_string('workdir', None, 'the workdir to import into (new) or export from')
flags.DEFINE_string('from', None, 'import: a torchvision/timm .safetensors or .pth file')
flags.DEFINE_string('to', None, 'export: the .safetensors file to write (must not exist)')
flags.DEFINE_integer('checkpoint_step', None, 'export: the step to export (default: the latest)')
flags.DEFINE_string('member', None, 'export from a stack: the member to export')
flags.mark_flags_as_required(['config', 'workdir'])

_USAGE = 'resnet-jax-convert --config=FILE --workdir=DIR (--from=FILE | --to=FILE) [flags]'
_ABOUT = """\
Pretrained weights into and out of a workdir: --from imports a torchvision/timm ResNet
into a new workdir (which --mode=eval and training then use), --to exports a checkpoint
of the workdir as a torchvision-layout .safetensors file for PyTorch."""
_EXAMPLE = (
  'resnet-jax-convert --config=configs/resnet50_imagenet.py --workdir=DIR '
  '--from=resnet50.safetensors'
)


def run(_) -> None:
  console_logging()
  # Here, not at the top: --help and --version answer without loading jax.
  from resnet_jax.training.torch_weights import export_weights, import_weights

  source, target = FLAGS['from'].value, FLAGS.to
  if (source is None) == (target is None):
    raise UserError('give either --from=FILE (import) or --to=FILE (export).')
  if source is not None:
    print(import_weights(FLAGS.config, FLAGS.workdir, source))
  else:
    print(export_weights(FLAGS.config, FLAGS.workdir, target, FLAGS.checkpoint_step, FLAGS.member))


def main() -> None:
  usage.answer_help_or_version(sys.argv, usage.help_text(_USAGE, _ABOUT, __name__, _EXAMPLE))
  try:
    app.run(run)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
