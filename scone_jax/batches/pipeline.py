"""Train and eval batch pipelines (grain), and the host -> global jax.Array step.

Dimension letters: B rows per process, P processes, T sequence length, R packed A_f rows
(a bucket, `tagging.row_bucket`), W their width, K longest f-gram.

Global batch s is rows [s*Bg, (s+1)*Bg) of the row stream in `order.RowOrder` (Bg =
train.batch_size), a pure function of (train.seed, s). Process p builds only its
contiguous slice, rows [s*Bg + p*B, s*Bg + (p+1)*B) with B = Bg / P, so a 2-process run
sees exactly the rows of a 1-process run. The dataset is a grain `MapDataset` indexed by
step; its iterator's state is {'next_index': step}, checkpointed with
`grain.checkpoint.CheckpointSave(it)` next to the model and restored bit-exactly.

Batches are numpy dicts (ARCHITECTURE.md "batches"); entries under `stats/` are float32
scalars for logging (tokens, f-gram statistics), never model inputs: `split_stats`
separates them.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import grain
import jax
import numpy as np

from scone_jax import config as config_lib
from scone_jax.batches import order as order_lib
from scone_jax.batches import packing
from scone_jax.batches import tagging

BOS_ID = 1  # The tokenizer contract: pad 0, bos 1, eos 2, unk 3.
STATS_PREFIX = tagging.STATS_PREFIX


class BatchDataset(grain.MapDataset):
  """Element s = this process's slice of global batch s (a numpy dict)."""

  def __init__(self, shards, rows: order_lib.RowOrder, *, global_batch_size: int,
               num_batches: int | None, bos_id: int, table: tagging.Matcher | None,
               capacity: int, process_index: int, process_count: int,
               bucket_growth: float = 1.2, train: bool = True):
    super().__init__()
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, process_count='
                       f'{process_count})')
    if global_batch_size % process_count:
      raise ValueError(f'train.batch_size={global_batch_size} is not divisible by the '
                       f'{process_count} processes; each process gets an equal row slice')
    self._shards = shards
    self._rows = rows
    self._global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._num_batches = num_batches
    self._bos_id = bos_id
    self._table = table
    self._capacity = capacity
    self._bucket_growth = bucket_growth
    self._process_index = process_index
    self._train = train

  def __len__(self) -> int:
    return sys.maxsize if self._num_batches is None else self._num_batches

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < 0 or index >= len(self):
      raise IndexError(f'batch {index} out of range [0, {len(self)})')
    first = index * self._global_batch_size + self._process_index * self.local_batch_size
    row_examples = self._rows.rows(first, self.local_batch_size)
    batch: dict[str, Any] = packing.build_rows(
        self._rows.examples, row_examples, self._shards.tokens, self._shards.offsets,
        self._bos_id, self._rows.seq_len, getattr(self._shards, 'loss_mask', None))
    if self._train and 'loss_mask_BxT' in batch:
      # Supervised fine-tuning: the loss covers response tokens only. Eval batches keep
      # both (every token's loss and the response loss, evaluate.py).
      batch['weights_BxT'] = batch.pop('loss_mask_BxT')
    batch[STATS_PREFIX + 'num_tokens'] = np.float32(batch['weights_BxT'].sum())
    if self._table is not None:
      batch = tagging.tag_fgrams(batch, self._table, self._capacity, self._bucket_growth)
    return batch

  def __str__(self) -> str:
    return f'BatchDataset(local_batch_size={self.local_batch_size})'


def _scone_table(cfg: config_lib.Config, table):
  """The table to tag with, or None for the baseline; sliced to cfg.fgram.rows_used."""
  if not cfg.fgram_model.uses_fgram_table:  # Baseline, or kind='hashed' (hashes on device).
    return None
  if table is None:
    raise ValueError("an f-gram side (config.fgram_model.num_layers > 0, or kind='table') "
                     'needs an FgramTable: pass FgramTable.load(<artifacts>/fgrams) as the '
                     'table argument')
  return table.slice(cfg.fgram.rows_used(len(table)))


def _read_options(cfg: config_lib.Config) -> grain.ReadOptions:
  # One thread is enough to hide batch building behind the device step; more threads
  # only fight over the GIL on small hosts.
  prefetch = cfg.train.data_prefetch
  if prefetch < 0:
    raise ValueError(f'config.train.data_prefetch={prefetch} must be >= 0')
  return grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)


def make_train_dataset(cfg: config_lib.Config, shards, table=None, process_index: int = 0,
                       process_count: int = 1, *, bos_id: int = BOS_ID) -> BatchDataset:
  """The endless training batches as a random-access grain MapDataset (index = step)."""
  examples = packing.make_examples(shards.offsets, cfg.train.seq_len)
  rows = order_lib.RowOrder(examples, cfg.train.seq_len, seed=cfg.train.seed,
                            shuffle=True, repeat=True,
                            block_docs=cfg.train.shuffle_buffer_docs)
  table = _scone_table(cfg, table)
  return BatchDataset(shards, rows, global_batch_size=cfg.train.batch_size,
                      num_batches=None, bos_id=bos_id, table=table,
                      capacity=cfg.fgram_model.capacity, process_index=process_index,
                      process_count=process_count,
                      bucket_growth=cfg.fgram_model.bucket_growth)


def make_train_iterator(cfg: config_lib.Config, shards, table=None, process_index: int = 0,
                        process_count: int = 1, *,
                        bos_id: int = BOS_ID) -> grain.DatasetIterator:
  """Training batches from step 0; `it.get_state()`/`set_state()` resume bit-exactly.

  Args:
    cfg: the run config (train.seed/batch_size/seq_len/shuffle_buffer_docs/data_prefetch,
      fgram_model.num_layers/capacity, fgram.use_size).
    shards: `TokenShards` of the training split (.tokens, .offsets).
    table: the `FgramTable` for SCONE runs (ignored, may be None, for the baseline).
    process_index, process_count: this process's slice of each global batch
      (jax.process_index(), jax.process_count()).
    bos_id: the tokenizer's BOS id.
  """
  dataset = make_train_dataset(cfg, shards, table, process_index, process_count,
                               bos_id=bos_id)
  return iter(dataset.to_iter_dataset(_read_options(cfg)))


def make_eval_dataset(cfg: config_lib.Config, shards, table=None, process_index: int = 0,
                      process_count: int = 1, *, batch_size: int | None = None,
                      max_batches: int | None = None,
                      bos_id: int = BOS_ID) -> BatchDataset:
  """Every document of `shards` once, unshuffled, packed like training; finite.

  The last batch is padded with empty rows (weights 0). `len(dataset)` is the number of
  batches: ceil(rows / batch_size), at most `max_batches` (None or 0 = all).
  """
  batch_size = batch_size or cfg.train.batch_size
  examples = packing.make_examples(shards.offsets, cfg.train.seq_len)
  rows = order_lib.RowOrder(examples, cfg.train.seq_len, shuffle=False, repeat=False)
  num_batches = -(-rows.rows_per_first_epoch // batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  table = _scone_table(cfg, table)
  return BatchDataset(shards, rows, global_batch_size=batch_size, num_batches=num_batches,
                      bos_id=bos_id, table=table, capacity=cfg.fgram_model.capacity,
                      process_index=process_index, process_count=process_count,
                      bucket_growth=cfg.fgram_model.bucket_growth, train=False)


def make_eval_iterator(cfg: config_lib.Config, shards, table=None, process_index: int = 0,
                       process_count: int = 1, *, batch_size: int | None = None,
                       max_batches: int | None = None,
                       bos_id: int = BOS_ID) -> grain.DatasetIterator:
  """Iterator over `make_eval_dataset`; sum stats/num_tokens for per-token loss and
  divide summed NLL (nats) by ln(2) * shards.num_bytes for bits per byte."""
  dataset = make_eval_dataset(cfg, shards, table, process_index, process_count,
                              batch_size=batch_size, max_batches=max_batches,
                              bos_id=bos_id)
  return iter(dataset.to_iter_dataset(_read_options(cfg)))


def split_stats(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
  """(model inputs, {name without prefix: float}) of a batch."""
  inputs = {k: v for k, v in batch.items() if not k.startswith(STATS_PREFIX)}
  stats = {k[len(STATS_PREFIX):]: float(v) for k, v in batch.items()
           if k.startswith(STATS_PREFIX)}
  return inputs, stats


def offset_slots(slot_BxT: np.ndarray, process_index: int, capacity: int) -> np.ndarray:
  """Local slots -> slots into the global packed rows (-1 stays -1); capacity = R * W,
  the flat size of one process's block of rows."""
  return np.where(slot_BxT >= 0, slot_BxT + process_index * capacity, -1).astype(np.int32)


def _data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.axis_names]))


def agree_fgram_rows(local_rows: int, mesh: jax.sharding.Mesh) -> int:
  """The row count every process pads its f-gram rows to: the largest process's bucket,
  rounded up so the global [P*R, W] splits evenly over the mesh's data-parallel devices.
  With several processes this is one small all-gather per batch."""
  rows = local_rows
  process_count = jax.process_count()
  if process_count > 1:
    from jax.experimental import multihost_utils
    rows = int(np.max(multihost_utils.process_allgather(np.array([local_rows], np.int64))))
  per_process = max(_data_parallel_size(mesh) // process_count, 1)
  return -(-rows // per_process) * per_process


def _default_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  # Leading (batch / f-gram list) dim over the data-parallel axes; the rest replicated.
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


def to_global_arrays(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                     shardings: Mapping[str, jax.sharding.Sharding] | jax.sharding.Sharding
                     | None = None) -> dict[str, jax.Array]:
  """This process's batch -> global jax.Arrays ([P*B, T], [P*R, W]).

  Stats entries are dropped. Every process pads its packed f-gram rows to one agreed R
  (`agree_fgram_rows`); slots are offset by process_index * R * W so they index the global
  rows, of which rows [p*R, (p+1)*R) are process p's.

  Args:
    local_batch: an element of a train/eval iterator.
    mesh: the device mesh.
    shardings: one Sharding per key, one for all, or None for the leading dim over the
      mesh's ('data', 'fsdp') axes.
  """
  inputs, _ = split_stats(local_batch)
  process_index, process_count = jax.process_index(), jax.process_count()
  if 'fgram_slot_BxT' in inputs:
    rows = agree_fgram_rows(inputs['fgram_tokens_RxW'].shape[0], mesh)
    inputs = tagging.pad_fgram_rows(inputs, rows)
    inputs['fgram_slot_BxT'] = offset_slots(inputs['fgram_slot_BxT'], process_index,
                                            inputs['fgram_tokens_RxW'].size)
  out = {}
  for key, value in inputs.items():
    if isinstance(shardings, Mapping):
      if key not in shardings:
        raise KeyError(f'to_global_arrays: no sharding for batch key {key!r}; '
                       f'shardings has {sorted(shardings)}')
      sharding = shardings[key]
    else:
      sharding = shardings or _default_sharding(mesh)
    global_shape = (value.shape[0] * process_count,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
