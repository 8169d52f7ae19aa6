"""Runs that start from pretrained weights: the config fields init_from, init_head, freeze.

`init_from` names the weights: a torchvision/timm state dict (`.safetensors`, or `.pth`
where torch is installed; see resnet_jax.weights.torch_format) or a workdir of this codebase
(its latest good checkpoint; a member of a stack as WORKDIR/<member>). A run with no
checkpoint of its own starts from them instead of from its seed:
- every trunk parameter and BN statistic is the source's (a shape that differs is a
  one-line error naming it);
- the head is the source's when its shape fits and init_head='auto'; otherwise
  (another number of classes, or init_head='new') it is initialised from the run's seed;
- the optimizer state starts fresh and the step at 0.
Once the run has a checkpoint, a restart resumes from it and never reads the source again.

`freeze`: 'bn_stats' trains with every BN in inference mode (the pretrained statistics
normalise and are never updated, as small-batch fine-tuning does); 'trunk' trains only the
head (a linear probe; BN is frozen too).
"""

import contextlib
import logging
import os
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from resnet_jax import models, sharding
from resnet_jax.errors import UserError
from resnet_jax.training import stack
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.weights import torch_format

log = logging.getLogger(__name__)

HEAD = 'head'  # the classifier's name in models.ResNet
INIT_HEADS = ('auto', 'new')
FREEZES = ('none', 'bn_stats', 'trunk')
Variables = dict[str, Any]  # {'params': ..., 'batch_stats': ...}


def model_overrides(freeze: str) -> dict[str, Any]:
  """The model fields that `freeze` sets: BN in inference mode unless nothing is frozen."""
  return {} if freeze == 'none' else {'frozen_bn': True}


def frozen(tx: optax.GradientTransformation, freeze: str) -> optax.GradientTransformation:
  """`tx` for the trainable parameters; with freeze='trunk' every other update is zero
  (and the optimizer keeps no state for them)."""
  if freeze != 'trunk':
    return tx
  labels = lambda params: {
    name: jax.tree.map(lambda _, n=name: 'train' if n == HEAD else 'frozen', tree)
    for name, tree in params.items()
  }
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def load(source: str, expected: Variables, init_head: str, mesh: Mesh) -> Variables:
  """The weights in `source` that initialise a run whose variables are `expected`.

  Returns numpy variables in our layout; without a head when the run gets a new one.
  """
  if _is_workdir(source):
    state_dict = torch_format.to_torch(_from_workdir(source, mesh))
  else:
    state_dict = torch_format.read(source)
  want = torch_format.torch_shapes(expected)
  head = [k for k in want if k.startswith('fc.')]
  keep_head = init_head == 'auto' and all(
    k in state_dict and np.shape(state_dict[k]) == want[k] for k in head
  )
  variables = torch_format.from_torch(state_dict, expected, source, () if keep_head else (HEAD,))
  log.info('initialised from %s, %s', source, 'its head too' if keep_head else 'with a new head')
  return variables


def _is_workdir(source: str) -> bool:
  """Whether `source` names a workdir or WORKDIR/<member> (a member's directory holds only
  its metrics, or nothing yet) rather than a weights file."""
  if os.path.isdir(source):
    return True
  parent = os.path.dirname(os.path.normpath(source))
  is_file_name = source.endswith(('.safetensors', *torch_format.PTH_SUFFIXES))
  return not is_file_name and os.path.isdir(os.path.join(parent, 'checkpoints'))


def _from_workdir(path: str, mesh: Mesh) -> Variables:
  """params and batch_stats of the latest good checkpoint in workdir `path` (numpy), or of
  one member of a stack when `path` is WORKDIR/<member>."""
  path = os.path.normpath(path)
  member = None
  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    path, member = os.path.split(path)
    if not os.path.isdir(os.path.join(path, 'checkpoints')):
      raise UserError(
        f'init_from={os.path.join(path, member)} is a directory without checkpoints; give a '
        'workdir that has WORKDIR/checkpoints, or a .safetensors/.pth file.'
      )
  index = _member_index(path, member)
  with contextlib.closing(Checkpoints(path, read_only=True)) as checkpoints:
    saved = checkpoints.restore_as_saved(sharding.replicated(mesh))
  if saved is None:
    raise UserError(f'init_from={path} has no checkpoint yet; train it first or give another.')
  variables = sharding.host_copy({k: saved[k] for k in ('params', 'batch_stats')})
  return variables if index is None else jax.tree.map(lambda x: x[index], variables)


class _Recorded(dict):
  """A recorded config (workdir.read_config), read as stack.members reads a config."""

  def __getattr__(self, name: str) -> Any:
    return self[name]


def _member_index(path: str, member: str | None) -> int | None:
  """Which member of the stack trained in workdir `path` is called `member` (None: `path`
  holds a single run); a one-line error when the two do not go together."""
  recorded = _Recorded(workdir_lib.read_config(path) or {})
  if not any(recorded.get(f) for f in stack.FIELDS):
    if member is not None:
      raise UserError(
        f'init_from={os.path.join(path, member)}: {path} holds a single run, not a stack; '
        f'give init_from={path}.'
      )
    return None
  overrides = {
    k.split('.', 1)[1]: v
    for k, v in recorded.items()
    if k.startswith('model_overrides.') and v is not None
  }
  residual = models.model_kwargs(recorded['model'], overrides)['residual']
  names = [m.name for m in stack.members(recorded, residual)]
  if member not in names:
    raise UserError(
      f'init_from={path} holds a stack of {len(names)} runs; name one as '
      f'init_from={path}/MEMBER, MEMBER one of: {", ".join(names)}.'
    )
  return names.index(member)


def initialise(state: Any, pretrained: Variables, stacked: bool, mesh: Mesh) -> Any:
  """`state` (a TrainState, fresh from the run's seed) with the `pretrained` variables in
  place of its own; a stack's members all get the same ones."""
  target = sharding.replicated(mesh)

  def merge(fresh: Any, loaded: Any) -> Any:
    flat = traverse_util.flatten_dict(fresh)
    for path, value in traverse_util.flatten_dict(loaded).items():
      shape = flat[path].shape
      value = np.broadcast_to(value, shape) if stacked else value
      flat[path] = jax.make_array_from_callback(shape, target, lambda i, v=value: v[i])
    return traverse_util.unflatten_dict(flat)

  return state.replace(
    params=merge(state.params, pretrained['params']),
    batch_stats=merge(state.batch_stats, pretrained['batch_stats']),
  )
