"""benchmarks/bench_dedup.py: A_f rows per process vs a global distinct set, on a batch
whose counts are known by hand."""

import importlib.util
import os

import numpy as np
import pytest

from scone_jax.batches import order as order_lib
from scone_jax.batches import packing
from scone_jax.batches import tagging
from scone_jax.fgrams.table import FgramTable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    'bench_dedup', os.path.join(REPO, 'benchmarks', 'bench_dedup.py'))
bench_dedup = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_dedup)


class _Shards:
  """The TokenShards attributes the pipeline reads."""

  def __init__(self, docs):
    self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    self.tokens = np.concatenate(docs).astype(np.uint16)


# Four documents, each one packed row (inputs BOS + 4 tokens = seq_len; the EOS is only a
# target): every document holds the shared bigram (10, 11) and a bigram of its own,
# whichever process its row lands on.
DOCS = [[10, 11, 20, 21, 2], [10, 11, 30, 31, 2], [10, 11, 40, 41, 2], [10, 11, 50, 51, 2]]
GRAMS = [(10, 11), (20, 21), (30, 31), (40, 41), (50, 51)]


@pytest.fixture(scope='module')
def setup():
  table = FgramTable(np.array(GRAMS, np.int32), np.array([4, 1, 1, 1, 1]),
                     np.full(len(GRAMS), 2), max_len=2, min_count=1)
  shards = _Shards(DOCS)
  rows = order_lib.RowOrder(packing.make_examples(shards.offsets, 5), 5, seed=0)
  return shards, table, rows


@pytest.mark.parametrize('processes, per_process', [(1, (5,)), (2, (3, 3)),
                                                     (4, (2, 2, 2, 2))])
def test_counts_known_by_hand(setup, processes, per_process):
  shards, table, rows = setup
  c = bench_dedup.batch_counts(shards, table, rows, batch_rows=4, processes=processes)
  assert c.per_process_G == per_process
  assert c.global_distinct == 5 and c.af_rows == sum(per_process)
  # The shared bigram runs once per process: (P + 4) rows where a global set runs 5.
  assert c.redundancy == pytest.approx((processes + 4) / 5 - 1)
  # Each process's 2-3 f-grams pack into one row of W = 4, padded to the 8-row bucket.
  assert c.gathered_rows == processes * tagging.row_bucket(1) * tagging.pack_width(2)
  # 32 P gathered rows exceed the batch's 4 x 5 positions: the output's all-reduce is less.
  assert c.batch_tokens == 20 and c.exchanged_rows == 20


def test_count_refuses_a_stat_that_disagrees_with_the_rows(setup):
  shards, table, rows = setup
  c = bench_dedup.batch_counts(shards, table, rows, batch_rows=4, processes=1)
  assert c.global_distinct == 5
  sliced = bench_dedup.pipeline.BatchDataset(
      shards, rows, global_batch_size=4, num_batches=None, bos_id=1, table=table,
      capacity=0, process_index=0, process_count=1)[0]
  sliced[tagging.STATS_PREFIX + 'fgram_unique'] = np.float32(4)
  with pytest.raises(AssertionError, match='tagging changed'):
    bench_dedup.count([sliced])
