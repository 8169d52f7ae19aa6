"""ResNet weights in torchvision's layout: torchvision and timm state dicts <-> our variables.

torchvision's `resnet18/34/50/101/152` and timm's ResNets of the same layout
(`resnet50.a1_in1k`, ...) compute what our `resnet*` models compute (option-B shortcuts,
v1.5 strides), so their state dicts map onto our variables one to one:

  ours (params / batch_stats)          torchvision / timm
  stem_conv, stem_bn                   conv1, bn1
  stage{i}_block{j}                    layer{i}.{j-1}
  .../conv{k}, .../bn{k}               .../conv{k}, .../bn{k}
  .../proj_conv, .../proj_bn           .../downsample.0, .../downsample.1
  head                                 fc
  conv kernel [H, W, I, O]             weight [O, I, H, W]
  dense kernel [I, O]                  weight [O, I]
  BN scale, bias                       weight, bias
  BN mean, var (batch_stats)           running_mean, running_var (+ num_batches_tracked)

The mapping is a renaming and a transpose, so a round trip is bitwise. Files: safetensors
(read and written with numpy, no torch needed) and torch's `.pth` (read only, through
torch's `weights_only` loader, which runs no pickled code).

Known differences, none of which changes what a converted net computes:
- BN running variance: flax updates it with the biased batch variance, torch with the
  unbiased one (n / (n - 1) larger; 2.5e-3 relative at n = 392). Outputs use the batch's
  biased variance in both.
- A fresh model's head: flax's default init (LeCun-normal kernel, zero bias), not
  torchvision's U(+-1/sqrt(fan_in)); the convolutions are He fan-out in both.
"""

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnet_jax.errors import UserError, first_line

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]  # {'params': nested dict, 'batch_stats': nested dict}

_MODULES = {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'head': 'fc'}
_BLOCK_MODULES = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}
# (collection, our leaf name) -> torch's tensor name.
_LEAVES = {
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('params', 'kernel'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
_BLOCK = re.compile(r'stage(\d+)_block(\d+)$')
_COUNTER = 'num_batches_tracked'


def _torch_module(path: tuple[str, ...]) -> str:
  """'layer1.0.downsample.0' for ('stage1_block1', 'proj_conv')."""
  if len(path) == 1 and path[0] in _MODULES:
    return _MODULES[path[0]]
  block = _BLOCK.match(path[0]) if len(path) == 2 else None
  if block is None:
    raise ValueError(f'{"/".join(path)} is not a module of a torchvision-layout ResNet')
  stage, index = int(block[1]), int(block[2])
  return f'layer{stage}.{index - 1}.{_BLOCK_MODULES.get(path[1], path[1])}'


def _permutation(ndim: int) -> tuple[int, ...]:
  """Ours -> torch: HWIO -> OIHW for a conv kernel, [I, O] -> [O, I] for a dense one."""
  return {4: (3, 2, 0, 1), 2: (1, 0)}[ndim]


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _entries(variables: Variables):
  """(torch name, collection, our path, leaf, permutation or None) for every leaf."""
  for collection in ('params', 'batch_stats'):
    for path, leaf in _leaves(variables.get(collection, {})):
      key = f'{_torch_module(path[:-1])}.{_LEAVES[collection, path[-1]]}'
      perm = _permutation(len(leaf.shape)) if path[-1] == 'kernel' else None
      yield key, collection, path, leaf, perm


def torch_shapes(variables: Variables) -> dict[str, tuple[int, ...]]:
  """{torch name: shape} of the state dict that `variables` (arrays or shape structs) map to.

  Leaves out num_batches_tracked, which holds no weights.
  """
  return {key: _torch_shape(leaf, perm) for key, _, _, leaf, perm in _entries(variables)}


def _torch_shape(leaf: Any, perm: tuple[int, ...] | None) -> tuple[int, ...]:
  return tuple(leaf.shape[i] for i in perm) if perm else tuple(leaf.shape)


def to_torch(variables: Variables, num_batches_tracked: int = 0) -> StateDict:
  """The torchvision-layout state dict of `variables` (numpy), with every BN's counter."""
  state: StateDict = {}
  for key, _, _, leaf, perm in _entries(variables):
    x = np.asarray(leaf)
    state[key] = np.ascontiguousarray(np.transpose(x, perm)) if perm else x
    if key.endswith('.running_mean'):
      state[key.replace('running_mean', _COUNTER)] = np.asarray(num_batches_tracked, np.int64)
  return state


def from_torch(
  state_dict: Mapping[str, np.ndarray],
  expected: Variables,
  source: str,
  skip: tuple[str, ...] = (),
) -> Variables:
  """`state_dict` as our variables, after checking it holds exactly what `expected` has.

  `expected` gives the target's variables (arrays or shape structs; their dtypes are
  kept); modules of ours named in `skip` (e.g. 'head') are neither checked nor returned.
  The first missing, extra or misshapen tensor is a one-line UserError that also says
  what the file holds.
  """
  entries = [e for e in _entries(expected) if e[2][0] not in skip]
  want = {key: _torch_shape(leaf, perm) for key, _, _, leaf, perm in entries}
  have = {
    k: tuple(np.shape(v))
    for k, v in state_dict.items()
    if not k.endswith(_COUNTER) and not _in_modules(k, skip)
  }
  mismatch = first_mismatch(have, want)
  if mismatch:
    foreign = unbuildable_features(state_dict)
    fix = (
      f'no model here has {" or ".join(foreign)}, so this file cannot be imported'
      if foreign
      else 'use the model it was trained as (--config.model, --config.model_overrides.*)'
    )
    raise UserError(
      f'{source} does not fit the model: {mismatch} (it holds {describe(state_dict)}); {fix}.'
    )
  result: Variables = {'params': {}, 'batch_stats': {}}
  for key, collection, path, leaf, perm in entries:
    x = np.asarray(state_dict[key]).astype(leaf.dtype)
    node = result[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(np.transpose(x, np.argsort(perm)) if perm else x)
  return result


def _in_modules(torch_key: str, modules: tuple[str, ...]) -> bool:
  """Whether `torch_key` belongs to one of our top-level `modules` ('head' -> 'fc.*')."""
  return any(torch_key.startswith(f'{_MODULES.get(m, m)}.') for m in modules)


def first_mismatch(have: Mapping[str, tuple], want: Mapping[str, tuple]) -> str | None:
  """The first difference between two {name: shape} tables, as a phrase (None if equal)."""
  for name in sorted(want.keys() - have.keys(), key=_natural):
    return f'it has no {name}'
  for name in sorted(have.keys() - want.keys(), key=_natural):
    return f'it has {name}, which the model does not'
  for name in sorted(want, key=_natural):
    if tuple(have[name]) != tuple(want[name]):
      return f'{name} is {list(have[name])} there, {list(want[name])} in the model'
  return None


def _natural(name: str) -> list[Any]:
  """Sort key that puts layer1.2 before layer1.10."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def describe(state_dict: Mapping[str, np.ndarray]) -> str:
  """What a torchvision-layout state dict holds, e.g. 'bottleneck blocks 3-4-6-3
  (torchvision resnet50), 1000 classes', or 'bottleneck blocks 3-4-6-3 with a deep stem of
  three 3x3 convs ..., 1000 classes' for a layout torchvision does not build."""
  blocks: dict[int, set[int]] = {}
  for key in state_dict:
    match = re.match(r'layer(\d+)\.(\d+)\.', key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if not blocks:
    return 'no torchvision-layout ResNet blocks (layer1.0...)'
  kind = 'bottleneck' if any('.conv3.' in k for k in state_dict) else 'basic'
  sizes = tuple(len(blocks[s]) for s in sorted(blocks))
  foreign = unbuildable_features(state_dict)
  name = None if foreign else TORCHVISION_NETS.get((kind, sizes))
  fc = state_dict.get('fc.weight')
  classes = f', {np.shape(fc)[0]} classes' if fc is not None else ''
  named = f' (torchvision {name})' if name else ''
  features = f' with {", ".join(foreign)}' if foreign else ''
  return f'{kind} blocks {"-".join(map(str, sizes))}{named}{features}{classes}'


def unbuildable_features(state_dict: Mapping[str, np.ndarray]) -> list[str]:
  """What a state dict has that none of our ResNets builds (timm's deep stems and
  average-pool shortcuts, wide blocks): these files fit no config."""
  features = []
  if any(k.startswith('conv1.0.') for k in state_dict):
    features.append("a deep stem of 3x3 convs (conv1.0..., as in timm's resnet*c/d)")
  if any(
    re.match(r'layer\d+\.0\.downsample\.1\.weight$', k) and np.ndim(v) == 4
    for k, v in state_dict.items()
  ):
    features.append("average-pool shortcuts (downsample.1, as in timm's resnet*d)")
  inner, out = state_dict.get('layer1.0.conv1.weight'), state_dict.get('layer1.0.conv3.weight')
  if inner is not None and out is not None and np.shape(out)[0] != 4 * np.shape(inner)[0]:
    ratio = np.shape(out)[0] / np.shape(inner)[0]
    features.append(f'bottlenecks that expand {ratio:g}x, not 4x (as in wide_resnet50_2)')
  return features


TORCHVISION_NETS = {
  ('basic', (2, 2, 2, 2)): 'resnet18',
  ('basic', (3, 4, 6, 3)): 'resnet34',
  ('bottleneck', (3, 4, 6, 3)): 'resnet50',
  ('bottleneck', (3, 4, 23, 3)): 'resnet101',
  ('bottleneck', (3, 8, 36, 3)): 'resnet152',
}


def torchvision_name(model: Any) -> str | None:
  """The torchvision constructor (e.g. 'resnet50') that computes what `model` computes."""
  if torchvision_differences(model):
    return None
  return TORCHVISION_NETS[model.block, tuple(model.stage_sizes)]


def torchvision_differences(model: Any) -> list[str]:
  """How `model` (a models.ResNet) differs from what torchvision's ResNet class computes;
  empty when a torchvision-layout state dict runs the same function in both."""
  checks = [
    (model.stem == 'imagenet', f'stem={model.stem!r} (torchvision: a 7x7 conv and max pool)'),
    (model.residual, 'residual=False (torchvision has no plain nets)'),
    (model.shortcut == 'B', f'shortcut={model.shortcut!r} (torchvision: B)'),
    (
      model.block == 'basic' or model.stride_placement == 'v1.5',
      "stride_placement='v1' (torchvision: the stride in the 3x3 conv, v1.5)",
    ),
    (not model.bn_group_size, 'bn_group_size (torchvision: BN over the whole batch)'),
    (
      tuple(model.stage_widths) == (64, 128, 256, 512) and model.stem_width == 64,
      "stage_widths/stem_width other than torchvision's (64, 128, 256, 512) / 64",
    ),
    (
      (model.block, tuple(model.stage_sizes)) in TORCHVISION_NETS,
      f'{model.block} blocks {tuple(model.stage_sizes)} (not a torchvision constructor)',
    ),
  ]
  return [why for ok, why in checks if not ok]


# --- Files ----------------------------------------------------------------------------

PTH_SUFFIXES = ('.pth', '.pt', '.bin')  # torch.save files


def read(path: str) -> StateDict:
  """The state dict in a `.safetensors` or torch `.pth` file, as numpy arrays."""
  if not os.path.isfile(path):
    raise UserError(f'no such weights file: {path}; give a .safetensors or .pth file.')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file

    try:
      return load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
      raise UserError(f'{path} is not a readable safetensors file ({first_line(e)}).') from e
  if path.endswith(PTH_SUFFIXES):
    return _read_pth(path)
  raise UserError(f'{path}: unknown weights format; give a .safetensors or .pth file.')


def _read_pth(path: str) -> StateDict:
  try:
    import torch
  except ImportError:
    raise UserError(
      f'reading {path} needs torch, which is not installed; turn it into safetensors where '
      'torch is: python -c "import sys, torch, safetensors.torch as s; '
      's.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])" '
      f'{path} {os.path.splitext(path)[0]}.safetensors'
    ) from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - includes pickles that weights_only refuses
    raise UserError(_pth_problem(path, e)) from e
  # Training checkpoints often wrap the weights: {'model': state_dict, 'optimizer': ...}.
  for key in ('state_dict', 'model'):
    if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
      loaded = loaded[key]
  if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
    raise UserError(f'{path} holds no state dict of tensors; save model.state_dict().')
  # A model saved from DataParallel prefixes every name with 'module.'.
  return {
    k.removeprefix('module.'): v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    for k, v in loaded.items()
  }


def _pth_problem(path: str, error: Exception) -> str:
  """One line for a .pth that torch.load(weights_only=True) refuses.

  torch's own message is many lines with terminal colour codes; a whole pickled model
  (`torch.save(model)`) shows as an 'Unsupported global' of its class.
  """
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))
  unsupported = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text)
  if unsupported:
    return (
      f'{path} holds a pickled {unsupported[1]} object (torch.save(model)), not a state '
      'dict; save model.state_dict() instead: torch.save(model.state_dict(), PATH).'
    )
  line = ' '.join(text.split())
  return f'{path} is not a loadable torch state dict ({line[:120]}); save model.state_dict().'


def write(state_dict: StateDict, path: str, metadata: Mapping[str, Any]) -> None:
  """Write `state_dict` as the new safetensors file `path`: complete or not at all, and
  never over a file, even one created while this one was being written (a UserError).

  The file is written under a temporary name, then hard-linked to `path` (which fails if
  `path` exists); where the filesystem has no hard links, `path` is created exclusively
  and filled from the temporary file. `metadata` is stored in the file's header as JSON
  strings; 'format': 'pt' marks it as torch-layout, as safetensors.torch does.
  """
  from safetensors.numpy import save_file

  header = {'format': 'pt', **{k: json.dumps(v) for k, v in metadata.items()}}
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    save_file(state_dict, tmp, metadata=header)
    try:
      os.link(tmp, path)
    except FileExistsError:
      raise target_exists(path) from None
    except OSError:  # no hard links here
      _copy_exclusive(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def target_exists(path: str) -> UserError:
  """The error for an export whose target file is already there (it is never replaced)."""
  return UserError(f'{path} exists; give a new --to file (nothing was written).')


def _copy_exclusive(source: str, path: str) -> None:
  """Copy `source` to the new file `path` (UserError if it exists; no partial file left)."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    raise target_exists(path) from None
  try:
    with os.fdopen(fd, 'wb') as out, open(source, 'rb') as src:
      shutil.copyfileobj(src, out)
  except BaseException:
    os.remove(path)
    raise
