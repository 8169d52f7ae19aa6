"""torchvision/timm weights into and out of a workdir (the library half of
`resnet_jax.commands.convert`).

Importing writes a state dict's weights as the checkpoint of step 0 of a new workdir, with
the config recorded as training does: training then evaluates them (--mode=eval) or
trains on from them. Exporting writes a checkpoint in torchvision's layout. Nothing in an
existing workdir is ever changed, and an export never overwrites a file.
"""

import contextlib
import logging
import os
from typing import Any

import jax

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.training import finetune, train
from resnet_jax.training import step as ts
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.weights import torch_format

log = logging.getLogger(__name__)


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
  weights = torch_format.from_torch(torch_format.read(source), expected, source)
  for difference in torch_format.torchvision_differences(setup.model):
    log.warning('the model differs from torchvision`s ResNet: %s', difference)
  fresh = ts.create_train_state(setup.model, setup.tx, setup.input_shape, 0, setup.mesh)
  state = finetune.initialise(fresh, weights, stacked=False, mesh=setup.mesh)
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
    raise torch_format.target_exists(target)
  model, variables, step = train.load_variables(config, workdir, step, member)
  name = torch_format.torchvision_name(model)
  metadata = {
    'model': config.model,
    'num_classes': model.num_classes,
    'step': step,
    'workdir': os.path.abspath(workdir),
    'member': member,
    'torchvision': name,
  }
  torch_format.write(torch_format.to_torch(variables, step), target, metadata)
  if name is None:
    why = '; '.join(torch_format.torchvision_differences(model))
    return f'wrote {target} (step {step}); torchvision has no such net: {why}'
  return (
    f'wrote {target} (step {step}); in PyTorch: m = torchvision.models.{name}'
    f'(num_classes={model.num_classes}); m.load_state_dict(safetensors.torch.load_file('
    f'{target!r}))'
  )
