"""The global row order: a pure function of (seed, epoch), with random access by row.

Dimension letters: D documents, N examples, R rows of one epoch.

Epoch e shuffles the documents with a generator seeded by (seed, e), lays each document's
examples out consecutively, and packs them first-fit into rows (`packing.first_fit_rows`).
Rows of consecutive epochs are concatenated into one endless stream, so global row g (and
hence global batch g // B) depends only on (seed, g): any process can build any row
without building the others, and a resumed run needs only the step counter.

Locating row g needs the row counts of the epochs before it; each epoch's plan is an
O(N) computation made once (counts are kept, the last few plans cached).
"""

from __future__ import annotations

import bisect
import collections
import threading

import numpy as np

from scone_jax.batches import packing

_PLANS_KEPT = 3


class RowOrder:
  """Packed rows of a corpus: shuffled and endless (training) or one pass in order (eval)."""

  def __init__(self, examples: packing.Examples, seq_len: int, *, seed: int = 0,
               shuffle: bool = True, repeat: bool = True, block_docs: int = 0):
    """Plans nothing yet: each epoch is planned on first use.

    Args:
      examples: the corpus cut into examples (`packing.make_examples`).
      seq_len: T.
      seed: shuffle seed (>= 0); epoch e uses the generator seeded by (seed, e).
      shuffle: False keeps document order (eval).
      repeat: True repeats epochs forever; False gives one epoch then empty rows.
      block_docs: 0 shuffles all documents; B > 0 shuffles documents within consecutive
        blocks of B documents and the order of the blocks (reads stay local on disk).
    """
    if examples.num_examples == 0:
      raise ValueError('the token shards hold no tokens: every document is empty; '
                       're-run prepare on a non-empty corpus')
    if seed < 0:
      raise ValueError(f'train.seed={seed} must be >= 0 (it seeds numpy SeedSequence)')
    if block_docs < 0:
      raise ValueError(f'train.shuffle_buffer_docs={block_docs} must be >= 0 '
                       '(0 = global shuffle)')
    self.examples = examples
    self.seq_len = seq_len
    self._seed = seed
    self._shuffle = shuffle
    self._repeat = repeat
    self._block_docs = block_docs
    self._nonempty_D = np.flatnonzero(examples.chunks_D)
    self._lock = threading.Lock()
    self._plans: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
        collections.OrderedDict())
    self._rows_before = [0]  # _rows_before[e] = rows in epochs < e.

  def doc_order(self, epoch: int) -> np.ndarray:
    """Indices of the non-empty documents in the order epoch `epoch` reads them."""
    docs = self._nonempty_D
    if not self._shuffle:
      return docs
    rng = np.random.default_rng([self._seed, epoch])
    if not self._block_docs:
      return docs[rng.permutation(docs.shape[0])]
    block = np.arange(docs.shape[0]) // self._block_docs
    block_rank = rng.permutation(int(block[-1]) + 1)
    return docs[np.lexsort((rng.random(docs.shape[0]), block_rank[block]))]

  def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(example order [N], row starts [R+1]) of one epoch; cached."""
    with self._lock:
      if epoch in self._plans:
        self._plans.move_to_end(epoch)
        return self._plans[epoch]
    order_N = packing.examples_in_doc_order(self.examples, self.doc_order(epoch))
    perm_N, row_start = packing.first_fit_rows(self.examples.length_N[order_N],
                                               self.seq_len)
    order_N = order_N[perm_N]
    with self._lock:
      self._plans[epoch] = (order_N, row_start)
      while len(self._plans) > _PLANS_KEPT:
        self._plans.popitem(last=False)
    return order_N, row_start

  @property
  def rows_per_first_epoch(self) -> int:
    return self.plan(0)[1].shape[0] - 1

  def _locate(self, row: int) -> tuple[int, int]:
    """Global row -> (epoch, row within the epoch)."""
    while True:
      with self._lock:
        known = list(self._rows_before)
      if row < known[-1]:
        epoch = bisect.bisect_right(known, row) - 1
        return epoch, row - known[epoch]
      epoch = len(known) - 1
      num_rows = self.plan(epoch)[1].shape[0] - 1
      with self._lock:
        if len(self._rows_before) == epoch + 1:
          self._rows_before.append(known[-1] + num_rows)

  def rows(self, first: int, count: int) -> list[np.ndarray]:
    """Example indices of global rows first .. first+count-1 (empty arrays past the end)."""
    out = []
    for row in range(first, first + count):
      if not self._repeat and row >= self.rows_per_first_epoch:
        out.append(np.zeros(0, np.int64))
        continue
      epoch, r = self._locate(row)
      order_N, row_start = self.plan(epoch)
      out.append(order_N[row_start[r]:row_start[r + 1]])
    return out
