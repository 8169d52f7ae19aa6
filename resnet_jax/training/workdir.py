"""The workdir's contract: it is writable, and it remembers the config that made it.

The first start writes WORKDIR/config.json. A restart compares its config with it:
- bookkeeping fields (`FREE_FIELDS`: log/eval/checkpoint intervals, data_dir, ...) and
  the model's implementation switches (`models.IMPL_FIELDS`) may change freely;
- fields that define the train state (`STATE_FIELDS`: model, its overrides, dataset,
  optimizer, a stack's members) can never change: the checkpoints hold another state;
- every other field changes what the run computes (batch size, seed, schedule, ...): a
  change stops the run, unless it is named in --allow_config_change (e.g. a longer
  schedule), in which case the new config is recorded and the old one kept beside it.
A refused restart raises a UserError naming the fields and touches nothing. A workdir
that holds no history yet (no checkpoint, no metrics) just takes the new config.
"""

import json
import logging
import os
import uuid
from collections.abc import Iterable
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax.errors import UserError
from resnet_jax.models import IMPL_FIELDS

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'

# Bookkeeping: how the run is observed and stored, never what it computes.
FREE_FIELDS = frozenset(
  {
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'on_nonfinite_loss',
    'profile_steps',
    'compilation_cache_dir',
    'data_dir',
    'prefetch_batches',
    'eval_batch_size',
    'stack_method',  # how a stack's members share the program, not what they compute
    # How the model computes its function (same parameters), e.g. to suit another chip.
    *(f'model_overrides.{field}' for field in IMPL_FIELDS),
  }
)
# The train state's structure: a change cannot be restored, whatever the flags say.
STATE_FIELDS = (
  'model',
  'model_overrides',
  'dataset',
  'optimizer',
  'freeze',  # freeze=trunk keeps optimizer state for the head only
  'stack_seeds',
  'stack_residual',
)
# What an evaluation of a checkpoint depends on.
EVAL_FIELDS = (*STATE_FIELDS, 'dtype', 'image_size', 'normalize', 'bn_group_size')


def prepare(workdir: str) -> None:
  """Create `workdir` if needed and check that it and its checkpoints dir take new files."""
  if '://' in workdir:  # gs:// and other remote filesystems: orbax and tfds check them
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory; choose another --workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f'cannot create --workdir={workdir}: {e.strerror}; choose a writable --workdir.'
    ) from e
  for d in (workdir, os.path.join(workdir, 'checkpoints')):
    if os.path.isdir(d):
      _probe_writable(d)


def _probe_writable(directory: str) -> None:
  # os.access does not see read-only mounts or immutable directories (and root passes it).
  probe = os.path.join(directory, f'.write_probe_{uuid.uuid4().hex}')
  try:
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'{directory} is not writable ({e.strerror}); fix its permissions or choose another '
      '--workdir.'
    ) from e


def flatten(config: Any) -> dict[str, Any]:
  """{'model_overrides.shortcut': 'A', ...}: the config as JSON values, one key per field."""
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update({f'{key}.{k}': v for k, v in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Fields whose values differ (or that only one of the two has), sorted."""
  return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def _top(field: str) -> str:
  return field.split('.')[0]


def _describe(fields: Iterable[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
  return ', '.join(f'{f} ({saved.get(f)!r} -> {current.get(f)!r})' for f in fields)


def read_config(workdir: str) -> dict[str, Any] | None:
  """The flattened config recorded in WORKDIR/config.json, or None if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(
      f'{path} is unreadable ({e}); restore it from the run`s records, or remove it to '
      'record the config of this start.'
    ) from e


def check_config(
  config: Any, workdir: str, allow: Iterable[str] = (), for_eval: bool = False
) -> list[str]:
  """Compare `config` with WORKDIR/config.json; UserError if the run may not go on with it.

  Returns the fields that differ and are allowed to (empty on a first start). With
  `for_eval`, only what evaluation depends on is compared.
  """
  saved = read_config(workdir)
  return [] if saved is None else _allowed_changes(saved, config, workdir, allow, for_eval)


def _allowed_changes(
  saved: dict[str, Any], config: Any, workdir: str, allow: Iterable[str], for_eval: bool
) -> list[str]:
  """check_config against the recorded (flattened) config `saved`."""
  current = flatten(config)
  changed = [f for f in differences(saved, current) if f not in FREE_FIELDS]
  if for_eval:
    changed = [f for f in changed if _top(f) in EVAL_FIELDS]
  else:
    changed = [f for f in changed if _top(f) not in FREE_FIELDS]
  allow = set(allow)
  unknown = sorted(a for a in allow if not any(a in (f, _top(f)) for f in current))
  if unknown:
    raise UserError(
      f'--allow_config_change names unknown fields: {", ".join(unknown)}; '
      'configs/default.py lists every field.'
    )
  refused = [f for f in changed if not allow & {f, _top(f)} or _top(f) in STATE_FIELDS]
  if refused:
    state = [f for f in refused if _top(f) in STATE_FIELDS]
    allow_flag = '--allow_config_change=' + ','.join(sorted({_top(f) for f in refused}))
    fix = (
      f'evaluate with the config that trained it (recorded in {CONFIG_FILE})'
      + ('' if state else f', or add {allow_flag} to evaluate with this one deliberately')
      if for_eval
      else 'these define the model and optimizer state: use a new --workdir'
      if state
      else f'use a new --workdir, or {allow_flag} to change them deliberately'
    )
    raise UserError(
      f'the config differs from the one that made {workdir} ({CONFIG_FILE}): '
      f'{_describe(refused, saved, current)}; {fix}.'
    )
  return changed


def record_config(config: Any, workdir: str, previous_step: int | None = None) -> None:
  """Write WORKDIR/config.json atomically (process 0); an older one is kept as
  config.step<N>.json when `previous_step` is given (an allowed change at step N)."""
  if jax.process_index() == 0:
    root = epath.Path(workdir)
    path = root / CONFIG_FILE
    if previous_step is not None and path.exists():
      path.copy(root / f'config.step{previous_step}.json', overwrite=True)
    tmp = root / f'{CONFIG_FILE}.tmp'
    tmp.write_text(json.dumps(flatten(config), indent=1, sort_keys=True) + '\n')
    tmp.replace(path)
  multihost_utils.sync_global_devices('record config')


def has_history(workdir: str) -> bool:
  """Whether the workdir holds anything a wrong config could cost: checkpoints or metrics."""
  root = epath.Path(workdir)
  for name in ('checkpoints', 'checkpoints_damaged'):
    d = root / name
    # Step directories, not the checkpoints' format marker written before the first save.
    if d.exists() and any(p.is_dir() for p in d.iterdir()):
      return True
  metrics = root / 'metrics.jsonl'
  return metrics.exists() and bool(metrics.read_text().strip())


def check_and_record(config: Any, workdir: str, allow: Iterable[str] = ()) -> None:
  """At a training start: refuse a config that does not fit the workdir, else record it."""
  if not has_history(workdir):
    record_config(config, workdir)
    return
  saved = read_config(workdir)
  if saved is None:
    log.info('recording the config of this run in %s (the workdir had none)', CONFIG_FILE)
    record_config(config, workdir)
    return
  changed = _allowed_changes(saved, config, workdir, allow, for_eval=False)
  if changed:
    log.warning('deliberate config change: %s', _describe(changed, saved, flatten(config)))
    record_config(config, workdir, previous_step=_latest_step(workdir))


def _latest_step(workdir: str) -> int:
  d = epath.Path(workdir) / 'checkpoints'
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
  return max(steps, default=0)
