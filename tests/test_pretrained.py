"""Fine-tuning from pretrained weights (resnet_jax.training.finetune): init_from, init_head, freeze.

The source is a real trained net: the 14-layer ResNet of the `mnist_workdir` fixture
(300 MNIST steps, >= 97% test top-1), exported to a torchvision-layout file.
"""

import contextlib

import jax
import numpy as np
import pytest
from conftest import mnist_config
from flax import traverse_util

from resnet_jax import sharding
from resnet_jax.errors import UserError
from resnet_jax.training import torch_weights, train
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.training.metrics import read_metrics
from resnet_jax.weights import torch_format


def _state(config, workdir):
  return train.read_checkpoint(train.build(config, check_data=False), config, str(workdir))


def _flat(tree) -> dict:
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _probe(tfds_dir, workdir, **fields):
  """A 40-step linear probe (freeze=trunk) on MNIST with a new head; its final eval row."""
  c = mnist_config(tfds_dir)
  c.update(dict(num_train_steps=40, warmup_steps=0, eval_every_steps=40, freeze='trunk'))
  c.update(dict(checkpoint_every_steps=40, log_every_steps=40, init_head='new', **fields))
  train.train_and_evaluate(c, str(workdir), sharding.make_mesh(jax.devices()[:1]))
  return c, [r for r in read_metrics(workdir) if 'eval_top1' in r][-1]


@pytest.mark.slow
def test_linear_probe_on_exported_weights_keeps_the_trunk_and_beats_a_random_one(
  tfds_dir, mnist_workdir, tmp_path
):
  weights = tmp_path / 'mnist_resnet14.safetensors'
  line = torch_weights.export_weights(mnist_config(tfds_dir), str(mnist_workdir), str(weights))
  assert 'torchvision has no such net' in line  # a CIFAR-style net: the weights still map
  config, pretrained_row = _probe(tfds_dir, tmp_path / 'probe', init_from=str(weights))
  _, scratch_row = _probe(tfds_dir, tmp_path / 'scratch')
  print('probe top-1: pretrained', pretrained_row['eval_top1'], 'random', scratch_row['eval_top1'])
  assert pretrained_row['eval_top1'] >= 0.95
  assert pretrained_row['eval_top1'] >= scratch_row['eval_top1'] + 0.1

  source = _state(mnist_config(tfds_dir), mnist_workdir)
  tuned = _state(config, tmp_path / 'probe')
  before, after = _flat(source.params), _flat(tuned.params)
  for name in before:  # the trunk is frozen bitwise, the new head trained
    same = np.array_equal(before[name], after[name])
    assert same != name.startswith('head/'), name
  for name, value in _flat(source.batch_stats).items():  # frozen BN statistics too
    assert np.array_equal(value, _flat(tuned.batch_stats)[name]), name


def test_init_from_a_stack_member_and_its_errors(tfds_dir, mnist_workdir, tmp_path):
  """A fresh state takes the source's weights (head included when it fits); a stack's
  members all get them; a stack source needs WORKDIR/<member>."""
  c = mnist_config(tfds_dir)
  c.update(dict(init_from=str(mnist_workdir), stack_seeds=(0, 1)))
  setup = train.build(c, check_data=False)
  stacked = setup.create_state(0)
  source = _flat(_state(mnist_config(tfds_dir), mnist_workdir).params)
  for name, value in _flat(stacked.params).items():
    assert np.array_equal(value[0], source[name]) and np.array_equal(value[1], source[name])

  # That stack as a source, with member seed1's parameters moved by +1, saved as a run
  # of the stack would save it.
  moved = stacked.replace(params=jax.tree.map(lambda x: x.at[1].add(1.0), stacked.params))
  (tmp_path / 'stack').mkdir()
  workdir_lib.record_config(c, str(tmp_path / 'stack'))
  with contextlib.closing(Checkpoints(str(tmp_path / 'stack'))) as checkpoints:
    checkpoints.save(1, moved)
  single = mnist_config(tfds_dir)
  with pytest.raises(UserError, match='holds a stack of 2 runs; name one as'):
    single.init_from = str(tmp_path / 'stack')
    train.build(single, check_data=False).create_state(0)
  single.init_from = str(tmp_path / 'stack' / 'seed1')
  member = train.build(single, check_data=False).create_state(0)
  for name, value in _flat(member.params).items():
    assert np.array_equal(value, source[name] + np.float32(1.0)), name
  # Export picks the member too; its file holds what init_from read.
  with pytest.raises(UserError, match='choose --member= one of: seed0, seed1'):
    torch_weights.export_weights(c, str(tmp_path / 'stack'), str(tmp_path / 'm.safetensors'))
  torch_weights.export_weights(
    c, str(tmp_path / 'stack'), str(tmp_path / 'm.safetensors'), None, 'seed1'
  )
  exported = torch_format.read(str(tmp_path / 'm.safetensors'))
  assert np.array_equal(
    exported['conv1.weight'].transpose(2, 3, 1, 0), source['stem_conv/kernel'] + 1
  )
  single.init_from = str(tmp_path / 'nothing_here')
  with pytest.raises(UserError, match='no such weights file'):
    train.build(single, check_data=False).create_state(0)


def test_freeze_choices_are_checked(tfds_dir):
  c = mnist_config(tfds_dir)
  c.freeze = 'head'
  with pytest.raises(UserError, match=r"freeze='head' is invalid: it must be one of none"):
    train.build(c, check_data=False)
