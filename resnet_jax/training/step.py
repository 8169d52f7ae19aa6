"""The training state and the jitted train / eval steps over a device mesh.

One `jax.jit` program per step: the batch arrives sharded over the mesh's `data` axis,
parameters and optimizer state are replicated, and XLA inserts the gradient and BN
all-reduces. BN statistics are therefore over the global batch unless the model uses
`bn_group_size`. Imports no tensorflow, so benchmarks on bare GPU machines use the very
same step as training.
"""

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from resnet_jax import sharding

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; with the config it determines the run."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_train_state(
  model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, int, int], seed: Any
) -> TrainState:
  """The initial state from `seed` (an int or a traced int32), unjitted."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *input_shape)), train=False)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, int, int],
  seed: int,
  mesh: Mesh,
) -> TrainState:
  """Initialise parameters from `seed`, replicated over the mesh."""
  init = lambda: init_train_state(model, tx, input_shape, seed)
  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, int, int], mesh: Mesh
) -> TrainState:
  """Shapes, dtypes and shardings of the state, without computing it (for restores)."""
  return replicated_shapes(lambda: create_train_state(model, tx, input_shape, 0, mesh), mesh)


def replicated_shapes(create: Callable[[], Any], mesh: Mesh) -> Any:
  """What `create()` returns, as shapes and dtypes replicated over `mesh`, not computed."""
  repl = sharding.replicated(mesh)
  shapes = jax.eval_shape(create)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


def cross_entropy(
  logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the top-k logits (fewer than k logits beat it).

  Counting instead of `lax.top_k` keeps the computation row-local: XLA partitions
  top_k by gathering the whole batch's logits onto every device.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def train_step_fn(
  model: nn.Module,
  tx: optax.GradientTransformation,
  label_smoothing: float = 0.0,
  skip_nonfinite: bool = False,
  schedule: optax.Schedule | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """The step `(state, batch, shortcut_gate=None, lr_scale=None) -> (state, metrics)`, unjitted.

  Metrics are batch means (loss, top1, top5), the learning rate used, and `finite`
  (0 when the loss or a gradient was NaN/inf). With `skip_nonfinite` such a step leaves
  the state unchanged but for the step counter, so a rare overflow does not end a run.
  `shortcut_gate` and `lr_scale` are what the members of a stack (resnet_jax.training.stack) may
  differ in: the gate multiplies every shortcut, lr_scale the update.
  """
  num_classes = model.num_classes

  def loss_fn(params, batch_stats, batch, shortcut_gate):
    logits, new_vars = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      batch['image'],
      train=True,
      shortcut_gate=shortcut_gate,
      mutable=['batch_stats'],
    )
    loss = cross_entropy(logits, batch['label'], num_classes, label_smoothing).mean()
    return loss, (logits, new_vars['batch_stats'])

  def step(
    state: TrainState,
    batch: Batch,
    shortcut_gate: jax.Array | None = None,
    lr_scale: jax.Array | None = None,
  ) -> tuple[TrainState, Metrics]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(
      state.params, state.batch_stats, batch, shortcut_gate
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if lr_scale is not None:  # the optimizers end in the lr: scaling the update scales it
      updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    new = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
    )
    finite = jnp.isfinite(loss) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    if skip_nonfinite:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
      new = new.replace(step=state.step + 1)
    metrics = {
      'loss': loss,
      'top1': _correct(logits, batch['label'], 1).mean(),
      'top5': _correct(logits, batch['label'], min(5, num_classes)).mean(),
      'finite': finite.astype(jnp.float32),
    }
    if schedule is not None:
      lr = schedule(state.step)
      metrics['lr'] = lr if lr_scale is None else lr * lr_scale
    return new, metrics

  return step


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  label_smoothing: float = 0.0,
  skip_nonfinite: bool = False,
  schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step_fn` jitted over `mesh`: `(state, batch) -> (state, metrics)`, state donated."""
  step = sharding.traced_on(
    mesh, train_step_fn(model, tx, label_smoothing, skip_nonfinite, schedule)
  )
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    lambda state, batch: step(state, batch),
    in_shardings=(repl, data),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def eval_step_fn(model: nn.Module) -> Callable[..., Metrics]:
  """The step `(state, batch, totals, shortcut_gate=None) -> totals + the batch's sums`.

  Sums of loss, top-1, top-5 and the count over the batch's unmasked rows.
  """
  num_classes = model.num_classes

  def step(
    state: TrainState, batch: Batch, totals: Metrics, shortcut_gate: jax.Array | None = None
  ) -> Metrics:
    logits = model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=False,
      shortcut_gate=shortcut_gate,
    )
    mask = batch['mask']
    loss = cross_entropy(logits, batch['label'], num_classes)
    sums = {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(_correct(logits, batch['label'], 1) * mask),
      'top5': jnp.sum(_correct(logits, batch['label'], min(5, num_classes)) * mask),
      'count': jnp.sum(mask),
    }
    return jax.tree.map(jnp.add, totals, sums)

  return step


def make_eval_step(model: nn.Module, mesh: Mesh) -> Callable[[TrainState, Batch, Metrics], Metrics]:
  """`eval_step_fn` jitted over `mesh`; totals are accumulated on the devices inside the
  step (no separate add per batch) and the host fetches them once at the end."""
  step = sharding.traced_on(mesh, eval_step_fn(model))
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    lambda state, batch, totals: step(state, batch, totals),
    in_shardings=(repl, data, repl),
    out_shardings=repl,
    donate_argnums=2,
  )


def empty_totals() -> Metrics:
  """The eval totals before the first batch."""
  return {k: np.zeros((), np.float32) for k in ('loss', 'top1', 'top5', 'count')}


def eval_means(totals: Metrics) -> dict[str, float]:
  """Mean loss / top-1 / top-5 over the counted examples, from fetched totals."""
  count = float(totals['count'])
  return {
    'eval_loss': float(totals['loss']) / count,
    'eval_top1': float(totals['top1']) / count,
    'eval_top5': float(totals['top5']) / count,
    'eval_count': int(count),
  }


def evaluate(
  eval_step: Callable[[TrainState, Batch, Metrics], Metrics], state: TrainState, batches: Any
) -> dict[str, float]:
  """Mean loss / top-1 / top-5 over every unmasked example, and how many there were."""
  return eval_means(eval_totals(eval_step, state, batches, empty_totals()))


def eval_totals(
  eval_step: Callable[[TrainState, Batch, Metrics], Metrics],
  state: TrainState,
  batches: Any,
  totals: Metrics,
) -> dict[str, np.ndarray]:
  """`totals` plus every batch's sums, accumulated on the devices and fetched once.

  One batch in flight: the host takes the next batch when the last one is done, so a
  caller's `batches` can stop the evaluation within a batch (a preemption notice).
  """
  for batch in batches:
    totals = jax.block_until_ready(eval_step(state, batch, totals))
  return jax.device_get(totals)
