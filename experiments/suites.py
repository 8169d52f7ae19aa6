"""The ablation suites as declarations, and their expansion into main.py command lines.

A suite is a list of `Run`s (a config file, its overrides, how to label and plot the net,
the paper's number); `expand` turns it into one `Job` per run and seed: a directory
`<run name>/seed<k>` and the exact `python main.py ...` command that trains it.
"""

import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from resnet_jax import models
from resnet_jax.data import datasets
from resnet_jax.errors import UserError
from resnet_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's error (%) per run name: CIFAR-10 test error (Table 6, option A shortcuts) and
# ImageNet top-1 validation error, 10-crop (Tables 2 and 3).
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
_CIFAR_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
PAPER_ERROR: dict[str, float] = {
  **{f'cifar_resnet{d}': e for d, e in _CIFAR_TABLE6.items()},
  **{f'cifar_resnet{d}_A': e for d, e in _CIFAR_TABLE6.items()},
  'imagenet_plain18': 27.94,
  'imagenet_plain34': 28.54,
  'imagenet_resnet18_A': 27.88,
  'imagenet_resnet34_A': 25.03,
  'imagenet_resnet34_B': 24.52,
  'imagenet_resnet34_C': 24.19,
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One network of a suite: how main.py trains it, and how the report shows it."""

  name: str  # its directory in the suite's workdir
  config: str  # configs/FILE.py[:ARG], relative to the repository root
  label: str  # legend and table name, e.g. 'plain-56'
  depth: int
  residual: bool
  panel: str  # the plot panel it is drawn in (Fig. 6: plain nets left, ResNets right)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config fields
  paper_error: float | None = None  # %, None where the paper gives no number


@dataclasses.dataclass(frozen=True)
class Suite:
  """A named set of runs and what their paper numbers are."""

  description: str
  paper_metric: str
  runs: tuple[Run, ...]


@dataclasses.dataclass(frozen=True)
class Job:
  """One program: its directory (relative to the suite's workdir) and command.

  A plain job trains one run with one seed. A stacked job trains several
  (resnet_jax.training.stack);
  `members` maps each run's seed directory to its member's directory, both relative to
  the suite's workdir, so the layout report.py reads is the same either way.
  """

  directory: str
  command: tuple[str, ...]  # run from the repository root
  members: tuple[tuple[str, str], ...] = ()  # (run/seed<k>, stacks/<group>/<member>)


# The config file of each dataset's nets ({kind}: resnet or plain).
_CONFIG_FILES = {
  'cifar': 'configs/cifar10.py:{kind}{depth}',
  'imagenet': 'configs/{kind}{depth}_imagenet.py',
  'mnist': 'configs/mnist_resnet34.py',  # other nets through the `model` override
}


def _run(
  dataset: str,
  depth: int,
  residual: bool,
  shortcut: str | None = None,
  panel: str | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> Run:
  """A run named `<dataset>_<resnet|plain><depth>[_<shortcut option>]`."""
  kind = 'resnet' if residual else 'plain'
  name = f'{dataset}_{kind}{depth}'
  label = f'{"ResNet" if residual else "plain"}-{depth}'
  overrides = dict(overrides or {})
  if shortcut:
    name, label = f'{name}_{shortcut}', f'{label} {shortcut}'
    overrides['model_overrides.shortcut'] = shortcut
  config = _CONFIG_FILES[dataset].format(kind=kind, depth=depth)
  panel = panel or ('ResNets' if residual else 'plain nets')
  return Run(name, config, label, depth, residual, panel, overrides, PAPER_ERROR.get(name))


def _mnist(depth: int, residual: bool) -> Run:
  """The design note's ResNet-34 on MNIST, or a sibling of it (same recipe, other net)."""
  kind = 'resnet' if residual else 'plain'
  overrides: dict[str, Any] = {} if (depth, residual) == (34, True) else {'model': f'{kind}{depth}'}
  if not residual:
    # A zero last-BN scale makes a plain block output zero: no identity carries the signal.
    overrides['model_overrides.zero_init_last_bn'] = False
  return _run('mnist', depth, residual, overrides=overrides)


SUITES: dict[str, Suite] = {
  'cifar10_degradation': Suite(
    'CIFAR-10, plain vs residual nets of 20-110 layers (Fig. 6, Table 6)',
    'test error, Table 6 (plain nets: Fig. 6 only)',
    tuple(_run('cifar', d, r) for r in (False, True) for d in CIFAR_DEPTHS),
  ),
  'imagenet_depth': Suite(
    'ImageNet, plain vs residual 18/34 layers, option A shortcuts (Table 2, Fig. 4)',
    'top-1 val error, 10-crop, Table 2',
    tuple(_run('imagenet', d, r, 'A' if r else None) for r in (False, True) for d in (18, 34)),
  ),
  'shortcut_options': Suite(
    'ImageNet ResNet-34 with shortcut options A/B/C (Table 3)',
    'top-1 val error, 10-crop, Table 3',
    tuple(_run('imagenet', 34, True, s, 'ResNet-34') for s in 'ABC'),
  ),
  'cifar_shortcut_options': Suite(
    'CIFAR-10 ResNet-20/56 with shortcut options A/B/C (the paper uses A on CIFAR)',
    'test error, Table 6 (option A)',
    tuple(_run('cifar', d, True, s, f'ResNet-{d}') for d in (20, 56) for s in 'ABC'),
  ),
  'mnist_depth': Suite(
    "MNIST (the design note's setting), plain vs residual at 18 and 34 layers",
    'none (the paper has no MNIST runs)',
    tuple(_mnist(d, r) for r in (False, True) for d in (18, 34)),
  ),
}


def parse_sets(sets: Iterable[str]) -> dict[str, str]:
  """`FIELD=VALUE` strings (the --set flag) as {FIELD: VALUE}."""
  parsed = {}
  for item in sets:
    field, sep, value = item.partition('=')
    if not sep or not field:
      raise UserError(f'--set {item!r}: expected FIELD=VALUE, e.g. --set data_dir=/tmp/tfds.')
    parsed[field.removeprefix('config.')] = value
  return parsed


def format_value(value: Any) -> str:
  """A config value as main.py's `--config.FIELD=VALUE` flag parses it back."""
  if isinstance(value, tuple):
    return f'({",".join(map(str, value))}{"," if len(value) == 1 else ""})'
  return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  return [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]


def load_config(config: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config main.py sees for `--config=CONFIG` and these `--config.K=V` overrides."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # config files import `configs.default`
  argv = ['main.py', f'--config={os.path.join(REPO, config)}', *override_flags(overrides)]
  flag_values = flags.FlagValues()
  # sys_argv: the override flags are declared from the argv, not from this process's.
  config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ConfigDict reports a missing field as AttributeError(KeyError('field')).
    field = str(e).strip('"\'')
    reason = f'no config field {field}' if isinstance(e, AttributeError) else e
    raise UserError(f'{config} {" ".join(argv[2:])}: {reason}') from e
  return flag_values.config


def scale_steps(config: ml_collections.ConfigDict, scale: float) -> dict[str, Any]:
  """Every step count of `config` times `scale`, as overrides in steps.

  Training length, lr decay points, warmup and the log/eval/checkpoint intervals shrink
  together, so a shortened run keeps the schedule's shape (e.g. decays at 50% and 75%)
  and the number of points on its curves. Counts given in epochs are converted first.
  """
  per_epoch = datasets.steps_per_epoch(config)
  total = (
    config.num_train_steps
    if config.num_train_steps > 0
    else math.ceil(config.num_epochs * per_epoch)
  )
  interval = lambda n: max(1, round(n * scale)) if n > 0 else n
  scaled: dict[str, Any] = {
    'num_train_steps': interval(total),
    'warmup_steps': round(optim.warmup_steps(config, per_epoch) * scale),
    # -1 means once per epoch; an epoch does not shrink, so give it in steps.
    'eval_every_steps': interval(
      config.eval_every_steps if config.eval_every_steps > 0 else per_epoch
    ),
    'checkpoint_every_steps': interval(config.checkpoint_every_steps),
    'log_every_steps': interval(config.log_every_steps),
  }
  boundaries = optim.step_boundaries(config, per_epoch)
  if boundaries:
    scaled['lr_boundaries'] = tuple(round(b * scale) for b in boundaries)
  if config.lr_boundaries_epochs:
    scaled['lr_boundaries_epochs'] = ()  # replaced by lr_boundaries, in steps
  return scaled


def select_runs(suite: Suite, depths: Sequence[int] | None = None) -> list[Run]:
  """The suite's runs, only those of `depths` if given."""
  runs = [r for r in suite.runs if not depths or r.depth in depths]
  if not runs:
    known = sorted({r.depth for r in suite.runs})
    raise UserError(f'no run of depth {list(depths or [])} in this suite; its depths: {known}.')
  return runs


def run_overrides(run: Run, steps_scale: float, sets: Mapping[str, str]) -> dict[str, Any]:
  """The run's config overrides: its own, the scaled step counts, then --set (verbatim).

  Loading the config checks every override, so a misspelt field fails before any run.
  """
  overrides = {**run.overrides, **sets}
  config = load_config(run.config, overrides)
  if steps_scale == 1.0:
    return overrides
  scaled = scale_steps(config, steps_scale)
  return {**run.overrides, **{k: v for k, v in scaled.items() if k not in sets}, **sets}


def _check_counts(seeds: int, steps_scale: float) -> None:
  if seeds < 1 or steps_scale <= 0:
    raise UserError(f'need seeds >= 1 and steps_scale > 0 (got {seeds}, {steps_scale}).')


def expand(
  runs: Sequence[Run],
  workdir: str,
  seeds: int = 1,
  steps_scale: float = 1.0,
  sets: Mapping[str, str] | None = None,
) -> list[Job]:
  """One Job per run and seed 0..seeds-1, trained in WORKDIR/<run name>/seed<k>."""
  _check_counts(seeds, steps_scale)
  workdir = os.path.abspath(workdir)
  jobs = []
  for run in runs:
    run_flags = override_flags(run_overrides(run, steps_scale, sets or {}))
    for seed in range(seeds):
      directory = os.path.join(run.name, f'seed{seed}')
      command = (
        sys.executable,
        'main.py',
        f'--config={run.config}',
        f'--workdir={os.path.join(workdir, directory)}',
        f'--config.seed={seed}',
        *run_flags,
      )
      jobs.append(Job(directory, command))
  return jobs


def _stack_key(config: ml_collections.ConfigDict) -> tuple[str, bool, str]:
  """(what must be equal to share a program, whether the net is residual, its shortcut).

  Runs stack when their whole configs agree but for the seed and the model's `residual`
  switch (a plain net and its twin); the net is compared by its fields, not its name.
  """
  fields = {**models.ARCHITECTURES[config.model]}
  fields.update({k: v for k, v in config.model_overrides.items() if v is not None})
  residual = bool(fields.pop('residual', True))
  rest = {
    k: v for k, v in config.to_dict().items() if k not in ('model', 'model_overrides', 'seed')
  }
  key = repr(sorted({**rest, 'net': sorted(fields.items(), key=str)}.items(), key=str))
  return key, residual, str(fields.get('shortcut', 'B'))


def stack_groups(
  runs: Sequence[Run], steps_scale: float, sets: Mapping[str, str]
) -> list[list[Run]]:
  """The runs grouped into stacks: equal configs but for `residual`, whose plain and
  residual nets share parameter shapes (option-A shortcuts); in the suite's order."""
  groups: dict[tuple[str, ...], list[Run]] = {}
  for run in runs:
    config = load_config(run.config, run_overrides(run, steps_scale, sets))
    key, residual, shortcut = _stack_key(config)
    # Plain and residual twins share parameters only with option A; otherwise apart.
    groups.setdefault((key,) if shortcut == 'A' else (key, str(residual)), []).append(run)
  return list(groups.values())


def expand_stacked(
  runs: Sequence[Run],
  workdir: str,
  seeds: int = 1,
  steps_scale: float = 1.0,
  sets: Mapping[str, str] | None = None,
) -> list[Job]:
  """One Job per group of stackable runs (`stack_groups`), each seed of each run a member.

  The stack trains in WORKDIR/stacks/<first run name>[+...]; each member's directory is
  what WORKDIR/<run name>/seed<k> links to.
  """
  _check_counts(seeds, steps_scale)
  workdir, sets = os.path.abspath(workdir), sets or {}
  jobs = []
  for group in stack_groups(runs, steps_scale, sets):
    base = next((r for r in group if r.residual), group[0])
    members = [(r, k) for r in group for k in range(seeds)]
    directory = os.path.join('stacks', '+'.join(r.name for r in group))
    stack_flags = [
      f'--config.stack_seeds={format_value(tuple(k for _, k in members))}',
      f'--config.stack_residual={format_value(tuple(r.residual for r, _ in members))}',
    ]
    command = (
      sys.executable,
      'main.py',
      f'--config={base.config}',
      f'--workdir={os.path.join(workdir, directory)}',
      *override_flags(run_overrides(base, steps_scale, sets)),
      *stack_flags,
    )
    links = tuple(
      (
        os.path.join(r.name, f'seed{k}'),
        os.path.join(directory, f'{"resnet" if r.residual else "plain"}_seed{k}'),
      )
      for r, k in members
    )
    jobs.append(Job(directory, command, links))
  return jobs
