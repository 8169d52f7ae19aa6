"""Max pooling whose gradient scatters by a recorded index instead of select-and-scatter.

`jax.grad` of `nn.max_pool` differentiates XLA's reduce-window into a select-and-scatter,
which XLA expands into iota tensors, a variadic reduce-window and a scatter (on an H100
about 1.5 ms of ResNet-50's step for the stem's 3x3/2 pool). `max_pool` here computes the
same maximum as the max over the k*k strided windows, records which window position held
the FIRST maximum (an int8 per output, the tie rule of XLA's select, `ge`: ties are
common after a ReLU), and its backward pass puts each output's gradient back at that
position with k*k interior-padded `lax.pad`s that XLA fuses into one elementwise pass.

Value and gradient equal jax.grad of nn.max_pool bit for bit on the CPU, in float32 and
in bfloat16 (tests/test_models.py, tie-heavy inputs): the gradient is summed in the
input's dtype, in the order of XLA's scatter.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]


def max_pool(
  x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Padding
) -> jax.Array:
  """Max pooling of NHWC `x`, as nn.max_pool(x, window, strides, padding) computes it."""
  return _max_pool(x, tuple(window), tuple(strides), tuple(map(tuple, padding)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window, strides, padding) -> jax.Array:
  return _forward(x, window, strides, padding)[0]


def _offsets(window: Sequence[int]) -> list[tuple[int, int]]:
  """Window positions in row-major order: the order XLA's select visits them."""
  return [(di, dj) for di in range(window[0]) for dj in range(window[1])]


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // s + 1


def _forward(x: jax.Array, window, strides, padding) -> tuple[jax.Array, jax.Array]:
  """The pooled maximum and, per output, the index of the window's first maximum."""
  n, h, w, c = x.shape
  out_h = _out_size(h, window[0], strides[0], padding[0])
  out_w = _out_size(w, window[1], strides[1], padding[1])
  xp = lax.pad(
    x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)]
  )
  best = index = None
  for k, (di, dj) in enumerate(_offsets(window)):
    candidate = lax.slice(
      xp,
      (0, di, dj, 0),
      (n, di + strides[0] * (out_h - 1) + 1, dj + strides[1] * (out_w - 1) + 1, c),
      (1, strides[0], strides[1], 1),
    )
    if best is None:
      best, index = candidate, jnp.zeros(candidate.shape, jnp.int8)
      continue
    # Strictly greater: an equal later value never displaces the first maximum.
    later_wins = candidate > best
    best = jnp.where(later_wins, candidate, best)
    index = jnp.where(later_wins, jnp.int8(k), index)
  return best, index


def _max_pool_fwd(x: jax.Array, window, strides, padding):
  best, index = _forward(x, window, strides, padding)
  # Residuals must be arrays: an empty one carries the input's size for free.
  return best, (index, jnp.empty((0, *x.shape[1:3], 0), jnp.int8))


def _max_pool_bwd(window, strides, padding, residuals, g: jax.Array):
  index, like_x = residuals
  _, h, w, _ = like_x.shape
  out_h, out_w = index.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  dx = None
  # XLA's scatter adds each input position's windows in row-major order of the windows;
  # a later window reaches a position from an earlier offset, so the offsets go in
  # reverse to add in the same order (float addition is not associative).
  for k, (di, dj) in reversed(list(enumerate(_offsets(window)))):
    part = jnp.where(index == k, g, zero)
    # Output (i, j) sits at padded input (s*i + di, s*j + dj); negative edge padding
    # crops the pool's own padding away.
    part = lax.pad(
      part,
      zero,
      [
        (0, 0, 0),
        (di - padding[0][0], h + padding[0][0] - di - strides[0] * (out_h - 1) - 1, strides[0] - 1),
        (dj - padding[1][0], w + padding[1][0] - dj - strides[1] * (out_w - 1) - 1, strides[1] - 1),
        (0, 0, 0),
      ],
    )
    dx = part if dx is None else dx + part
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
