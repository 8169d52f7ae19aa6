"""Checkpoints in WORKDIR/checkpoints with orbax: async, atomic, self-healing.

Orbax writes each step into a temporary directory and renames it when complete, so a
kill mid-save leaves the previous checkpoints untouched (the leftover is cleaned up at
the next start). A checkpoint that is complete on disk but damaged later (truncated or
deleted files) fails to restore; it is moved aside to WORKDIR/checkpoints_damaged and
the next older one is used, so the workdir never becomes unusable.

The train state is all there is to restore: the data pipeline is a function of
(seed, step), and training draws no other randomness.
"""

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class Checkpoints:
  """Keeps the last `keep` checkpoints plus the best by eval top-1."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._damaged_dir = os.path.abspath(os.path.join(workdir, 'checkpoints_damaged'))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(
        [
          policies.LatestN(n=keep),
          policies.BestN(
            get_metric_fn=lambda m: m['eval_top1'], n=1, keep_checkpoints_without_metrics=False
          ),
        ]
      ),
      cleanup_tmp_directories=True,
      enable_async_checkpointing=True,
      read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_save_blocked_s = 0.0

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Start an async save of `state` at `step`; returns once the arrays are copied off
    the devices, while the files are written in the background."""
    if step in self._manager.all_steps():
      return  # e.g. a final save right after a periodic one
    start = time.perf_counter()
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    self.last_save_blocked_s = time.perf_counter() - start

  def restore(self, abstract_state: Any, step: int | None = None) -> Any | None:
    """The state at `step` (default: the latest good one), laid out like `abstract_state`.

    `abstract_state` holds ShapeDtypeStructs with the target shardings, so a checkpoint
    saved on one mesh restores onto any other. Returns None if there is no checkpoint.
    A damaged latest checkpoint is reported in one line, moved aside, and the previous
    one restored instead; an explicitly requested `step` is never skipped.
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    if step is not None and step not in self.steps():
      raise FileNotFoundError(
        f'no checkpoint at step {step} in {self.directory}; available: {self.steps()}'
      )
    for s in candidates:
      try:
        return self._manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
        if step is not None:
          raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(
          'checkpoint at step %d is damaged (%s); moved to %s, trying an older one',
          s,
          first_line[:200],
          self._damaged_dir,
        )
        self._quarantine(s)
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:  # one mover; the other processes wait for it
      os.makedirs(self._damaged_dir, exist_ok=True)
      target = os.path.join(self._damaged_dir, f'{step}_{int(time.time())}')
      shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
    self._manager.reload()

  def wait(self) -> None:
    """Block until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
