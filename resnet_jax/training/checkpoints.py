"""Checkpoints in WORKDIR/checkpoints with orbax: async, atomic, verified, self-healing.

Orbax writes each step into a temporary directory and renames it when complete, so a
kill mid-save leaves the previous checkpoints untouched (the leftover is cleaned up at
the next start). Each save also records a fingerprint of every array of the state (in the
checkpoint's own metadata); a restore recomputes it, so a checkpoint whose bytes changed
after it was written (a flipped bit, garbage, truncated or deleted files) is known to be
damaged; so is one whose fingerprints are gone from a directory where every checkpoint
is saved with them (FINGERPRINTED_MARKER). A damaged checkpoint is moved aside to
WORKDIR/checkpoints_damaged and the next older one is used. Three things are never
called damage and never move a file:
- a checkpoint that is intact but holds another state (another model or optimizer: the
  workdir belongs to another config): a UserError naming the first mismatch;
- every checkpoint unreadable: a UserError, with everything left where it is;
- a read-only manager (evaluation): it falls back without moving anything.

The train state is all there is to restore: the data pipeline is a function of
(seed, step), and training draws no other randomness.
"""

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax import sharding
from resnet_jax.errors import CheckpointWriteError, UserError, first_line

log = logging.getLogger(__name__)

CHECKSUM_KEY = 'fingerprints'
_SETTLE_S = 60.0  # how long a failed read waits for the others in flight (_SettlingEventLoop)
# Written into a new checkpoints directory: every checkpoint in it carries fingerprints, so
# one without them (its _CHECKPOINT_METADATA deleted or garbled) is damage, not an older
# format. Directories from before fingerprints have no marker and restore such steps.
FINGERPRINTED_MARKER = 'FINGERPRINTED'


class _Damaged(Exception):
  """A checkpoint's files cannot be read back as the state that was saved."""


class _SettlingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, closed with tasks still pending, first lets them finish.

  Orbax runs each read in a fresh event loop (asyncio_utils.run_sync) and closes it as soon
  as the read's coroutine ends. On a damaged checkpoint that is at the first failed array,
  while the other reads of its `asyncio.gather` are still in tensorstore's threads: each of
  them then calls back into the closed loop ('Event loop is closed', a traceback apiece on
  stderr) or is dropped unretrieved ('exception was never retrieved'), hundreds of
  tracebacks after the one-line report. Waiting for them costs no more than reading a good
  checkpoint; a read that hangs (remote storage) is left behind after _SETTLE_S.
  """

  def close(self) -> None:
    deadline = time.monotonic() + _SETTLE_S
    # Tasks that finish may start others (a gather of reads after a gather of opens).
    while not self.is_closed() and not self.is_running() and (tasks := asyncio.all_tasks(self)):
      left = deadline - time.monotonic()
      if left <= 0:
        break
      done, _ = self.run_until_complete(asyncio.wait(tasks, timeout=left))
      for task in done:
        if not task.cancelled():
          task.exception()  # retrieved: the read's first failure is what orbax raised
    super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
  """asyncio's default policy, whose new event loops are _SettlingEventLoops."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _SettlingEventLoop()


@contextlib.contextmanager
def _settled_reads():
  """Orbax's reads inside this block leave no task running after they fail (see
  _SettlingEventLoop). Orbax makes its loops with asyncio.new_event_loop(), which asks the
  event loop policy, the one hook asyncio offers (deprecated in Python 3.14, gone in 3.16),
  so the policy is swapped for the block: a save's background thread keeps its own loops."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_SettlingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def leaf_name(path: tuple[Any, ...]) -> str:
  """'params/stage1_block1/conv1/kernel' for a pytree key path (dict, attribute or index keys)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> jax.Array:
  """[n, 2] uint32: two position-weighted sums of each array's bits.

  Both sums weight element i's bits with an odd number, so a change of any single bit
  changes the first sum (mod 2^32); the second mixes the bits first, so that unrelated
  garbage matches both with probability ~2^-64. Integer sums wrap exactly, so the result
  is the same on any device count and reduction order.
  """
  rows = []
  for x in leaves:
    bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    bits = jax.lax.bitcast_convert_type(bits, jnp.dtype(f'uint{bits.dtype.itemsize * 8}'))
    u = bits.reshape(-1).astype(jnp.uint32)
    i = jnp.arange(u.size, dtype=jnp.uint32)
    first = jnp.sum(u * (i * jnp.uint32(2654435761) | 1), dtype=jnp.uint32)
    mixed = (u ^ (u >> 15)) * jnp.uint32(0x85EBCA6B)
    second = jnp.sum((mixed ^ (mixed >> 13)) * (i * jnp.uint32(0x9E3779B9) | 1), dtype=jnp.uint32)
    rows.append(jnp.stack([first, second]))
  return jnp.stack(rows)


def fingerprints(tree: Any) -> dict[str, str]:
  """{leaf name: 16 hex digits} identifying the exact bits of every array of `tree`."""
  named = jax.tree_util.tree_leaves_with_path(tree)
  if not named:
    return {}
  sums = _fingerprint_arrays([x for _, x in named])
  sums = sharding.host_copy(sums)  # replicated
  return {leaf_name(p): f'{a:08x}{b:08x}' for (p, _), (a, b) in zip(named, sums, strict=True)}


def _structure_mismatch(saved: Any, expected: Any) -> str | None:
  """The first difference between a checkpoint's array metadata and the expected state."""
  have = {leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  want = {leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  for name in sorted(want.keys() - have.keys()):
    return f'it has no {name}'
  for name in sorted(have.keys() - want.keys()):
    return f'it has {name}, which this config does not'
  for name in sorted(want):
    a, b = have[name], want[name]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      return (
        f'{name} is {np.dtype(a.dtype).name}{list(a.shape)} there, '
        f'{np.dtype(b.dtype).name}{list(b.shape)} in this config'
      )
  return None


class Checkpoints:
  """Keeps the last `keep` checkpoints plus the best by eval top-1."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._damaged_dir = os.path.abspath(os.path.join(workdir, 'checkpoints_damaged'))
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(
        [
          policies.LatestN(n=keep),
          policies.BestN(
            get_metric_fn=lambda m: m['eval_top1'], n=1, keep_checkpoints_without_metrics=False
          ),
        ]
      ),
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=True,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else 1,
    )
    # The handler up front lets item_metadata read a checkpoint before any save or restore.
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )
    self.last_save_blocked_s = 0.0
    self._unconfirmed_save = False  # a save whose background write may still fail
    self._marker = os.path.join(self.directory, FINGERPRINTED_MARKER)
    if not read_only and not self.steps() and jax.process_index() == 0:
      with open(self._marker, 'w') as f:
        f.write('Every checkpoint here records fingerprints of its arrays.\n')

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
  ) -> None:
    """Start an async save of `state` at `step`; returns once the arrays are copied off
    the devices, while the files are written in the background.

    `extra` (JSON) is stored in the checkpoint's metadata beside the state's fingerprints.
    Raises CheckpointWriteError if this or an earlier save could not be written.
    """
    self.check()
    if step in self._manager.all_steps():
      return  # e.g. a final save right after a periodic one
    self._check_free_space(sum(x.nbytes for x in jax.tree.leaves(state)))
    start = time.perf_counter()
    custom = {CHECKSUM_KEY: fingerprints(state), **(extra or {})}
    try:
      self._manager.save(
        step,
        args=ocp.args.StandardSave(state),
        metrics=metrics,
        force=True,
        custom_metadata=custom,
      )
    except Exception as e:  # noqa: BLE001 - translated to one line when it is an I/O failure
      raise self._write_error(e) from e
    self._unconfirmed_save = True
    self.last_save_blocked_s = time.perf_counter() - start

  def _check_free_space(self, state_bytes: int) -> None:
    """Refuse a save that cannot fit, before orbax starts it (a full disk mid-save fails in
    background threads, with pages of tracebacks)."""
    if '://' in self.directory:
      return
    free = shutil.disk_usage(self.directory).free
    needed = state_bytes * 1.05 + 2**20  # the state, orbax's metadata, and a margin
    if free < needed:
      needed_mib, state_mib, free_mib = _mib(needed, state_bytes, free)
      raise CheckpointWriteError(
        f'cannot write a checkpoint in {self.directory}: it needs {needed_mib} (the state is '
        f"{state_mib}, plus 5% and 1 MiB of margin for orbax's files) and only {free_mib} are "
        'free. The checkpoints already there are intact; free at least the difference, then '
        'rerun the same command to resume.'
      )

  def check(self) -> None:
    """Raise CheckpointWriteError if a background save has failed.

    Cheap enough for every step: it asks orbax only while a save is unconfirmed.
    """
    if not self._unconfirmed_save:
      return
    try:
      self._manager.check_for_errors()
      if not self._manager.is_saving_in_progress():
        # Returns at once, or raises what a finished save's background thread raised
        # (check_for_errors does not see those).
        self._manager.wait_until_finished()
        self._unconfirmed_save = False
    except Exception as e:  # noqa: BLE001
      raise self._write_error(e) from e

  def _write_error(self, e: BaseException) -> BaseException:
    """A one-line CheckpointWriteError for an I/O failure; other errors pass through."""
    text = ' '.join(str(e).split())
    if isinstance(e, OSError) and e.errno is not None:
      problem = os.strerror(e.errno)
    elif 'No space left' in text or f"os_error_code='{errno.ENOSPC}'" in text:
      problem = 'No space left on device'
    elif 'Permission denied' in text or 'Read-only file system' in text:
      problem = 'not writable'
    else:
      return e
    return CheckpointWriteError(
      f'cannot write a checkpoint in {self.directory}: {problem}. The checkpoints already '
      'there are intact; make room or fix the permissions, then rerun the same command to '
      'resume.'
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> Any | None:
    """The state at `step` (default: the latest good one), laid out like `abstract_state`.

    `abstract_state` holds ShapeDtypeStructs with the target shardings, so a checkpoint
    saved on one mesh restores onto any other. Returns None if there is no checkpoint.
    A damaged latest checkpoint is reported in one line and the previous one restored
    instead (moving the damaged one aside unless read-only); an explicitly requested
    `step` is never skipped.
    """
    if step is not None and step not in self.steps():
      raise UserError(
        f'no checkpoint at step {step} in {self.directory}; available: {self.steps()}.'
      )
    damaged: list[tuple[int, str]] = []
    for s in [step] if step is not None else sorted(self.steps(), reverse=True):
      try:
        with _settled_reads():
          state = self._restore_verified(s, abstract_state)
      except _Damaged as e:
        damaged.append((s, str(e)))
        log.warning('checkpoint at step %d is damaged (%s)', s, e)
        continue
      self._set_aside([d for d, _ in damaged])
      return state
    if damaged:
      listing = '; '.join(f'step {s}: {why}' for s, why in damaged)
      raise UserError(
        f'no readable checkpoint in {self.directory} ({listing}); nothing was moved or '
        'deleted. Use a new --workdir to start again, or restore the files.'
      )
    return None

  def restore_as_saved(self, target: jax.sharding.Sharding, step: int | None = None) -> Any | None:
    """The checkpoint at `step` (default: the latest good one) in the structure it was saved
    in (a dict of the state's fields), every array placed with `target`; None if there is
    none. For reading another run's checkpoints without its config (e.g. init_from)."""
    if step is not None and step not in self.steps():
      return self.restore({}, step)  # the one-line error naming the available steps
    steps = [step] if step is not None else sorted(self.steps(), reverse=True)
    for s in steps:
      try:
        with _settled_reads():
          saved = self._manager.item_metadata(s)
      except Exception:  # noqa: BLE001 - unreadable metadata: an older checkpoint may do
        saved = None
      if saved is not None:
        shapes = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=target), dict(saved)
        )
        return self.restore(shapes, step)
    if steps:
      raise UserError(f'no readable checkpoint in {self.directory}; restore the files.')
    return None

  def _restore_verified(self, step: int, abstract_state: Any) -> Any:
    """Restore `step`; _Damaged if its files are unreadable or its bits changed.

    A checkpoint that reads fine but holds another state's structure is a UserError:
    the config does not fit the workdir, and nothing about the files is wrong.
    """
    try:
      saved = self._manager.item_metadata(step)
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception as e:  # noqa: BLE001 - any failure to read means damage
      raise _Damaged(f'metadata unreadable: {first_line(e, 80)}') from e
    if saved is None:
      raise _Damaged('no array metadata')
    mismatch = _structure_mismatch(saved, abstract_state)
    if mismatch:
      raise UserError(
        f'the checkpoint at step {step} in {self.directory} does not fit this config '
        f'({mismatch}); this workdir was made by another config: use a new --workdir, '
        'or the config that made it.'
      )
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 - any failure to read means damage
      raise _Damaged(f'array data unreadable: {first_line(e, 80)}') from e
    expected = custom.get(CHECKSUM_KEY)
    if expected is None and os.path.exists(self._marker):
      raise _Damaged('its metadata has lost the fingerprints every checkpoint here is saved with')
    if expected is None:
      log.warning('checkpoint at step %d has no fingerprints (older format); not verified', step)
      return state
    actual = fingerprints(state)
    changed = sorted(k for k in actual if expected.get(k) != actual[k])
    if changed:
      raise _Damaged(f'{len(changed)} arrays differ from what was saved, e.g. {changed[0]}')
    return state

  def custom_metadata(self, step: int) -> dict[str, Any]:
    """What `save(..., extra=...)` stored with `step` (empty for older checkpoints)."""
    return dict(self._manager.metadata(step).custom_metadata or {})

  def _set_aside(self, steps: list[int]) -> None:
    """Move damaged checkpoints to WORKDIR/checkpoints_damaged (never in read-only mode)."""
    if self._read_only or not steps:
      return
    if jax.process_index() == 0:  # one mover; the other processes wait for it
      os.makedirs(self._damaged_dir, exist_ok=True)
      for s in steps:
        target = os.path.join(self._damaged_dir, f'{s}_{int(time.time())}')
        shutil.move(os.path.join(self.directory, str(s)), target)
        log.warning('moved the damaged checkpoint of step %d to %s', s, target)
    multihost_utils.sync_global_devices('set aside damaged checkpoints')
    self._manager.reload()

  def wait(self) -> None:
    """Block until every started save is on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(e) from e
    self._unconfirmed_save = False

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _mib(*sizes: float) -> list[str]:
  """Sizes in MiB with as many decimals (1 to 6) as it takes for different sizes to read as
  different: 'needs 3.72 MiB, 3.69 MiB free', never 'needs 3.7 MiB, 3.7 MiB free'."""
  for decimals in range(1, 7):
    shown = [f'{n / 2**20:.{decimals}f} MiB' for n in sizes]
    if len(set(shown)) == len(set(sizes)):
      break
  return shown
