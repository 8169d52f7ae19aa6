"""torchvision/timm weights in and out (weights.torch_format, commands.convert), no torch.

The parity fixture (tests/fixtures/torchvision_parity.npz) holds what torchvision computed
from numpy-generated weights (tests/fixtures/make_torchvision_parity.py, versions inside);
here the same weights are generated again, converted, and run through our models.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.training import torch_weights, train
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.weights import torch_format as tw
from tests.fixtures import torchvision_parity as tp

REPO = Path(__file__).resolve().parents[1]
FIXTURE = np.load(REPO / 'tests' / 'fixtures' / 'torchvision_parity.npz')
EPS = np.finfo(np.float32).eps


def _model(name: str) -> models.ResNet:
  return models.build_model(name)


def _expected(model: models.ResNet, size: int = tp.SIZE) -> dict:
  return models.variable_shapes(model, (size, size, 3))


def _generated(model: models.ResNet) -> dict[str, np.ndarray]:
  """The fixture's torchvision-layout state dict, num_batches_tracked included."""
  shapes = tw.torch_shapes(_expected(model))
  state = {k: tp.tensor(k, s) for k, s in shapes.items()}
  state.update(
    {
      k.replace('running_mean', 'num_batches_tracked'): tp.tensor(
        k.replace('running_mean', 'num_batches_tracked'), ()
      )
      for k in shapes
      if 'running_mean' in k
    }
  )
  return state


def test_fixture_records_its_versions_and_timm_agreement():
  provenance = json.loads(str(FIXTURE['provenance']))
  assert {'torch', 'torchvision', 'numpy'} <= provenance['versions'].keys()
  for name in tp.NETS:  # timm's model of the same name computed the same logits
    assert provenance['nets'][name].get('timm_max_abs_diff', 0.0) == 0.0


@pytest.mark.parametrize('name', tp.NETS)
def test_converted_weights_compute_torchvisions_logits_and_bn_statistics(name):
  """Eval and train mode, basic and bottleneck blocks: torchvision's numbers from its own
  weights. Tolerances: float32 sums over up to 4,608 products per conv, 50 layers deep
  (observed 7e-7 relative in eval, up to 8e-5 in train mode, where BN divides by the
  standard deviation of 16 values); a wrong layout is off by O(1)."""
  model = _model(name)
  variables = tw.from_torch(_generated(model), _expected(model), 'fixture')
  x = tp.images()
  logits = np.asarray(model.apply(variables, x, train=False))
  reference = FIXTURE[f'{name}/eval_logits']
  scale = np.abs(reference).max()
  print(name, 'eval', np.abs(logits - reference).max() / scale)
  assert np.abs(logits - reference).max() <= 1e-5 * scale

  logits, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  reference = FIXTURE[f'{name}/train_logits']
  print(name, 'train', np.abs(np.asarray(logits) - reference).max() / scale)
  assert np.abs(np.asarray(logits) - reference).max() <= 1e-3 * np.abs(reference).max()

  state = tw.to_torch(jax.device_get(updated))
  before = _generated(model)
  k = tp.STATS_KEPT
  names, counts = FIXTURE[f'{name}/bn_names'], FIXTURE[f'{name}/bn_counts']
  for i, (bn, n) in enumerate(zip(names, counts, strict=True)):
    mean = state[f'{bn}.running_mean'][:k]
    np.testing.assert_allclose(mean, FIXTURE[f'{name}/running_mean'][i], rtol=0, atol=3e-5)
    # torch averages in the unbiased batch variance, flax the biased one: the same update
    # once torch's batch term is scaled by (n - 1) / n.
    old = 0.9 * before[f'{bn}.running_var'][:k]
    torch_var = FIXTURE[f'{name}/running_var'][i]
    as_flax = old + (torch_var - old) * (n - 1) / n
    np.testing.assert_allclose(state[f'{bn}.running_var'][:k], as_flax, rtol=1e-4)
  # The difference is real where a channel's statistics cover few values (16 at the end):
  # uncorrected, the last BN is at least 10x further from torch than corrected.
  ours, theirs = state[f'{names[-1]}.running_var'][:k], FIXTURE[f'{name}/running_var'][-1]
  assert np.abs(ours - theirs).max() > 10 * np.abs(ours - as_flax).max()


def test_import_export_import_is_bitwise(tmp_path):
  model = _model('resnet50')
  state = _generated(model)
  variables = tw.from_torch(state, _expected(model), 'fixture')
  exported = tw.to_torch(variables, num_batches_tracked=100)
  assert exported.keys() == state.keys()
  for key, value in state.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  tw.write(exported, str(tmp_path / 'w.safetensors'), {'model': 'resnet50'})
  again = tw.from_torch(tw.read(str(tmp_path / 'w.safetensors')), _expected(model), 'file')
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(again), strict=True
  ):
    assert np.array_equal(a, b), path


def test_timm_file_without_counters_and_half_precision_reads(tmp_path):
  """timm's hub files may leave out num_batches_tracked and store float16."""
  model = _model('resnet18')
  state = {k: v.astype(np.float16) for k, v in _generated(model).items() if v.ndim}
  tw.write(state, str(tmp_path / 'model.safetensors'), {})
  variables = tw.from_torch(tw.read(str(tmp_path / 'model.safetensors')), _expected(model), 'f')
  kernel = variables['params']['stage1_block1']['conv1']['kernel']
  assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 64, 64)


def test_mismatches_are_one_line_errors_naming_the_first():
  model = _model('resnet18')
  state = _generated(model)
  expected = _expected(model)
  cases = {
    'it has no layer1.0.conv1.weight': {
      k: v for k, v in state.items() if k != 'layer1.0.conv1.weight'
    },
    'it has extra.weight, which the model does not': {**state, 'extra.weight': np.zeros(3)},
    'fc.bias is [10] there, [1000] in the model': {
      **state,
      'fc.weight': np.zeros((10, 512), np.float32),
      'fc.bias': np.zeros(10, np.float32),
    },
  }
  for phrase, bad in cases.items():
    with pytest.raises(UserError, match='does not fit the model') as e:
      tw.from_torch(bad, expected, 'w.safetensors')
    assert phrase in str(e.value) and '\n' not in str(e.value)
  resnet50 = _generated(_model('resnet50'))
  with pytest.raises(UserError, match=r'holds bottleneck blocks 3-4-6-3 \(torchvision resnet50\)'):
    tw.from_torch(resnet50, expected, 'r50.safetensors')


def _timm_resnet50d(state: dict) -> dict:
  """resnet50's state dict in the layout of timm's resnet50d: a deep stem of three 3x3 convs
  and average-pool shortcuts (the conv moves from downsample.0 to downsample.1)."""
  d = {k: v for k, v in state.items() if not k.startswith('conv1.')}
  for i, (cout, cin) in zip((0, 3, 6), ((32, 3), (32, 32), (64, 32)), strict=True):
    d[f'conv1.{i}.weight'] = np.zeros((cout, cin, 3, 3), np.float32)
  for k in [k for k in d if '.downsample.' in k]:
    block, rest = k.split('.downsample.')
    index, name = rest.split('.')
    d[f'{block}.downsample.{int(index) + 1}.{name}'] = d.pop(k)
  return d


def test_files_of_layouts_no_model_builds_are_named_for_what_they_hold():
  expected = _expected(_model('resnet50'))
  r50 = _generated(_model('resnet50'))
  with pytest.raises(UserError) as e:
    tw.from_torch(_timm_resnet50d(r50), expected, 'resnet50d.safetensors')
  message = str(e.value)
  assert 'torchvision resnet50' not in message and 'model_overrides' not in message
  assert "a deep stem of 3x3 convs (conv1.0..., as in timm's resnet*c/d)" in message
  assert 'average-pool shortcuts' in message and 'so this file cannot be imported' in message
  wide = {
    **r50,
    'layer1.0.conv1.weight': np.zeros((128, 64, 1, 1), np.float32),
    'layer1.0.conv3.weight': np.zeros((256, 128, 1, 1), np.float32),
  }
  with pytest.raises(UserError) as e:
    tw.from_torch(wide, expected, 'wide_resnet50_2.safetensors')
  assert 'bottlenecks that expand 2x, not 4x (as in wide_resnet50_2)' in str(e.value)
  assert 'torchvision resnet50' not in str(e.value)


def test_a_pickled_whole_model_says_to_save_the_state_dict(tmp_path, monkeypatch):
  """torch.load(weights_only=True) refuses a torch.save(model) file with a long, coloured
  message; the error is one plain line (a stand-in torch raises torch 2.x's text)."""
  import pickle
  import types

  def load(*args, **kwargs):
    raise pickle.UnpicklingError(
      'Weights only load failed. This file can still be loaded, to do so you have two '
      'options, \x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m.'
      '\n\t(1) ...\nWeightsUnpickler error: Unsupported global: GLOBAL '
      'torchvision.models.resnet.ResNet was not an allowed global by default.'
    )

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=load))
  (tmp_path / 'model.pth').write_bytes(b'\x80\x02')
  with pytest.raises(UserError) as e:
    tw.read(str(tmp_path / 'model.pth'))
  message = str(e.value)
  assert message == (
    f'{tmp_path / "model.pth"} holds a pickled torchvision.models.resnet.ResNet object '
    '(torch.save(model)), not a state dict; save model.state_dict() instead: '
    'torch.save(model.state_dict(), PATH).'
  )


def test_write_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
  target = tmp_path / 'w.safetensors'
  target.write_bytes(b'made by someone else while the model was being built')
  with pytest.raises(UserError, match='w.safetensors exists; give a new --to file'):
    tw.write({'a': np.zeros(3, np.float32)}, str(target), {})
  assert target.read_bytes() == b'made by someone else while the model was being built'
  assert [p.name for p in tmp_path.iterdir()] == ['w.safetensors']  # no temporary left


def test_unreadable_files_are_one_line_errors(tmp_path):
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'not a safetensors file')
  with pytest.raises(UserError, match='not a readable safetensors file'):
    tw.read(str(bad))
  with pytest.raises(UserError, match='no such weights file'):
    tw.read(str(tmp_path / 'missing.safetensors'))
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(UserError, match='unknown weights format'):
    tw.read(str(tmp_path / 'w.npz'))


def test_pth_without_torch_says_how_to_make_safetensors(tmp_path):
  (tmp_path / 'r18.pth').write_bytes(b'\x80\x02}q\x00.')  # a pickle, never unpickled here
  code = (
    'import sys; sys.modules["torch"] = None\n'
    'from resnet_jax.weights import torch_format\n'
    f'torch_format.read({str(tmp_path / "r18.pth")!r})\n'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
  last = result.stderr.strip().splitlines()[-1]
  assert 'needs torch, which is not installed' in last and 'r18.safetensors' in last, last


def test_torchvision_differences_name_what_torchvision_cannot_build():
  assert tw.torchvision_name(_model('resnet50')) == 'resnet50'
  assert tw.torchvision_name(models.build_model('resnet18', num_classes=10)) == 'resnet18'
  why = tw.torchvision_differences(_model('cifar_resnet20'))
  assert any('stem' in w for w in why) and any("shortcut='A'" in w for w in why)
  assert tw.torchvision_differences(models.build_model('resnet50', stride_placement='v1'))


def _imagenet_like(workdir_config: dict | None = None):
  """resnet18 at 64x64 on synthetic data: the ImageNet layout, cheap to build."""
  c = default.imagenet('resnet18')
  c.update(dict(dataset='synthetic', image_size=tp.SIZE, dtype='float32', batch_size=8))
  c.update(dict(eval_batch_size=8, compilation_cache_dir='', **(workdir_config or {})))
  return c


def test_convert_imports_a_workdir_then_exports_the_same_weights(tmp_path):
  model = _model('resnet18')
  source = tmp_path / 'r18.safetensors'
  tw.write(_generated(model), str(source), {})
  config = _imagenet_like()
  line = torch_weights.import_weights(config, str(tmp_path / 'w'), str(source))
  assert 'as step 0 of' in line
  setup = train.build(config, check_data=False)
  checkpoints = Checkpoints(str(tmp_path / 'w'), read_only=True)
  assert checkpoints.steps() == [0]
  state = checkpoints.restore(setup.abstract_state())
  checkpoints.close()
  assert int(state.step) == 0
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, tp.images(), train=False
  )
  np.testing.assert_allclose(logits, FIXTURE['resnet18/eval_logits'], atol=1e-5 * 0.6)

  with pytest.raises(UserError, match='already holds a run'):
    torch_weights.import_weights(config, str(tmp_path / 'w'), str(source))
  line = torch_weights.export_weights(
    config, str(tmp_path / 'w'), str(tmp_path / 'back.safetensors')
  )
  assert 'torchvision.models.resnet18(num_classes=1000)' in line
  back = tw.read(str(tmp_path / 'back.safetensors'))
  original = tw.read(str(source))
  assert back.keys() == original.keys()
  assert all(np.array_equal(back[k], original[k]) for k in back if back[k].ndim)
  with pytest.raises(UserError, match='exists; give a new --to file'):
    torch_weights.export_weights(config, str(tmp_path / 'w'), str(tmp_path / 'back.safetensors'))


def test_convert_cli_refuses_a_mismatching_file_in_one_line(tmp_path):
  tw.write(_generated(_model('resnet50')), str(tmp_path / 'r50.safetensors'), {})
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.commands.convert',
    '--config=configs/resnet18_imagenet.py',
    f'--workdir={tmp_path / "w"}',
    f'--from={tmp_path / "r50.safetensors"}',
    '--config.dataset=synthetic',
    '--config.compilation_cache_dir=',
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'torchvision resnet50' in last, last
  assert not (tmp_path / 'w' / 'checkpoints').exists() or not any(
    (tmp_path / 'w' / 'checkpoints').iterdir()
  )


def test_head_init_is_flax_default_as_documented():
  """The docs say the head starts as flax's default, not torchvision's: check it."""
  model = models.build_model('cifar_resnet20', num_classes=100)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  assert not np.asarray(params['head']['bias']).any()  # torchvision's bias is not zero
  std = float(np.std(params['head']['kernel']))  # 6,400 values: ~1% sampling error
  assert abs(std - 1 / np.sqrt(64)) < 0.05 / np.sqrt(64)  # LeCun normal: 1/sqrt(fan_in)
