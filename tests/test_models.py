"""The model zoo is the paper's networks: counts, shapes, shortcuts, precision."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.models import resnet, summary

# ../shared/REFERENCE.md section 1.
PARAMS = {
  'resnet18': 11_689_512,
  'resnet34': 21_797_672,
  'resnet50': 25_557_032,
  'resnet101': 44_549_160,
  'resnet152': 60_192_808,
  'plain18': 11_515_688,
  'plain34': 21_623_848,
  'plain50': 22_780_456,
  'plain101': 41_772_584,
  'plain152': 57_416_232,
  'cifar_resnet20': 269_722,
  'cifar_resnet32': 464_154,
  'cifar_resnet44': 658_586,
  'cifar_resnet56': 853_018,
  'cifar_resnet110': 1_727_962,
  'cifar_resnet1202': 19_421_274,
  'cifar_plain20': 269_722,
  'cifar_plain32': 464_154,
  'cifar_plain44': 658_586,
  'cifar_plain56': 853_018,
  'cifar_plain110': 1_727_962,
}
GMACS = {
  'resnet18': 1.81,
  'resnet34': 3.66,
  'resnet50': 4.09,
  'resnet101': 7.80,
  'resnet152': 11.51,
}


def _abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, mutable=True), x)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_param_counts_match_the_paper_and_torchvision(name):
  shape = (32, 32, 3) if name.startswith('cifar') else (224, 224, 3)
  assert _count(_abstract_variables(models.build_model(name), shape)['params']) == PARAMS[name]


@pytest.mark.parametrize('name', ['resnet18', 'resnet34'])
def test_option_a_has_the_plain_param_count(name):
  model = models.build_model(name, shortcut='A')
  plain = name.replace('resnet', 'plain')
  assert _count(_abstract_variables(model, (224, 224, 3))['params']) == PARAMS[plain]


@pytest.mark.parametrize('name', sorted(GMACS))
def test_gmacs_at_224(name):
  rows = summary.summarize(models.build_model(name), (224, 224, 3))
  gmacs = sum(r.macs for r in rows) / 1e9
  assert gmacs == pytest.approx(GMACS[name], rel=0.02)


def test_stride_placement_v1_moves_the_stride_to_the_first_1x1():
  macs = {
    p: sum(
      r.macs
      for r in summary.summarize(models.build_model('resnet50', stride_placement=p), (224, 224, 3))
    )
    for p in ('v1', 'v1.5')
  }
  # The 3x3 of each downsampling block then runs at the lower resolution.
  assert macs['v1'] < macs['v1.5'] * 0.96


@pytest.mark.parametrize(
  'name,channels', [('resnet34', (64, 128, 256, 512)), ('resnet50', (256, 512, 1024, 2048))]
)
def test_stage_shapes_follow_the_design_note(name, channels):
  inter = _abstract_variables(models.build_model(name), (224, 224, 3))['intermediates']
  assert inter['stem'][0].shape == (1, 56, 56, 64)
  for i, (size, ch) in enumerate(zip((56, 28, 14, 7), channels, strict=True)):
    assert inter[f'stage{i + 1}'][0].shape == (1, size, size, ch)


def test_stem_conv_output_is_112():
  rows = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      rows[context.module.name] = out.shape
    return out

  with nn.intercept_methods(record):
    _abstract_variables(models.build_model('resnet34'), (224, 224, 3))
  assert rows['stem_conv'] == (1, 112, 112, 64)


def test_mnist_resnet34_runs_on_28x28x1():
  model = models.build_model('mnist_resnet34')
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  variables = _init(model, x)
  logits, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert state['intermediates']['stage4'][0].shape == (2, 1, 1, 512)
  assert np.isfinite(np.asarray(logits)).all()


def test_option_a_zero_pads_and_subsamples():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  out = resnet._shortcut(x, 6, 2, 'A', conv=None, norm=None)
  expected = np.concatenate([np.asarray(x)[:, ::2, ::2, :], np.zeros((2, 2, 2, 3))], axis=-1)
  np.testing.assert_array_equal(np.asarray(out), expected)
  # Where the shape does not change, option A (and B) are the identity.
  assert resnet._shortcut(x, 3, 1, 'A', conv=None, norm=None) is x


def test_shortcut_options_place_projections():
  def projected_blocks(shortcut):
    params = _abstract_variables(models.build_model('resnet34', shortcut=shortcut), (64, 64, 3))[
      'params'
    ]
    blocks = [k for k in params if k.startswith('stage')]
    return len(blocks), sum('proj_conv' in params[k] for k in blocks)

  assert projected_blocks('A') == (16, 0)
  assert projected_blocks('B') == (16, 3)  # first block of stages 2-4
  assert projected_blocks('C') == (16, 16)  # every block


def test_plain_net_has_no_shortcuts():
  params = _abstract_variables(models.build_model('plain34', shortcut='C'), (64, 64, 3))['params']
  assert not any('proj_conv' in v for k, v in params.items() if k.startswith('stage'))


@pytest.mark.parametrize('residual', [True, False])
def test_zero_last_bn_scale_makes_residual_blocks_identity(residual):
  name = 'cifar_resnet20' if residual else 'cifar_plain20'
  model = models.build_model(name, zero_init_last_bn=True)
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  variables = _init(model, x)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  stem, stage1 = state['intermediates']['stem'][0], state['intermediates']['stage1'][0]
  # Stage 1 keeps the shape; its input is post-ReLU, so relu(x + 0) == x.
  if residual:
    np.testing.assert_allclose(np.asarray(stage1), np.asarray(stem), rtol=0, atol=0)
  else:
    assert not np.allclose(np.asarray(stage1), np.asarray(stem))


def test_bfloat16_forward_matches_float32():
  x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  f32 = models.build_model('cifar_resnet20')
  bf16 = models.build_model('cifar_resnet20', dtype='bfloat16')
  variables = _init(f32, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_init(bf16, x)['params']))
  out32, _ = f32.apply(variables, x, train=True, mutable=['batch_stats'])
  out16, _ = bf16.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out32.dtype == jnp.float32 and out16.dtype == jnp.float32
  rel = jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)
  assert rel < 2e-2, rel


def test_group_batch_norm_normalises_each_group():
  x = jax.random.normal(jax.random.key(4), (8, 3, 3, 5)) * 3 + jnp.arange(8)[:, None, None, None]
  full = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  grouped_all = models.GroupBatchNorm(group_size=8)
  v = full.init(jax.random.key(0), x)
  y_full, s_full = full.apply(v, x, mutable=['batch_stats'])
  y_grp, s_grp = grouped_all.apply(v, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y_grp, y_full, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s_grp, s_full)
  y2, _ = models.GroupBatchNorm(group_size=2).apply(v, x, mutable=['batch_stats'])
  group_means = np.asarray(y2).reshape(4, -1, 5).mean(axis=1)
  np.testing.assert_allclose(group_means, 0, atol=1e-4)


def test_group_batch_norm_in_a_model_under_jit():
  model = models.build_model('cifar_resnet20', bn_group_size=2)
  x = jax.random.normal(jax.random.key(5), (8, 32, 32, 3))
  variables = _init(model, x)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, x
  )
  assert logits.shape == (8, 10)


def test_unknown_names_and_fields_are_one_line_errors():
  with pytest.raises(UserError) as e:
    models.build_model('resnet51')
  assert str(e.value) == (
    "unknown model 'resnet51'; did you mean resnet50 or resnet18 or resnet152? "
    '`resnet-jax-summary --list` lists all 23 models.'
  )
  with pytest.raises(UserError, match=r"unknown model 'zzz'; `resnet-jax-summary --list`"):
    models.build_model('zzz')
  with pytest.raises(UserError, match='unknown model field.*shortcutt'):
    models.build_model('resnet18', shortcutt='A')
  with pytest.raises(UserError, match='shortcut .D.'):
    models.build_model('resnet18', shortcut='D')


def test_summary_cli_json_and_unknown_name(capsys):
  assert summary.main(['cifar_resnet20', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['params'] == PARAMS['cifar_resnet20'] and isinstance(out['gmacs'], float)
  assert summary.main(['mnist_resnet34']) == 0
  assert '21,283,530' in capsys.readouterr().out
  assert summary.main(['nope']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: unknown model') and '\n' not in err
  assert summary.main(['--list']) == 0
  assert capsys.readouterr().out.split() == list(models.ARCHITECTURES)


def test_model_and_summary_import_without_tensorflow():
  code = (
    'import sys; import resnet_jax.models, resnet_jax.models.summary; '
    "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
  )
  subprocess.run([sys.executable, '-c', code], check=True)
