"""The device mesh and how arrays are laid out on it.

One mesh axis, `data`, over every device of every process: batches are split along
it, parameters and optimizer state are replicated. Kept in one place so the data
pipeline, the train step and checkpoint restore agree on the layout.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """`fn`, traced with `mesh` as the context mesh (`jax.sharding.get_abstract_mesh()`):
  ops that run on each device's rows of the batch (oneDNN's convolutions on CPUs) split
  it by the mesh. Wrap a step's body before `jax.jit`."""

  @functools.wraps(fn)
  def on_mesh(*args: Any, **kwargs: Any) -> Any:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return on_mesh


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batch axis split over the data axis, the rest replicated.

  The batch axis leads, or with `stacked` ([K, B, ...] batches of a stack of runs)
  follows the member axis, which is replicated: every device holds its rows of every
  member's batch, so members share the devices as a single run does.
  """
  return NamedSharding(
    mesh, PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def host_copy(tree: Any) -> Any:
  """numpy copies of the replicated arrays of `tree`.

  This process's first shard is the whole array, on many hosts too (where np.asarray of
  a global array fails: not every shard is addressable).
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  """Raise a UserError unless `batch_size` splits evenly over the mesh's devices."""
  n = mesh.devices.size
  if batch_size % n:
    lower = max(n, batch_size // n * n)
    raise UserError(
      f'{what}={batch_size} is not divisible by the {n} devices of the mesh; '
      f'set --config.{what}={lower} (or another multiple of {n}).'
    )


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """The part of a global batch that this process feeds (its devices' share)."""
  check_batch_divisible(global_batch, mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return global_batch // mesh.devices.size * local_devices


def process_batch_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
  """Rows of a global batch that this process feeds, in the order `to_global_batch` takes them.

  jax maps a process's local rows onto the sorted global rows of its devices, so every
  process can cut its part out of the same global batch and the batch stays independent
  of how many processes there are.
  """
  check_batch_divisible(global_batch, mesh)
  slices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
  return np.unique(np.concatenate([np.arange(*s[0].indices(global_batch)) for s in slices]))


def to_global_batch(
  local: dict[str, np.ndarray], mesh: Mesh, stacked: bool = False
) -> dict[str, jax.Array]:
  """Assemble each process's part of a batch into global arrays sharded on `data`."""
  sharding = batch_sharding(mesh, stacked)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
