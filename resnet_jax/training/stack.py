"""Many runs in one program: K members trained side by side by one jitted step.

A stack is K train states with a leading member axis, trained by the single run's step
mapped over the members (vmapped or written out per member, below), so a member
computes what the single run with its settings computes and nothing mixes across
members (each has its own BN statistics, loss and gradients).
Members differ in their seed (initialisation, data order and augmentation), in whether
the net is residual (twins that share every parameter shape: option-A shortcuts have no
parameters, so a plain net and its ResNet twin do) and in a learning-rate scale.

The config fields `stack_seeds`, `stack_residual` and `stack_lr_scale` are tuples with
one entry per member (or empty: the run's own value for every member). Small nets leave
an accelerator mostly idle at batch 128; a stack fills it, so a row of the paper's
Fig. 6 (plain-n and ResNet-n, several seeds) trains in about the time of one run.

How members share the program (config.stack_method):
- 'vmap': one batched program; convolutions become grouped convolutions (feature groups
  = members), which accelerators run as one wide kernel. XLA:CPU runs them so slowly
  that a vmapped stack trains at about a quarter of one run's images/s (benchmarks/
  RESULTS.md), so
- 'unroll': the step written out once per member inside the one jitted program: on a
  CPU 1.0-1.2x the images/s of one run; compiles K times the code.
- 'auto' (default): 'unroll' on CPUs, 'vmap' on GPUs and TPUs.
Both compute per member what the single run computes (tested).

Sharding: parameters are replicated and each member's batch is split over the mesh's
`data` axis ([K, B, ...] batches sharded on B), as for a single run: it works for any K
and any device count, and a member's numbers do not depend on either.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from resnet_jax import models, sharding
from resnet_jax.errors import UserError
from resnet_jax.training import step as ts

FIELDS = ('stack_seeds', 'stack_residual', 'stack_lr_scale')
METHODS = ('auto', 'vmap', 'unroll')
# The member axis of a stacked TrainState: the step counter is shared.
STATE_AXES = ts.TrainState(step=None, params=0, batch_stats=0, opt_state=0)


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a stack: what it differs in, and its directory in the stack's workdir."""

  seed: int
  residual: bool
  lr_scale: float
  name: str


def is_stacked(config: Any) -> bool:
  """Whether `config` asks for a stack (any stack_* field set)."""
  return any(len(config[f]) for f in FIELDS)


def members(config: Any, residual: bool) -> list[Member]:
  """The members `config` asks for; `residual` is the model's own (for unset stack_residual).

  Names say what differs: 'seed1', 'plain_seed0' / 'resnet_seed0', '..._lr0.5'.
  """
  values = {f: tuple(config[f]) for f in FIELDS}
  k = max(len(v) for v in values.values())
  for field, value in values.items():
    if value and len(value) != k:
      raise UserError(
        f'{field} has {len(value)} entries but the stack has {k} members; give one per '
        f'member (or none) in --config.{field}.'
      )
  seeds = values['stack_seeds'] or (config.seed,) * k
  residuals = values['stack_residual'] or (residual,) * k
  scales = values['stack_lr_scale'] or (1.0,) * k
  if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
    raise UserError(f'stack_seeds={seeds} must be integers; set --config.stack_seeds.')
  if any(not isinstance(r, bool) for r in residuals):
    raise UserError(
      f"stack_residual={residuals} must be True/False; e.g. --config.stack_residual='(False,True)'."
    )
  if any(isinstance(x, bool) or not isinstance(x, int | float) or x <= 0 for x in scales):
    raise UserError(
      f'stack_lr_scale={scales} must be positive numbers; set --config.stack_lr_scale.'
    )
  result = []
  for seed, res, scale in zip(seeds, residuals, scales, strict=True):
    name = f'seed{seed}'
    if values['stack_residual']:
      name = f'{"resnet" if res else "plain"}_{name}'
    if values['stack_lr_scale']:
      name = f'{name}_lr{scale:g}'
    result.append(Member(int(seed), bool(res), float(scale), name))
  names = [m.name for m in result]
  if len(set(names)) != len(names):
    raise UserError(
      f'the stack has identical members ({", ".join(names)}); give each a different seed, '
      'residual switch or lr scale.'
    )
  return result


def stack_model(model: Any, stack: Sequence[Member], input_shape: tuple[int, ...]) -> Any:
  """The model the stack's program runs: residual if any member is (plain ones gate it off).

  Plain and residual members must have the same parameters; that holds for option-A
  shortcuts (none) and is checked here for the model at hand.
  """
  if not any(m.residual for m in stack):
    return model.clone(residual=False)
  residual = model.clone(residual=True)
  if all(m.residual for m in stack):
    return residual
  shapes = [models.variable_shapes(m, input_shape) for m in (residual, model.clone(residual=False))]
  if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]) or jax.tree.leaves(
    shapes[0]
  ) != jax.tree.leaves(shapes[1]):
    raise UserError(
      f'stack_residual mixes plain and residual members, but with shortcut option '
      f'{model.shortcut!r} they have different parameters; set '
      '--config.model_overrides.shortcut=A (no shortcut parameters) or stack them apart.'
    )
  return residual


def resolve_method(method: str, mesh: Mesh) -> str:
  """'vmap' or 'unroll' for `method` on the mesh's platform (see the module docstring)."""
  if method not in METHODS:
    raise UserError(
      f'stack_method={method!r} is unknown; set --config.stack_method to one of: '
      f'{", ".join(METHODS)}.'
    )
  if method != 'auto':
    return method
  return 'unroll' if mesh.devices.flat[0].platform == 'cpu' else 'vmap'


def _over_members(fn: Callable, in_axes: tuple, out_axes: Any, k: int, method: str) -> Callable:
  """`fn` applied to each of k members: jax.vmap, or the same written out k times.

  Axes follow jax.vmap: 0 for a member axis in front, None for an argument all share;
  per argument or as a pytree prefix (e.g. STATE_AXES).
  """
  if method == 'vmap':
    return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)
  is_axis = lambda x: x is None

  def member(args: tuple, i: int) -> tuple:
    take = lambda axis, tree: tree if axis is None else jax.tree.map(lambda x: x[i], tree)
    return jax.tree.map(take, in_axes, args, is_leaf=is_axis)

  def stacked(axis: Any, *trees: Any) -> Any:
    return trees[0] if axis is None else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

  def unrolled(*args: Any) -> Any:
    outs = [fn(*member(args, i)) for i in range(k)]
    return jax.tree.map(stacked, out_axes, *outs, is_leaf=is_axis)

  return unrolled


def _gates(stack: Sequence[Member]) -> jax.Array | None:
  """Each member's shortcut gate (1 residual, 0 plain), or None when they all agree."""
  if len({m.residual for m in stack}) == 1:
    return None
  return jnp.asarray([float(m.residual) for m in stack], jnp.float32)


def _lr_scales(stack: Sequence[Member]) -> jax.Array | None:
  if all(m.lr_scale == 1.0 for m in stack):
    return None
  return jnp.asarray([m.lr_scale for m in stack], jnp.float32)


def create_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, int, int],
  stack: Sequence[Member],
  mesh: Mesh,
) -> ts.TrainState:
  """Every member's initial state (from its seed), stacked and replicated over the mesh."""
  seeds = jnp.asarray([m.seed for m in stack], jnp.int32)
  init = jax.vmap(
    lambda seed: ts.init_train_state(model, tx, input_shape, seed), out_axes=STATE_AXES
  )
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(seeds)


def abstract_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, int, int],
  stack: Sequence[Member],
  mesh: Mesh,
) -> ts.TrainState:
  """Shapes, dtypes and shardings of the stacked state (for restores)."""
  return ts.replicated_shapes(lambda: create_state(model, tx, input_shape, stack, mesh), mesh)


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  stack: Sequence[Member],
  label_smoothing: float = 0.0,
  skip_nonfinite: bool = False,
  schedule: optax.Schedule | None = None,
  method: str = 'auto',
) -> Callable[[ts.TrainState, ts.Batch], tuple[ts.TrainState, ts.Metrics]]:
  """The single run's step over the members (`method`: see resolve_method); metrics [K]."""
  step = ts.train_step_fn(model, tx, label_smoothing, skip_nonfinite, schedule)
  mapped = _over_members(
    step, (STATE_AXES, 0, 0, 0), (STATE_AXES, 0), len(stack), resolve_method(method, mesh)
  )
  gates, scales = _gates(stack), _lr_scales(stack)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh, stacked=True)
  mapped = sharding.traced_on(mesh, mapped)
  return jax.jit(
    lambda state, batch: mapped(state, batch, gates, scales),
    in_shardings=(repl, data),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def make_eval_step(
  model: nn.Module, mesh: Mesh, stack: Sequence[Member], method: str = 'auto'
) -> Callable[[ts.TrainState, ts.Batch, ts.Metrics], ts.Metrics]:
  """The single run's eval step over the members; every member sees the same batch."""
  step = ts.eval_step_fn(model)
  mapped = _over_members(
    step, (STATE_AXES, None, 0, 0), 0, len(stack), resolve_method(method, mesh)
  )
  gates = _gates(stack)
  mapped = sharding.traced_on(mesh, mapped)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    lambda state, batch, totals: mapped(state, batch, totals, gates),
    in_shardings=(repl, data, repl),
    out_shardings=repl,
    donate_argnums=2,
  )


def evaluate(
  eval_step: Callable[[ts.TrainState, ts.Batch, ts.Metrics], ts.Metrics],
  state: ts.TrainState,
  batches: Any,
  num_members: int,
) -> list[dict[str, float]]:
  """Each member's eval metrics (as `train_step.evaluate` gives a single run's)."""
  totals = {k: np.repeat(v[None], num_members) for k, v in ts.empty_totals().items()}
  totals = ts.eval_totals(eval_step, state, batches, totals)
  return [ts.eval_means({k: v[i] for k, v in totals.items()}) for i in range(num_members)]


def member_state(state: ts.TrainState, index: int) -> ts.TrainState:
  """Member `index`'s state as a single run's (e.g. to compare or export it)."""
  take = lambda tree: jax.tree.map(lambda x: x[index], tree)
  return state.replace(
    params=take(state.params), batch_stats=take(state.batch_stats), opt_state=take(state.opt_state)
  )
