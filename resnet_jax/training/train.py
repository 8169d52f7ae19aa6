"""The training loop: train, evaluate, log, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole run. Rerunning it on the same workdir
continues from the latest good checkpoint and ends in the same state, bitwise, as an
uninterrupted run: the data pipeline is a function of (seed, step) and the state in
the checkpoint is everything else.
"""

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_jax import data, models, sharding
from resnet_jax.data import datasets
from resnet_jax.errors import Preempted, UserError
from resnet_jax.training import config_checks, finetune, optim, stack
from resnet_jax.training import step as ts
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.training.checkpoints import Checkpoints
from resnet_jax.training.metrics import Console, MetricWriter, truncate_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
  """The loss or a gradient became NaN/inf and the config says to stop: a recipe problem
  (learning rate, data) the user fixes, so main.py reports it as one line, exit 2."""


@dataclasses.dataclass
class Setup:
  """What a run is made of, derived from the config alone."""

  mesh: Mesh
  model: models.ResNet
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  input_shape: tuple[int, int, int]
  steps_per_epoch: int
  total_steps: int
  members: list[stack.Member] | None  # None: a single run; else the stack's members
  stack_method: str = 'auto'
  init_from: str = ''  # pretrained weights (resnet_jax.training.finetune); '' for none
  init_head: str = 'auto'

  def create_state(self, seed: int) -> ts.TrainState:
    """The initial state: from `seed` (each member's from its own), then with the weights
    of `init_from` in place of the seeded ones if it is set."""
    if self.members is None:
      state = ts.create_train_state(self.model, self.tx, self.input_shape, seed, self.mesh)
    else:
      state = stack.create_state(self.model, self.tx, self.input_shape, self.members, self.mesh)
    if not self.init_from:
      return state
    expected = models.variable_shapes(self.model, self.input_shape)
    weights = finetune.load(self.init_from, expected, self.init_head, self.mesh)
    return finetune.initialise(state, weights, self.members is not None, self.mesh)

  def abstract_state(self) -> ts.TrainState:
    if self.members is None:
      return ts.abstract_train_state(self.model, self.tx, self.input_shape, self.mesh)
    return stack.abstract_state(self.model, self.tx, self.input_shape, self.members, self.mesh)

  def train_step(self, label_smoothing: float, skip_nonfinite: bool):
    """The jitted step: the single run's, or the stack's over its members."""
    args = (label_smoothing, skip_nonfinite, self.schedule)
    if self.members is None:
      return ts.make_train_step(self.model, self.tx, self.mesh, *args)
    return stack.make_train_step(
      self.model, self.tx, self.mesh, self.members, *args, self.stack_method
    )

  def batch_seeds(self) -> list[int] | None:
    """The seeds data.train_batches stacks batches for (None: a single run's own)."""
    return None if self.members is None else [m.seed for m in self.members]

  def eval_step(self):
    if self.members is None:
      return ts.make_eval_step(self.model, self.mesh)
    return stack.make_eval_step(self.model, self.mesh, self.members, self.stack_method)

  def evaluate(self, eval_step, state: ts.TrainState, batches) -> list[dict[str, float]]:
    """Eval metrics per member (one entry for a single run)."""
    if self.members is None:
      return [ts.evaluate(eval_step, state, batches)]
    return stack.evaluate(eval_step, state, batches, len(self.members))

  def member_dirs(self, workdir: str) -> list[str]:
    """Where each member's metrics go: the workdir itself for a single run."""
    if self.members is None:
      return [workdir]
    return [os.path.join(workdir, m.name) for m in self.members]


def check_kernels_fit_mesh(model: models.ResNet, platform: str, devices: int) -> None:
  """UserError where `model` uses a kernel that cannot run sharded over `devices`.

  The fused bottleneck's Pallas kernels have no sharding rule: on several accelerators
  XLA would gather every activation onto each device. On CPUs they run as plain XLA ops
  (interpret mode), which shard.
  """
  if model.bottleneck_impl == 'fused' and devices > 1 and platform != 'cpu':
    raise UserError(
      f'bottleneck_impl=fused runs on one {platform} device per program for now, not '
      f'{devices}; use --config.model_overrides.bottleneck_impl=xla or one device.'
    )


def build(config: Any, mesh: Mesh | None = None, check_data: bool = True) -> Setup:
  """Validate the config and build the model, optimizer and schedule for this mesh.

  With `check_data` (training, evaluation) a missing dataset is an error now, before any
  work; converting weights needs no data.
  """
  config_checks.validate(config)
  mesh = sharding.make_mesh() if mesh is None else mesh
  spec = datasets.get_spec(config.dataset)
  sharding.check_batch_divisible(config.batch_size, mesh)
  sharding.check_batch_divisible(config.eval_batch_size, mesh, 'eval_batch_size')
  overrides = {
    'num_classes': spec.num_classes,
    'dtype': config.dtype,
    'bn_group_size': config.bn_group_size,
    **finetune.model_overrides(config.freeze),
    **{k: v for k, v in config.model_overrides.items() if v is not None},
  }
  model = models.build_model(config.model, **overrides)
  check_kernels_fit_mesh(model, mesh.devices.flat[0].platform, mesh.size)
  input_shape = datasets.input_shape(config)
  members = None
  if stack.is_stacked(config):
    members = stack.members(config, model.residual)
    model = stack.stack_model(model, members, input_shape)
  steps_per_epoch = datasets.steps_per_epoch(config)
  total = (
    config.num_train_steps
    if config.num_train_steps > 0
    else math.ceil(config.num_epochs * steps_per_epoch)
  )
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, total)
  tx = finetune.frozen(tx, config.freeze)
  if check_data:
    data.eval_batches(config, mesh)  # raises now, before any work, if the data is missing
  method = stack.resolve_method(config.stack_method, mesh)
  return Setup(
    mesh,
    model,
    tx,
    schedule,
    input_shape,
    steps_per_epoch,
    total,
    members,
    method,
    config.init_from,
    config.init_head,
  )


def restore_or_create(
  setup: Setup, checkpoints: Checkpoints, seed: int, step: int | None = None
) -> ts.TrainState:
  """The latest good checkpoint's state on this mesh, or a fresh one from `seed`."""
  state = checkpoints.restore(setup.abstract_state(), step)
  return setup.create_state(seed) if state is None else state


class _EvalInterrupted(Exception):
  """A preemption notice came during an evaluation: it stops at the next batch, the state
  is saved, and the evaluation reruns after the restart (an ImageNet evaluation takes
  minutes; a cloud preemption notice gives about 30 s)."""


class _Preemption:
  """Notices SIGTERM (one process) or a preemption notice shared by all processes."""

  def __init__(self):
    self._requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    if self._multi:  # every process must stop at the same step
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def requested_now(self) -> bool:
    """Whether to stop mid-evaluation: one process only, since several processes agree on
    a stop only at a training step's sync point (they finish the evaluation first)."""
    return not self._multi and self._requested

  def until_requested(self, batches: Iterator[Any]) -> Iterator[Any]:
    """`batches`, ending in _EvalInterrupted at the first batch after a stop request."""
    for batch in batches:
      if self.requested_now():
        raise _EvalInterrupted
      yield batch

  def close(self) -> None:
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def _every(step: int, interval: int, total: int) -> bool:
  return step == total or (interval > 0 and step % interval == 0)


def _member_means(pending: list[dict[str, Any]], members: int | None) -> list[dict[str, float]]:
  """Each member's metrics averaged over the pending steps; `members`: None for a single
  run, else K (a stack's metrics are [K] arrays)."""
  fetched = jax.device_get(pending)
  pick = (lambda x, i: x) if members is None else (lambda x, i: x[i])
  # A mean over a list of the member's own scalars: the single run's arithmetic exactly.
  return [
    {k: float(np.mean([pick(m[k], i) for m in fetched])) for k in fetched[0]}
    for i in range(members or 1)
  ]


def _across_members(rows: list[dict[str, float]], key: str) -> float:
  return float(np.mean([r[key] for r in rows]))


def train_and_evaluate(
  config: Any, workdir: str, mesh: Mesh | None = None, allow_config_change: Sequence[str] = ()
) -> ts.TrainState:
  """Train `config` in `workdir` to its last step (resuming if possible); returns the state.

  Raises Preempted when a SIGTERM stopped the run early (its checkpoint saved).

  A workdir made by another config is refused (see resnet_jax.training.workdir) unless the fields
  that differ are named in `allow_config_change`. A stack (resnet_jax.training.stack) keeps its
  checkpoints in `workdir` and each member's metrics in WORKDIR/<member name>.
  """
  setup = build(config, mesh)
  workdir_lib.prepare(workdir)
  workdir_lib.check_and_record(config, workdir, allow_config_change)
  is_writer = jax.process_index() == 0
  with contextlib.ExitStack() as exits:
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    exits.callback(checkpoints.close)
    state = restore_or_create(setup, checkpoints, config.seed)
    start = int(state.step)
    log_window = _restored_log_window(checkpoints, start)
    writers = []
    for member_dir in setup.member_dirs(workdir):
      if is_writer:
        truncate_metrics(member_dir, start)
      writers.append(exits.enter_context(contextlib.closing(MetricWriter(member_dir, is_writer))))
    images_per_step = config.batch_size * len(writers)
    console = exits.enter_context(
      contextlib.closing(Console(setup.total_steps, images_per_step, is_writer))
    )
    log.info(
      'model %s%s, %d parameters, %d steps (%d per epoch), starting at step %d',
      config.model,
      f' x {len(writers)} members ({", ".join(m.name for m in setup.members)})'
      if setup.members
      else '',
      sum(x.size for x in jax.tree.leaves(state.params)),
      setup.total_steps,
      setup.steps_per_epoch,
      start,
    )
    preemption = _Preemption()
    exits.callback(preemption.close)
    run = _Run(config, workdir, setup, checkpoints, writers, console, preemption)
    state = run.loop(state, log_window)
  if int(state.step) < setup.total_steps:  # checkpoints are closed: the save is on disk
    raise Preempted(f'preempted at step {int(state.step)} of {setup.total_steps}')
  return state


# Per-step metrics logged as one averaged row every log_every_steps; a checkpoint taken
# between two rows stores the steps since the last row, so a resumed run logs the same row.
_LOG_WINDOW_KEY = 'log_window'
# Saved with a checkpoint taken when a preemption interrupted the evaluation of its step.
_EVAL_PENDING_KEY = 'eval_pending'


def _restored_log_window(checkpoints: Checkpoints, step: int) -> list[dict[str, Any]]:
  """The per-step metrics since the last logged row, as saved with the checkpoint at `step`."""
  if step == 0:
    return []
  rows = checkpoints.custom_metadata(step).get(_LOG_WINDOW_KEY, [])
  # float32 as they came off the devices, so the row's mean is computed exactly as before.
  return [{k: np.asarray(v, np.float32) for k, v in row.items()} for row in rows]


@dataclasses.dataclass
class _Run:
  """The training loop and what it writes to (one metric writer per member)."""

  config: Any
  workdir: str
  setup: Setup
  checkpoints: Checkpoints
  writers: list[MetricWriter]
  console: Console
  preemption: '_Preemption'

  def loop(self, state: ts.TrainState, pending: list[dict[str, Any]]) -> ts.TrainState:
    config, setup = self.config, self.setup
    start, total = int(state.step), setup.total_steps
    train_step = setup.train_step(config.label_smoothing, config.on_nonfinite_loss == 'skip')
    eval_step = setup.eval_step()
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else setup.steps_per_epoch
    if start and self.checkpoints.custom_metadata(start).get(_EVAL_PENDING_KEY):
      log.info('rerunning the evaluation of step %d that a preemption interrupted', start)
      try:
        self._evaluate(start, state, eval_step)
      except _EvalInterrupted:
        self._stop(start, state, pending, eval_pending=True, saved=True)
        return state
    batches = data.train_batches(config, setup.mesh, start, setup.batch_seeds())
    window_start, window_steps = time.perf_counter(), 0
    profile = _Profile(self.workdir, start, config.profile_steps)
    for step in range(start + 1, total + 1):
      profile.before(step)
      state, metrics = train_step(state, next(batches))
      # At most two steps in flight: progress and preemption see the device's step, and a
      # SIGTERM is answered at the next step rather than after a run-ahead of many.
      if pending:
        jax.block_until_ready(pending[-1])
      pending.append(metrics)
      window_steps += 1
      if step == start + 1:  # images/s leaves out the first step, which compiles
        jax.block_until_ready(state)
        window_start, window_steps = time.perf_counter(), 0
        self.console.start_timing(step)
      profile.after(step, state)
      self.console.tick(step)
      self.checkpoints.check()
      evaluate = _every(step, eval_every, total)
      # Evaluated states are saved too, so the best-by-top-1 checkpoint can be kept.
      save = evaluate or _every(step, config.checkpoint_every_steps, total)
      if _every(step, config.log_every_steps, total) or save:
        now = time.perf_counter()
        img_per_s = (
          (window_steps * config.batch_size / (now - window_start)) if window_steps else None
        )
        self._log(step, pending, img_per_s)
        pending = []
        window_start, window_steps = now, 0
      best_by = None
      if evaluate:
        try:
          best_by = self._evaluate(step, state, eval_step)
        except _EvalInterrupted:
          self._stop(step, state, pending, eval_pending=True)
          break
        window_start = time.perf_counter()  # eval time is not training throughput
      if save:
        self.checkpoints.save(step, state, best_by)
      if step != total and self.preemption.requested(step):
        self._stop(step, state, pending, saved=save)
        break
    return state

  def _evaluate(self, step: int, state: ts.TrainState, eval_step) -> dict[str, float]:
    """Evaluate, write each member's row and the console line; returns the means over
    members (what the best checkpoint is chosen by)."""
    batches = self.preemption.until_requested(data.eval_batches(self.config, self.setup.mesh))
    per_member = self.setup.evaluate(eval_step, state, batches)
    for writer, metrics_k in zip(self.writers, per_member, strict=True):
      writer.write(step, metrics_k)
    best_by = {k: _across_members(per_member, k) for k in per_member[0]}
    self.console.line(step, best_by, with_eta=False)
    return best_by

  def _stop(
    self,
    step: int,
    state: ts.TrainState,
    pending: list[dict[str, Any]],
    eval_pending: bool = False,
    saved: bool = False,
  ) -> None:
    """Answer a preemption: save `step` with what a restart needs (the unlogged steps'
    metrics, whether the evaluation of `step` is still to do) unless `saved`, and wait."""
    if not saved:
      _check_finite(self.config, step, pending, self.checkpoints)
      window = [{k: np.asarray(v).tolist() for k, v in m.items()} for m in jax.device_get(pending)]
      extra = {_LOG_WINDOW_KEY: window, _EVAL_PENDING_KEY: eval_pending}
      self.checkpoints.save(step, state, extra=extra)
    self.checkpoints.wait()
    during = ' during its evaluation (it reruns on resume)' if eval_pending else ''
    log.warning(
      'preempted at step %d%s: checkpoint saved; rerun the same command to resume.', step, during
    )

  def _log(self, step: int, pending: list[dict[str, Any]], img_per_s: float | None) -> None:
    """One averaged row per member for the steps since the last row (and a console line).

    img_per_s is each member's own rate; the console line is the mean over members.
    """
    _check_finite(self.config, step, pending, self.checkpoints)
    rows = []
    members = None if self.setup.members is None else len(self.setup.members)
    for means, writer in zip(_member_means(pending, members), self.writers, strict=True):
      row = {f'train_{k}': v for k, v in means.items() if k not in ('lr', 'finite')}
      row['lr'] = means['lr']
      if img_per_s is not None:
        row['img_per_s'] = img_per_s
      writer.write(step, row)
      rows.append(row)
    loss, top1 = (_across_members(rows, k) for k in ('train_loss', 'train_top1'))
    self.console.line(step, {'loss': loss, 'top1': top1})


def _check_finite(
  config, step: int, pending: list[dict[str, jax.Array]], checkpoints: Checkpoints
) -> None:
  """Stop (config 'stop') before a non-finite state can reach a checkpoint."""
  if config.on_nonfinite_loss != 'stop' or not pending:
    return
  finite = np.asarray(jax.device_get([m['finite'] for m in pending]))
  finite = finite.reshape(len(pending), -1).all(axis=1)  # a stack: every member finite
  if not finite.all():
    bad = step - len(pending) + 1 + int(np.argmin(finite))
    raise NonFiniteLossError(
      f'non-finite loss or gradient at step {bad}; {_last_checkpoint(checkpoints)}. '
      'Lower the learning rate, or set --config.on_nonfinite_loss=skip to skip such steps.'
    )


def _last_checkpoint(checkpoints: Checkpoints) -> str:
  """What a run stopped by a non-finite loss left to resume from (its saves come from
  finite states only, and the last one completes as the run closes)."""
  saved = checkpoints.steps()
  if not saved:
    return 'no checkpoint was saved before it'
  return f'the checkpoint of step {saved[-1]}, the last before it, is intact'


class _Profile:
  """Traces `num_steps` steps into WORKDIR/profile, a few steps after compilation."""

  def __init__(self, workdir: str, start: int, num_steps: int):
    self._dir = f'{workdir}/profile'
    self._first = start + 3 if num_steps > 0 else -1
    self._last = self._first + num_steps - 1

  def before(self, step: int) -> None:
    if step == self._first:
      jax.profiler.start_trace(self._dir)

  def after(self, step: int, state: ts.TrainState) -> None:
    if step == self._last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()


def read_checkpoint(
  setup: Setup,
  config: Any,
  workdir: str,
  step: int | None = None,
  allow_config_change: Sequence[str] = (),
) -> ts.TrainState:
  """The state of `workdir`'s checkpoint at `step` (default: the latest good one), read
  without changing anything; the config must be one that the workdir can be read with."""
  workdir_lib.check_config(config, workdir, allow_config_change, for_eval=True)
  with contextlib.closing(Checkpoints(workdir, config.keep_checkpoints, read_only=True)) as ckpt:
    if not ckpt.steps():
      raise UserError(f'no checkpoint in {ckpt.directory}; train first (without --mode=eval).')
    return ckpt.restore(setup.abstract_state(), step)


def _record_evaluation(
  member_dirs: Sequence[str], step: int, per_member: list[dict[str, float]]
) -> None:
  """Append each member's evaluation to its metrics; a workdir that cannot be written to
  (another user's, a read-only mount) is evaluated all the same, its metrics only returned."""
  try:
    for member_dir, metrics in zip(member_dirs, per_member, strict=True):
      with contextlib.closing(MetricWriter(member_dir, jax.process_index() == 0)) as writer:
        writer.write(step, {**metrics, 'mode': 'eval'})
  except OSError as e:
    log.warning('the evaluation is not recorded in %s (%s)', member_dir, e.strerror or e)


class Checkpoint(NamedTuple):
  """A checkpoint's network, as `load_variables` returns it."""

  model: models.ResNet  # the member's model for a stack
  variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}, numpy arrays on the host
  step: int


def load_variables(
  config: Any, workdir: str, step: int | None = None, member: str | None = None
) -> Checkpoint:
  """The model and host copies of the variables of `workdir`'s checkpoint at `step`
  (default: the latest good one), for a stack those of its member called `member`.

  For notebooks and exports: `checkpoint.model.apply(checkpoint.variables, x, train=False)`.
  """
  setup = build(config, check_data=False)
  state = read_checkpoint(setup, config, workdir, step)
  model = setup.model
  if setup.members is None:
    if member is not None:
      raise UserError('--member is for a stack; this workdir holds a single run.')
  else:
    names = [m.name for m in setup.members]
    if member not in names:
      raise UserError(f'the workdir holds a stack; choose --member= one of: {", ".join(names)}.')
    index = names.index(member)
    state = stack.member_state(state, index)
    model = setup.model.clone(residual=setup.members[index].residual)
  variables = sharding.host_copy({'params': state.params, 'batch_stats': state.batch_stats})
  return Checkpoint(model, variables, int(state.step))


def evaluate_checkpoint(
  config: Any,
  workdir: str,
  step: int | None = None,
  mesh: Mesh | None = None,
  allow_config_change: Sequence[str] = (),
) -> list[dict[str, float]]:
  """Evaluate a checkpoint (default: the latest) on the full eval split and log it.

  Returns the metrics of each member (one entry for a single run; a stack's start with
  'member': its name), each also recorded in its member's metrics.jsonl and TensorBoard
  files (a row with 'mode': 'eval'), where the workdir can be written to. Changes no
  checkpoint and no config: a damaged latest checkpoint is skipped, not moved.
  """
  setup = build(config, mesh)
  state = read_checkpoint(setup, config, workdir, step, allow_config_change)
  per_member = setup.evaluate(setup.eval_step(), state, data.eval_batches(config, setup.mesh))
  _record_evaluation(setup.member_dirs(workdir), int(state.step), per_member)
  if setup.members is not None:
    per_member = [{'member': m.name, **x} for m, x in zip(setup.members, per_member, strict=True)]
  return per_member
