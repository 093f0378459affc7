"""A_f deduplication across processes, measured on real text (numpy only, no training).

Each process runs A_f on the DISTINCT f-grams of its own slice of the global batch
(`batches/tagging.py`, stat 'fgram_unique'), so an f-gram present in P slices is computed
P times; and `jnp.take(e_NxD, slot)` all-gathers the global e_NxD ([P * R * W, d]: every
process's packed rows, each process padded to the largest process's bucket R) every step.
This script measures both against a global distinct set (each f-gram of the global batch
computed once, one row each), per process count P, with the trainer's own pipeline:
`batches.BatchDataset` cuts global batch s into P slices of B / P consecutive rows exactly
as a P-process run does, and tags each with the project's matcher and packer.

Usage:
  python benchmarks/bench_dedup.py                       # embedded corpus, prepared here
  python benchmarks/bench_dedup.py --corpus=kjv          # data/prose/kjv/train.txt
  python benchmarks/bench_dedup.py --corpus=fortunes     # data/prose/fortunes/train.txt
  python benchmarks/bench_dedup.py --tokens_dir=A/tokens/train --fgram_dir=A/fgrams

Columns per P: 'A_f rows today' = sum over processes of their distinct f-grams; 'global'
= distinct f-grams of the whole batch; 'redundant' = today / global - 1 (A_f work a
global distinct set would save); 'gather today' = the e_NxD all-gather, P * R * W rows of
d float32, or the [B, T, d] output's all-reduce where that is smaller (`Counts.exchanged_rows`:
the partitioner picks the smaller); 'gather ideal' = one float32 row of d per global
distinct f-gram.

The study corpora hold ~0.5-1M train tokens, less than a 2M-token batch: the row stream
then repeats documents within one batch (a later epoch), which a real 2M-token batch of a
large corpus does not. The script says so and also measures the largest batch (a multiple
of the largest P's rows) the corpus holds without repetition.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from scone_jax import config as config_lib
from scone_jax import prepare as prepare_lib
from scone_jax.batches import order as order_lib
from scone_jax.batches import packing
from scone_jax.batches import pipeline
from scone_jax.batches import tagging
from scone_jax.fgrams.table import FgramTable
from scone_jax.tokenizer.shards import TokenShards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSE = ('kjv', 'fortunes')  # <prose_dir>/<name>/train.txt, one document per line.


class Counts(NamedTuple):
  """One global batch split over P processes."""
  processes: int
  per_process_G: tuple[int, ...]  # Distinct f-grams of each process's slice.
  global_distinct: int  # Distinct f-grams of the whole batch.
  gathered_rows: int  # e_NxD's rows all-gathered: P * (largest process's R) * W.
  batch_tokens: int  # B * T of the global batch: the rows of take's output.

  @property
  def af_rows(self) -> int:
    return sum(self.per_process_G)

  @property
  def exchanged_rows(self) -> int:
    """Rows of d the SPMD partitioner moves for `jnp.take(e_NxD, slot_BxT)` with both
    sharded over the processes: it all-gathers e_NxD, or (when e_NxD is the larger) the
    slots and then all-reduces the [B, T, d] output; whichever is smaller (seen in the
    compiled HLO of both cases on 4 CPU devices)."""
    return min(self.gathered_rows, self.batch_tokens)

  @property
  def redundancy(self) -> float:
    return self.af_rows / max(self.global_distinct, 1) - 1.0


def count(slices: Sequence[Mapping[str, np.ndarray]]) -> Counts:
  """Counts of one global batch from its P tagged process slices (`tag_fgrams` output)."""
  ids = [np.unique(s['fgram_row_ids_RxW'][s['fgram_row_ids_RxW'] >= 0]) for s in slices]
  for s, ids_G in zip(slices, ids):  # The stat the trainer logs is what A_f runs on.
    if int(s[tagging.STATS_PREFIX + 'fgram_unique']) != ids_G.size:
      raise AssertionError(f"a slice's fgram_unique {s[tagging.STATS_PREFIX + 'fgram_unique']}"
                           f' != its {ids_G.size} distinct row ids: tagging changed')
  rows = max(s['fgram_tokens_RxW'].shape[0] for s in slices)
  width = slices[0]['fgram_tokens_RxW'].shape[1]
  return Counts(len(slices), tuple(int(i.size) for i in ids),
                int(np.unique(np.concatenate(ids)).size), len(slices) * rows * width,
                sum(int(s['inputs_BxT'].size) for s in slices))


def batch_counts(shards, table, rows: order_lib.RowOrder, *, batch_rows: int, processes: int,
                 step: int = 0, capacity: int = 0, growth: float = 1.2) -> Counts:
  """Global batch `step` of `batch_rows` rows as the trainer's P processes tag it."""
  slices = [pipeline.BatchDataset(
      shards, rows, global_batch_size=batch_rows, num_batches=None,
      bos_id=pipeline.BOS_ID, table=table, capacity=capacity, process_index=p,
      process_count=processes, bucket_growth=growth)[step] for p in range(processes)]
  return count(slices)


def _flags(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--corpus', default='embedded', choices=['embedded', *PROSE],
                 help='prepared here (tokenizer + mined table) under --workdir')
  p.add_argument('--prose_dir', default=os.path.join(ROOT, 'data', 'prose'),
                 help='where --corpus=kjv|fortunes live')
  p.add_argument('--tokens_dir', default='', help='prepared train token shards instead')
  p.add_argument('--fgram_dir', default='', help='its mined f-gram table (with --tokens_dir)')
  p.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'bench_dedup'))
  p.add_argument('--batch_tokens', type=int, default=2_097_152)
  p.add_argument('--seq_len', type=int, default=2048)
  p.add_argument('--processes', default='1,8,32,128,512')
  p.add_argument('--sizes', default='full,10000,1000',
                 help='table slices S (rank order); full = the whole table')
  p.add_argument('--d', type=int, default=2048, help='A_f output width for the gather bytes')
  p.add_argument('--steps', type=int, default=1, help='global batches averaged')
  return p.parse_args(argv)


def _open(args) -> tuple[TokenShards, FgramTable, config_lib.Config]:
  cfg = config_lib.from_configdict(config_lib.base_config())
  if args.tokens_dir or args.fgram_dir:
    if not (args.tokens_dir and args.fgram_dir):
      raise SystemExit('--tokens_dir and --fgram_dir go together (a prepared artifacts '
                       "dir's tokens/train and fgrams)")
    return (TokenShards.open(args.tokens_dir, verify=False), FgramTable.load(args.fgram_dir),
            cfg)
  data = {'data.source': 'embedded'} if args.corpus == 'embedded' else {
      'data.source': 'files', 'data.format': 'lines',
      'data.train_files': os.path.join(args.prose_dir, args.corpus, 'train.txt')}
  pcfg = config_lib.replace(cfg, **data, **{
      'fgram_model.num_layers': 1, 'fgram.allow_short_table': True, 'data.allow_no_eval': True,
      'data.artifacts_dir': os.path.join(args.workdir, f'prepare_{args.corpus}')})
  prepared = prepare_lib.prepare(pcfg, os.path.join(args.workdir, 'unused'))
  return prepared.train_shards, prepared.table, cfg


def _table(shards, table, rows: order_lib.RowOrder, cfg, args, batch_rows: int,
           sizes: Sequence[int]) -> None:
  ps = [int(p) for p in args.processes.split(',')]
  print(f'\nbatch {batch_rows} x {args.seq_len} = {batch_rows * args.seq_len:,} tokens '
        f'({batch_rows * args.seq_len / shards.num_tokens:.2f}x the corpus), mean of '
        f'{args.steps} step(s); gathers at d = {args.d}, float32')
  print(f'{"S":>8} {"P":>5} {"A_f rows today":>15} {"global":>9} {"redundant":>10} '
        f'{"max/min slice":>14} {"gather today":>13} {"gather ideal":>13} {"ratio":>7}')
  for s in sizes:
    sliced = table.slice(s)
    for p in ps:
      if batch_rows % p:
        print(f'{s:>8,} {p:>5}  (skipped: {batch_rows} rows do not split over {p} processes)')
        continue
      c = [batch_counts(shards, sliced, rows, batch_rows=batch_rows, processes=p, step=i,
                        capacity=cfg.fgram_model.capacity,
                        growth=cfg.fgram_model.bucket_growth) for i in range(args.steps)]
      af = np.mean([x.af_rows for x in c])
      glob = np.mean([x.global_distinct for x in c])
      today = np.mean([x.exchanged_rows for x in c]) * args.d * 4
      ideal = glob * args.d * 4
      spread = np.mean([max(x.per_process_G) / max(min(x.per_process_G), 1) for x in c])
      print(f'{s:>8,} {p:>5} {af:>15,.0f} {glob:>9,.0f} {af / glob - 1:>9.1%} '
            f'{spread:>14.2f} {today / 2**20:>10,.0f} MiB {ideal / 2**20:>9,.1f} MiB '
            f'{today / ideal:>6.0f}x')


def main(argv=None) -> None:
  args = _flags(argv)
  started = time.perf_counter()
  shards, table, cfg = _open(args)
  sizes = [len(table) if s == 'full' else min(int(s), len(table))
           for s in args.sizes.split(',')]
  print(f'corpus: {args.tokens_dir or args.corpus}, {shards.num_tokens:,} train tokens, '
        f'{shards.num_docs:,} documents; table S = {len(table):,} (K = {table.max_len}); '
        f'matcher/packer: batches.BatchDataset (the trainer\'s process slices); load '
        '%.1f %.1f %.1f' % os.getloadavg())
  # The trainer's row stream (train/inputs.py -> batches.make_train_dataset).
  rows = order_lib.RowOrder(packing.make_examples(shards.offsets, args.seq_len),
                            args.seq_len, seed=cfg.train.seed, shuffle=True, repeat=True,
                            block_docs=cfg.train.shuffle_buffer_docs)
  batch_rows = args.batch_tokens // args.seq_len
  _table(shards, table, rows, cfg, args, batch_rows, sizes)
  # The largest batch of the first epoch (no document twice; --steps of them) that splits
  # over the largest P it can give a row each (larger P are skipped there).
  epoch = rows.rows_per_first_epoch // args.steps
  p_max = max([int(p) for p in args.processes.split(',') if int(p) <= epoch], default=1)
  fits = epoch // p_max * p_max
  if batch_rows * args.steps > rows.rows_per_first_epoch and fits:
    print(f'\nthe corpus packs into {rows.rows_per_first_epoch:,} rows of {args.seq_len} '
          f'per epoch, fewer than {args.steps} batch(es) of {batch_rows}: the batches above '
          'repeat documents. The largest batch without repetition:')
    _table(shards, table, rows, cfg, args, fits, sizes)
  print(f'\n{time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
  sys.exit(main())
