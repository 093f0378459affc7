"""Out-of-core counting: (key, count) runs, spilled to disk sorted, merged by key range.

Each chunk of the corpus yields a run: its distinct uint64 n-gram keys, in any order,
with their counts in that chunk. Runs stay in memory until they exceed the budget; then
they are merged into one sorted run and written to the temp dir as .npy. The final merge
reads every spilled run one key range at a time (memmap + searchsorted), so peak memory
is about one range of all runs, whatever the corpus size. Without spills the final merge
sums equal keys by hashing and sorts only the keys that reach min_count.
"""

from __future__ import annotations

import os

import numpy as np

from scone_jax.fgrams.keyhash import KeyHash, count_distinct

# Peak bytes per pending run entry while merging. A spill's sort: key + count, their
# sorted copies, the order (~48). The final in-memory merge by hashing, which must fit
# too: the concatenated key + count, the table (1.25-2.5 slots per entry), slots, the
# inverse and per-distinct arrays (~75 measured from the sizes).
_MERGE_BYTES_PER_ENTRY = 80


def merge_runs(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """Sums counts of equal keys over runs; returns one sorted run."""
  runs = [r for r in runs if r[0].size]
  if not runs:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  keys = np.concatenate([k for k, _ in runs])
  counts = np.concatenate([c for _, c in runs])
  # Timsort (kind='stable') finds already-sorted runs: O(N log runs) for spilled ones.
  order = np.argsort(keys, kind='stable')
  keys, counts = keys[order], counts[order]
  del order
  starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
  return keys[starts], np.add.reduceat(counts, starts)


class RunMerger:
  """Accumulates sorted runs under a memory budget; `finish` returns the kept keys.

  Args:
    budget_bytes: memory for pending runs; beyond it they are merged and spilled.
    tmp_dir: where spilled runs go (removed by the caller).
    min_count: keys with a total count below this are dropped by `finish`.
    tag: file name prefix (e.g. the n-gram length) so several mergers can share tmp_dir.
    keep_runs: remember each added run's keys so that, after `finish`, `kept_ids(i)`
      says which kept key each entry of run i is. Without spills that falls out of the
      final merge; with them the runs' keys are saved too and looked up.
    pool: optional executor that counts the merge's parts in parallel (count_distinct).
  """

  def __init__(self, budget_bytes: int, tmp_dir: str, min_count: int, tag: str,
               keep_runs: bool = False, pool=None):
    self._pool = pool
    self._budget = max(int(budget_bytes), 1)
    self._tmp_dir = tmp_dir
    self._min_count = min_count
    self._tag = tag
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._pending_entries = 0
    self._spilled: list[tuple[str, str]] = []
    self._keep_runs = keep_runs
    self._run_offsets = [0]  # Entry offsets of the added runs, in order.
    self._run_paths: list[str] = []  # Each run's keys, once spilled.
    self._kept_of_entry = None  # Without spills: kept id of every added entry.
    self._kept_hash = None  # With spills: kept key -> kept id.

  @property
  def num_spilled(self) -> int:
    return len(self._spilled)

  def add(self, keys_U: np.ndarray, counts_U: np.ndarray) -> None:
    self._pending.append((keys_U, counts_U))
    self._run_offsets.append(self._run_offsets[-1] + keys_U.size)
    self._pending_entries += keys_U.size
    if self._pending_entries * _MERGE_BYTES_PER_ENTRY > self._budget:
      self._spill()

  def _spill(self) -> None:
    if self._keep_runs:
      for keys, _ in self._pending:
        self._run_paths.append(os.path.join(
            self._tmp_dir, f'{self._tag}-added{len(self._run_paths):06d}.npy'))
        np.save(self._run_paths[-1], keys)
    keys, counts, _ = self._sum_pending()
    order = np.argsort(keys)  # Only the distinct keys: cheaper than sorting the runs.
    keys, counts = keys[order], counts[order]
    base = os.path.join(self._tmp_dir, f'{self._tag}-run{len(self._spilled):05d}')
    np.save(base + '-keys.npy', keys)
    np.save(base + '-counts.npy', counts)
    self._spilled.append((base + '-keys.npy', base + '-counts.npy'))

  def finish(self) -> tuple[np.ndarray, np.ndarray]:
    """All keys with total count >= min_count, ascending, and their counts."""
    if not self._spilled:
      return self._finish_in_memory()
    if self._pending:
      self._spill()
    out_keys, out_counts = [], []
    for lo, hi in self._key_ranges():
      part = []
      for keys_path, counts_path in self._spilled:
        keys_mm = np.load(keys_path, mmap_mode='r')
        i0 = np.searchsorted(keys_mm, lo) if lo is not None else 0
        i1 = np.searchsorted(keys_mm, hi) if hi is not None else keys_mm.size
        counts_mm = np.load(counts_path, mmap_mode='r')
        part.append((np.array(keys_mm[i0:i1]), np.array(counts_mm[i0:i1])))
        del keys_mm, counts_mm  # Unmap, so touched pages leave this process's RSS.
      keys, counts = merge_runs(part)
      del part
      keep = counts >= self._min_count
      out_keys.append(keys[keep])
      out_counts.append(counts[keep])
    for paths in self._spilled:
      for path in paths:
        os.remove(path)
    self._spilled = []
    keys, counts = np.concatenate(out_keys), np.concatenate(out_counts)
    if self._keep_runs:
      # Frequent keys get their home slot: most lookups then take one probe.
      self._kept_hash = KeyHash(keys, np.arange(keys.size), counts)
    return keys, counts

  def kept_ids(self, i: int) -> np.ndarray:
    """After `finish` (keep_runs=True): int64 [U_i], for each entry of the i-th added run
    its index among the kept keys, -1 where it was not kept. Thread-safe."""
    if self._kept_hash is not None:
      return self._kept_hash.lookup(np.load(self._run_paths[i]))
    if self._kept_of_entry is None:
      raise ValueError('RunMerger.kept_ids needs keep_runs=True and finish() first')
    return self._kept_of_entry[self._run_offsets[i]:self._run_offsets[i + 1]]

  def close(self) -> None:
    """Removes the saved keys of spilled runs (keep_runs=True)."""
    for path in self._run_paths:
      os.remove(path)
    self._run_paths = []

  def _sum_pending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct pending keys (unsorted), their total counts, each entry's index in them."""
    keys = np.concatenate([k for k, _ in self._pending] or [np.zeros(0, np.uint64)])
    counts = np.concatenate([c for _, c in self._pending] or [np.zeros(0, np.int64)])
    self._pending, self._pending_entries = [], 0
    keys_D, totals, index = count_distinct(keys, return_inverse=True, sort=False,
                                           weights_N=counts, pool=self._pool)
    return keys_D, totals, index

  def _finish_in_memory(self) -> tuple[np.ndarray, np.ndarray]:
    keys_D, totals, index = self._sum_pending()
    keep = np.flatnonzero(totals >= self._min_count)
    order = keep[np.argsort(keys_D[keep])]
    if self._keep_runs:
      kept_of_distinct = np.full(keys_D.size, -1, np.int64)
      kept_of_distinct[order] = np.arange(order.size)
      self._kept_of_entry = kept_of_distinct[index]
    return keys_D[order], totals[order]

  def _key_ranges(self) -> list[tuple[int | None, int | None]]:
    """Splits the key space so one range of all runs fits the budget."""
    sizes = []
    samples = []
    for keys_path, _ in self._spilled:
      keys_mm = np.load(keys_path, mmap_mode='r')
      sizes.append(keys_mm.size)
      samples.append(np.array(keys_mm[::max(1, keys_mm.size // 1024)]))
      del keys_mm
    parts = -(-sum(sizes) * _MERGE_BYTES_PER_ENTRY // self._budget)
    if parts <= 1:
      return [(None, None)]
    sample = np.sort(np.concatenate(samples))
    bounds = np.unique(sample[(np.arange(1, parts) * sample.size) // parts])
    edges = [None] + [np.uint64(b) for b in bounds] + [None]
    return list(zip(edges[:-1], edges[1:]))
