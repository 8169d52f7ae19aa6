"""Learning-rate schedules and optimizers from a config, built from optax parts."""

from typing import Any

import jax
import optax

from resnet_jax.errors import UserError

SCHEDULES = ('cosine', 'step', 'constant')
OPTIMIZERS = ('sgd', 'lars')
WARMUPS = ('linear', 'constant')


def peak_learning_rate(config: Any) -> float:
  """`learning_rate` is quoted per 256 examples and scaled linearly with the batch."""
  return config.learning_rate * config.batch_size / 256


def warmup_steps(config: Any, steps_per_epoch: int) -> int:
  if config.warmup_steps >= 0:
    return int(config.warmup_steps)
  return int(round(config.warmup_epochs * steps_per_epoch))


def step_boundaries(config: Any, steps_per_epoch: int) -> list[int]:
  """The 'step' schedule's decay points in steps (given in steps or in epochs)."""
  if config.lr_boundaries and config.lr_boundaries_epochs:
    raise UserError('give lr_boundaries (steps) or lr_boundaries_epochs, not both.')
  if config.lr_boundaries:
    return [int(b) for b in config.lr_boundaries]
  return [int(round(e * steps_per_epoch)) for e in config.lr_boundaries_epochs]


def learning_rate_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The config's schedule, in absolute steps, warmup included.

  'cosine': warmup then cosine to exactly 0 at `total_steps` (the modern recipe).
  'step': the paper's — multiply by `lr_decay` at each boundary (e.g. 32k, 48k).
  'constant': the peak rate after warmup. Warmup is 'linear' from 0 or, as the paper
  does for ResNet-110, 'constant' at `warmup_factor` times the peak.
  """
  if config.lr_schedule not in SCHEDULES:
    raise UserError(
      f'unknown lr_schedule {config.lr_schedule!r}; choose one of {", ".join(SCHEDULES)}.'
    )
  if config.warmup not in WARMUPS:
    raise UserError(f'unknown warmup {config.warmup!r}; choose one of {", ".join(WARMUPS)}.')
  peak = peak_learning_rate(config)
  warmup = min(warmup_steps(config, steps_per_epoch), total_steps)
  if config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=0.0)
  elif config.lr_schedule == 'step':
    # join_schedules restarts the count at the warmup's end; boundaries stay absolute.
    boundaries = step_boundaries(config, steps_per_epoch)
    main = optax.piecewise_constant_schedule(
      peak, {b - warmup: config.lr_decay for b in boundaries if b > warmup}
    )
  else:
    main = optax.constant_schedule(peak)
  if not warmup:
    return main
  if config.warmup == 'linear':
    ramp = optax.linear_schedule(0.0, peak, warmup)
  else:
    ramp = optax.constant_schedule(peak * config.warmup_factor)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params: Any, decay_norm_and_bias: bool = False) -> Any:
  """True for the parameters that weight decay applies to.

  Conv and dense kernels only; BN scales/biases and biases (the 1-D parameters) are
  left alone unless `decay_norm_and_bias` (the paper decays every weight).
  """
  return jax.tree.map(lambda p: decay_norm_and_bias or p.ndim > 1, params)


def create_optimizer(
  config: Any, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum (Nesterov switch) and coupled L2 decay, or LARS for big batches."""
  if config.optimizer not in OPTIMIZERS:
    raise UserError(
      f'unknown optimizer {config.optimizer!r}; choose one of {", ".join(OPTIMIZERS)}.'
    )
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  mask = lambda params: decay_mask(params, config.weight_decay_on_norm_and_bias)
  if config.optimizer == 'lars':
    # LARS adapts each layer's step to |w| / |g|; BN and bias parameters keep plain SGD.
    tx = optax.lars(
      schedule,
      weight_decay=config.weight_decay,
      weight_decay_mask=mask,
      trust_ratio_mask=mask,
      momentum=config.momentum,
      nesterov=config.nesterov,
    )
  else:
    tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
  return tx, schedule
