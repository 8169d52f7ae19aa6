"""What this project's Pallas kernels on the Triton backend share.

Triton needs power-of-two tiles; passing Triton's `CompilerParams` is what selects the
Triton backend (jax 0.10 and 0.11 lower Pallas to Mosaic GPU otherwise); on a CPU the
kernels run in Pallas's interpret mode, as plain XLA ops.
"""

from typing import Any

import jax
from jax.experimental.pallas import triton as pltriton


def check_powers_of_two(blocks: Any, *fields: str) -> None:
  """ValueError unless each of `blocks`'s `fields` is a power of two."""
  for name in fields:
    size = getattr(blocks, name)
    if size < 1 or size & (size - 1):
      raise ValueError(f'{type(blocks).__name__}.{name} must be a power of two, not {size}')


def compiler_params(blocks: Any) -> pltriton.CompilerParams:
  """Triton's launch parameters from `blocks`'s `num_warps` and `num_stages`."""
  return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def interpret_mode(interpret: bool | None) -> bool:
  """`interpret`, or by default whether JAX's default backend is the CPU."""
  return jax.default_backend() == 'cpu' if interpret is None else interpret
