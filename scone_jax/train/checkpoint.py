"""Checkpoints: model + optimizer state and the data iterator's state, saved together.

One orbax `CheckpointManager` step directory `W/checkpoints/<step>/` holds a Composite of
  state: the TrainState pytree (StandardSave: sharded arrays, written by every process), and
  data:  the batch iterator's position (grain's handler: one JSON file per process, since
         every process reads its own slice of the data).
Saves are asynchronous when `checkpoint.async_save` (the host copies device arrays, then
writes in a background thread); `keep` newest steps are retained. Restore reads into the
shardings of a target state built on the current mesh, so a run can resume on a different
mesh shape.

Integrity: once a save is known committed (`raise_if_save_failed`, at the step boundary
after an async save finishes, or `wait`/`close`), process 0 records every file's crc32c in
`<step>/checksums.json` (scone_jax/checkpoint_files.py), in a background thread joined
before the next save starts (so orbax's `keep` clean-up never deletes a step being read). `restore_latest` checks them
first and falls back to the newest step that is intact and restores to finite weights when
the latest has flipped bytes, is truncated or does not restore (warning naming both, and
moving the bad step aside so the run can save that step again); a step saved without
checksums (an older version) is restored with a warning. A failure of an async save (disk
full, permissions, ...) is re-raised in the training thread by `raise_if_save_failed` at
the next step boundary as one `CheckpointSaveError`, because orbax's finalize thread only
logs it and carries on.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Any

from absl import logging
import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from scone_jax import checkpoint_files, paths
from scone_jax.config import CheckpointConfig
from scone_jax.errors import UserError


class _JsonStateIterator:
  """Adapts any iterator with a JSON-serialisable `get_state()`/`set_state()` to grain's
  orbax handler, which stores `get_state()` bytes per process for non-grain iterators."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state(), sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    """Called by grain's handler after a restore; prefetching is the iterator's business."""


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's (real-mesh) sharding: the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointSaveError(UserError, RuntimeError):
  """Saving a checkpoint failed (e.g. the disk is full); training stops."""


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs under `directory`.

  Args:
    directory: the checkpoints directory (W/checkpoints).
    ckpt_cfg: the `checkpoint` config section.
    writer: this process owns the run directory (the train loop, under the run lock):
      orbax's temporary step folders left by a killed save are removed at start-up.
      Readers (evaluate, export) must not: a live trainer may be writing one.
  """

  def __init__(self, directory: str, ckpt_cfg: CheckpointConfig, writer: bool = False):
    if ckpt_cfg.keep < 1:
      raise ValueError(f'config.checkpoint.keep={ckpt_cfg.keep} must be >= 1')
    self.directory = paths.resolve(directory)  # gs:// URLs go to orbax as they are.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, create=True,
        enable_async_checkpointing=ckpt_cfg.async_save, cleanup_tmp_directories=writer)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending_step: int | None = None  # The async save not yet confirmed finalized.
    self._save_error: BaseException | None = None
    self._record_background_errors()
    # Process 0 records a committed step's checksums off the training thread.
    self._hasher = concurrent.futures.ThreadPoolExecutor(1, 'scone_jax-checksums')
    self._checksums: tuple[int, concurrent.futures.Future] | None = None

  def _record_background_errors(self) -> None:
    """Keeps the exception of a failed background save for our message: orbax's finalize
    thread consumes it (check_for_errors clears it) and only logs it."""
    inner = getattr(getattr(self.manager, '_checkpointer', None), 'check_for_errors', None)
    if inner is None:  # Another orbax layout: the failure is still detected, not its cause.
      return

    def check_for_errors():
      try:
        inner()
      except BaseException as e:
        self._save_error = e
        raise
    self.manager._checkpointer.check_for_errors = check_for_errors  # pylint: disable=protected-access

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def raise_if_save_failed(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last async save failed; cheap while it runs.

    Args:
      wait: block until the save in flight is done (else only a finished one is checked).
    """
    step = self._pending_step
    if step is None:
      return
    if wait:
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._save_error = self._save_error or e
    elif self.manager.is_saving_in_progress():
      return
    self._pending_step = None
    self.manager.reload()
    if self._save_error is None and step in self.manager.all_steps():
      if jax.process_index() == 0:
        self._checksums = (step, self._hasher.submit(
            checkpoint_files.write_checksums, self.directory, step))
      return
    cause = self._save_error
    detail = f'{type(cause).__name__}: {cause}' if cause is not None else (
        'the step was not finalized; see the error logged above')
    previous = [s for s in self.manager.all_steps() if s < step]
    raise CheckpointSaveError(
        f'saving checkpoint step {step} to {self.directory} failed ({detail}). Training '
        f'stopped; the newest saved step is {max(previous) if previous else None}. Fix '
        'the cause (e.g. free disk space) and rerun the same command to resume') from cause

  def _finish_checksums(self) -> None:
    """Waits for the checksums of the last committed step; CheckpointSaveError if they
    could not be written."""
    if self._checksums is None:
      return
    step, future = self._checksums
    self._checksums = None
    try:
      future.result()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f'recording the checksums of checkpoint step {step} in {self.directory} failed '
          f'({type(e).__name__}: {e}). Training stopped; fix the cause (e.g. free disk '
          'space) and rerun the same command to resume') from e

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    """Starts saving `state` (and the iterator's position) as `step`; returns once the
    iterator state and a host copy of the arrays are taken (async) or written (sync)."""
    self.raise_if_save_failed(wait=True)
    self._finish_checksums()
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_JsonStateIterator(data_iterator))
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f'saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: '
          f'{e}). Training stopped; fix the cause (e.g. free disk space) and rerun the '
          'same command to resume') from e
    self._pending_step = step
    logging.info('checkpoint: saving step %d to %s', step, self.directory)

  def restore(self, step: int, target_state: Any, data_iterator: Any | None = None) -> Any:
    """Returns the saved state laid out like `target_state` (arrays or ShapeDtypeStructs
    with shardings); sets `data_iterator` to the saved position in place."""
    items = {'state': ocp.args.StandardRestore(abstract_like(target_state))}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(_JsonStateIterator(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return restored['state']

  def _restore_checked(self, step: int, target_state: Any, data_iterator: Any | None
                       ) -> Any:
    """`restore`, after the step's checksums and before handing back weights that are not
    finite; CheckpointCorruptError if either fails."""
    check = checkpoint_files.check_step(self.directory, step)
    if check.status == 'unverified':
      logging.warning('checkpoint step %d in %s is unverified (%s)', step, self.directory,
                      check.detail)
    else:
      checkpoint_files.raise_if_corrupt(self.directory, check)
    state = self.restore(step, target_state, data_iterator)
    if not checkpoint_files.all_finite(state):
      # The loop never saves a diverged state, so NaN/Inf here is damage on disk.
      checkpoint_files.raise_if_corrupt(self.directory, checkpoint_files.StepCheck(
          step, 'corrupt', 'its restored values are not finite (NaN/Inf)'))
    return state

  def restore_latest(self, target_state: Any, data_iterator: Any | None = None
                     ) -> tuple[int | None, Any]:
    """(step, state) of the newest intact checkpoint; (None, target_state) if there is
    none.

    A step that fails its checksums, does not restore (truncated files) or restores to
    NaN/Inf is logged with the step tried next, and moved aside to `<step>.corrupt-<time>`
    (kept for inspection; orbax ignores the name), so the resumed run can save that step
    again. If no step restores, the newest one's error is raised: then the cause is not
    one bad step (e.g. a model of another shape).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    first_error = None
    for i, step in enumerate(steps):
      try:
        state = self._restore_checked(step, target_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
        following = steps[i + 1] if i + 1 < len(steps) else None
        logging.warning('checkpoint step %d in %s is corrupt or does not restore (%s: %s); '
                        'falling back to step %s', step, self.directory, type(e).__name__,
                        (str(e).splitlines() or [''])[0][:300], following)
        continue
      for bad in steps[:i]:
        self._move_aside(bad)
      if i:
        logging.warning('checkpoint: resumed from step %d instead of the corrupt latest '
                        'step %d', step, steps[0])
      return step, state
    if first_error is not None:
      raise first_error
    return None, target_state

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      aside = f'{path}.corrupt-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}'
      os.replace(path, aside)
      logging.warning('checkpoint: moved the corrupt step %d to %s', step, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'scone_jax.checkpoint.move_aside.{step}')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until any in-flight async save is committed and its checksums recorded;
    raises CheckpointSaveError if either failed."""
    self.raise_if_save_failed(wait=True)
    self._finish_checksums()

  def close(self) -> None:
    try:
      self.raise_if_save_failed(wait=True)
      self._finish_checksums()
    finally:
      self.manager.wait_until_finished()
      self.manager.close()
      self._hasher.shutdown()
