"""Checkpoints: model + optimizer state and the data iterator's state, saved together.

One orbax `CheckpointManager` step directory `W/checkpoints/<step>/` holds a Composite of
  state: the TrainState pytree (StandardSave: sharded arrays, written by every process), and
  data:  the batch iterator's position (grain's handler: one JSON file per process, since
         every process reads its own slice of the data).
Saves are asynchronous when `checkpoint.async_save` (the host copies device arrays, then
writes in a background thread); `keep` newest steps are retained. Restore reads into the
shardings of a target state built on the current mesh, so a run can resume on a different
mesh shape.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging
import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from scone_jax import paths
from scone_jax.config import CheckpointConfig


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


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, ckpt_cfg: CheckpointConfig):
    if ckpt_cfg.keep < 1:
      raise ValueError(f'config.checkpoint.keep={ckpt_cfg.keep} must be >= 1')
    self.directory = paths.resolve(directory)  # gs:// URLs go to orbax as they are.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, create=True,
        enable_async_checkpointing=ckpt_cfg.async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    """Starts saving `state` (and the iterator's position) as `step`; returns once the
    iterator state and a host copy of the arrays are taken (async) or written (sync)."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_JsonStateIterator(data_iterator))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
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

  def wait(self) -> None:
    """Blocks until any in-flight async save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
