"""Pretrained weights in and out: torchvision/timm state dicts <-> this codebase's workdirs.

    # a torchvision or timm ResNet -> a workdir that --mode=eval and training use
    python -m resnet_jax.convert --config=configs/resnet50_imagenet.py --workdir=DIR \
        --from=resnet50.safetensors          # or a torch .pth (needs torch)
    # a checkpoint of DIR -> a torchvision-layout safetensors file for PyTorch
    python -m resnet_jax.convert --config=configs/resnet50_imagenet.py --workdir=DIR \
        --to=resnet50_ours.safetensors [--checkpoint_step=N] [--member=NAME]

Importing writes the weights as the checkpoint of step 0 of a new workdir, with the
config recorded as training does: the same command with main.py then evaluates them
(--mode=eval) or trains on from them. To fine-tune another task from weights, set
--config.init_from instead (resnet_jax.pretrained). Nothing in an existing workdir is
ever changed, and an export never overwrites a file.
"""

import contextlib
import logging
import os
import sys
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from resnet_jax import models, pretrained, sharding, stack, torch_weights, train
from resnet_jax import train_step as ts
from resnet_jax import workdir as workdir_lib
from resnet_jax.checkpointing import Checkpoints
from resnet_jax.errors import UserError
from resnet_jax.metric_logging import console_logging

log = logging.getLogger(__name__)

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


def import_weights(config: Any, workdir: str, source: str) -> str:
  """Write the weights of `source` as step 0 of the new workdir `workdir`; a summary line."""
  setup = train.build(config, check_data=False)
  if setup.members is not None:
    raise UserError(
      'a stack cannot be imported into; remove the stack_* fields, or fine-tune a stack '
      'from the file with --config.init_from.'
    )
  workdir_lib.prepare(workdir)
  if workdir_lib.has_history(workdir):
    raise UserError(f'{workdir} already holds a run; import into a new --workdir.')
  expected = models.variable_shapes(setup.model, setup.input_shape)
  weights = torch_weights.from_torch(torch_weights.read(source), expected, source)
  for difference in torch_weights.torchvision_differences(setup.model):
    log.warning('the model differs from torchvision`s ResNet: %s', difference)
  fresh = ts.create_train_state(setup.model, setup.tx, setup.input_shape, 0, setup.mesh)
  state = pretrained.initialise(fresh, weights, stacked=False, mesh=setup.mesh)
  workdir_lib.check_and_record(config, workdir)
  with contextlib.closing(Checkpoints(workdir, config.keep_checkpoints)) as checkpoints:
    checkpoints.save(0, state, extra={'imported_from': os.path.abspath(source)})
  count = sum(x.size for x in jax.tree.leaves(weights))
  return f'wrote {count:,} values of {source} as step 0 of {workdir} ({config.model})'


def export_weights(
  config: Any, workdir: str, target: str, step: int | None = None, member: str | None = None
) -> str:
  """Write a checkpoint of `workdir` to `target` in torchvision's layout; a summary line."""
  if not target.endswith('.safetensors'):
    raise UserError(f'--to={target}: exports are safetensors files; end the name in .safetensors.')
  if os.path.exists(target):
    raise UserError(f'{target} exists; give a new --to file (nothing was written).')
  setup = train.build(config, check_data=False)
  state = train.read_checkpoint(setup, config, workdir, step)
  state, member = _member(state, setup.members, member)
  variables = sharding.host_copy({'params': state.params, 'batch_stats': state.batch_stats})
  model = setup.model if member is None else setup.model.clone(residual=member.residual)
  name = torch_weights.torchvision_name(model)
  metadata = {
    'model': config.model,
    'num_classes': model.num_classes,
    'step': int(state.step),
    'workdir': os.path.abspath(workdir),
    'member': member and member.name,
    'torchvision': name,
  }
  torch_weights.write(torch_weights.to_torch(variables, int(state.step)), target, metadata)
  if name is None:
    why = '; '.join(torch_weights.torchvision_differences(model))
    return f'wrote {target} (step {int(state.step)}); torchvision has no such net: {why}'
  return (
    f'wrote {target} (step {int(state.step)}); in PyTorch: m = torchvision.models.{name}'
    f'(num_classes={model.num_classes}); m.load_state_dict(safetensors.torch.load_file('
    f'{target!r}))'
  )


def _member(
  state: ts.TrainState, members: list[stack.Member] | None, name: str | None
) -> tuple[ts.TrainState, stack.Member | None]:
  """The single run's state, or the state of the stack's member called `name`."""
  if members is None:
    if name is not None:
      raise UserError('--member is for a stack; this workdir holds a single run.')
    return state, None
  names = [m.name for m in members]
  if name not in names:
    raise UserError(f'the workdir holds a stack; choose --member= one of: {", ".join(names)}.')
  return stack.member_state(state, names.index(name)), members[names.index(name)]


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
