"""Out-of-core counting of (key, count) runs, merged per key-range bucket in parallel.

Each chunk of the corpus yields a run: its distinct uint64 n-gram keys with their counts
in that chunk, already grouped into P buckets by key range (`partition_run`, or the
miner's scan kernel, which does it as it counts). Bucket b holds the keys in
[bounds[b-1], bounds[b]), so every bucket is counted on its own, on all threads, and the
sorted kept keys of bucket 0, 1, ... concatenate to the sorted kept keys of the whole:
there is no serial merge. Runs go into one flat buffer; beyond the budget each bucket's
pending entries are summed (count_distinct per bucket, in parallel) and the sums written
to the temp dir, and `finish` sums each bucket's spilled pieces, one bucket per thread.
Peak memory is the buffer plus, per thread, one bucket's pieces: at most the candidate
positions of the corpus / P, since a run has at most one entry per position.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from scone_jax.fgrams.keyhash import KeyHash, new_count_table, place, table_bits

# Bytes per buffered run entry: key (8) + count (8) + the kept id that `finish` writes
# per entry (4-8). A bucket's counting table comes on top, per thread (entries / P).
BYTES_PER_ENTRY = 24


def bucket_of(bounds: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Bucket of each key: the number of bounds <= key (bounds ascending uint64)."""
  return np.searchsorted(bounds, keys, 'right')


def partition_run(keys_U: np.ndarray, counts_U: np.ndarray, bounds: np.ndarray):
  """A run grouped by bucket (stable within one): (keys, counts, ends_P, new_of_old_U).

  ends_P[b] is the end of bucket b in the grouped run; new_of_old_U[u] is where entry u
  went. The reference for the scan kernel's own grouping (mine._scan_kernel).
  """
  bucket_U = bucket_of(bounds, keys_U)
  order = np.argsort(bucket_U, kind='stable')
  new_of_old = np.empty(keys_U.size, np.int64)
  new_of_old[order] = np.arange(keys_U.size)
  ends = np.cumsum(np.bincount(bucket_U, minlength=bounds.size + 1))
  return keys_U[order], counts_U[order], ends, new_of_old


@numba.njit(nogil=True, cache=True)
def group_by_bucket(keys_U, counts_U, bounds, like):
  """partition_run inside a kernel: (keys, counts, ends_P, new_of_old_U in like's dtype)."""
  num = keys_U.size
  num_buckets = bounds.size + 1
  bucket_U = np.empty(num, np.int32)
  next_P = np.zeros(num_buckets, np.int64)
  for u in range(num):
    lo, hi = 0, bounds.size  # The first bound > key: binary search, ~log2(P) steps.
    while lo < hi:
      mid = (lo + hi) >> 1
      if bounds[mid] <= keys_U[u]:
        lo = mid + 1
      else:
        hi = mid
    bucket_U[u] = lo
    next_P[lo] += 1
  ends_P = np.cumsum(next_P)
  next_P = ends_P - next_P
  keys_out, counts_out = np.empty(num, np.uint64), np.empty(num, np.int64)
  new_of_old = np.empty(num, like.dtype)
  for u in range(num):
    j = next_P[bucket_U[u]]
    next_P[bucket_U[u]] = j + 1
    keys_out[j], counts_out[j], new_of_old[u] = keys_U[u], counts_U[u], j
  return keys_out, counts_out, ends_P, new_of_old


@numba.njit(nogil=True, cache=True)
def _count_ranges(keys_E, counts_E, begin_R, end_R, bits, inverse_E, want_inverse):
  """Sums the counts of equal keys over the entries [begin_R[r], end_R[r]) of all r:
  (distinct keys in first-seen order, their totals), counted in a table of 2**bits slots
  (keyhash.table_bits of the entries); writes each entry's distinct index
  into inverse_E at the entry's own position when want_inverse (threads own disjoint
  ranges, so they write disjoint positions)."""
  num = 0
  for r in range(begin_R.size):
    num += end_R[r] - begin_R[r]
  index_of_slot, keys_D, counts_D, shift = new_count_table(num, bits, inverse_E)
  u = 0
  for r in range(begin_R.size):
    for e in range(begin_R[r], end_R[r]):
      j, u = place(index_of_slot, keys_D, u, keys_E[e], shift)
      counts_D[j] += counts_E[e]
      if want_inverse:
        inverse_E[e] = j
  return keys_D[:u].copy(), counts_D[:u].copy()


def count_ranges(keys_E, counts_E, begin_R, end_R, inverse_E=None):
  """_count_ranges with its table sized here (table_bits is plain Python)."""
  bits = table_bits(int(np.sum(end_R - begin_R)))
  if inverse_E is None:
    return _count_ranges(keys_E, counts_E, begin_R, end_R, bits, np.zeros(0, np.int32),
                         False)
  return _count_ranges(keys_E, counts_E, begin_R, end_R, bits, inverse_E, True)


@numba.njit(nogil=True, cache=True)
def _remap_ranges(inverse_E, begin_R, end_R, new_of_distinct):
  for r in range(begin_R.size):
    for e in range(begin_R[r], end_R[r]):
      inverse_E[e] = new_of_distinct[inverse_E[e]]


class RunMerger:
  """Accumulates bucketed runs under a memory budget; `finish` returns the kept keys.

  Args:
    budget_bytes: memory for pending runs; beyond it each bucket's entries are summed and
      spilled to tmp_dir.
    tmp_dir: where spilled sums go (removed by the caller).
    min_count: keys with a total count below this are dropped by `finish`.
    tag: file name prefix (e.g. the n-gram length) so several mergers can share tmp_dir.
    keep_runs: remember each added run so that, after `finish`, `kept_ids(i)` says which
      kept key each entry of run i is. Without spills that falls out of the per-bucket
      counting; with them the runs' keys are saved and looked up.
    pool: optional executor that counts the buckets in parallel.
    bounds: ascending uint64 [P-1] key bounds of the P buckets (default: one bucket).
    scratch: optional dict that keeps the buffers for the next merger (the miner's next
      scan): first touches of fresh memory cost ~10x a copy into touched memory here.
  """

  def __init__(self, budget_bytes: int, tmp_dir: str, min_count: int, tag: str,
               keep_runs: bool = False, pool=None, bounds: np.ndarray | None = None,
               scratch: dict | None = None):
    self._pool = pool
    self._scratch = {} if scratch is None else scratch
    self._capacity = max(int(budget_bytes) // BYTES_PER_ENTRY, 1)
    self._tmp_dir = tmp_dir
    self._min_count = min_count
    self._tag = tag
    self._bounds = np.zeros(0, np.uint64) if bounds is None else np.asarray(bounds, np.uint64)
    if np.any(self._bounds[1:] <= self._bounds[:-1]):
      raise ValueError('RunMerger bounds must be strictly ascending')
    self._keys_E = np.zeros(0, np.uint64)  # The buffer of pending runs; grown on demand.
    self._counts_E = np.zeros(0, np.int64)
    self._fill = 0
    self._starts: list[int] = []  # Buffer offset of each pending run.
    self._ends: list[np.ndarray] = []  # Each pending run's bucket ends.
    self._spilled: list[tuple[str, str, np.ndarray]] = []  # keys, counts, bucket ends.
    self._keep_runs = keep_runs
    self._num_runs = 0
    self._run_at: list[tuple[int, int, int]] = []  # After spills: (file, start, stop).
    self._run_paths: list[str] = []  # Pending runs' keys, one file per spill.
    self._kept_of_entry = None  # Without spills: kept id of every added entry.
    self._inverse_buffer = None  # _kept_of_entry's buffer, for the scratch.
    self._kept_hash = None  # With spills: kept key -> kept id.

  @property
  def num_buckets(self) -> int:
    return self._bounds.size + 1

  @property
  def num_spilled(self) -> int:
    return len(self._spilled)

  def add(self, keys_U: np.ndarray, counts_U: np.ndarray,
          ends_P: np.ndarray | None = None) -> None:
    """Adds a run grouped by bucket (ends_P: each bucket's end; may be omitted with one
    bucket)."""
    if ends_P is None:
      if self.num_buckets != 1:
        raise ValueError('RunMerger.add needs the run grouped by bucket (partition_run)')
      ends_P = np.array([keys_U.size])
    if self._fill and (self._fill + keys_U.size) > self._capacity:
      self._spill()
    if self._fill + keys_U.size > self._keys_E.size:
      # Untouched pages of np.empty cost no memory: allocate the budget's worth at once.
      size = max(self._capacity, self._fill + keys_U.size)
      self._keys_E = self._grown('keys', self._keys_E, self._fill, size)
      self._counts_E = self._grown('counts', self._counts_E, self._fill, size)
    self._keys_E[self._fill:self._fill + keys_U.size] = keys_U
    self._counts_E[self._fill:self._fill + keys_U.size] = counts_U
    self._starts.append(self._fill)
    self._ends.append(np.asarray(ends_P, np.int64))
    self._fill += keys_U.size
    self._num_runs += 1

  def _ranges(self) -> tuple[np.ndarray, np.ndarray]:
    """begin_PxC, end_PxC: buffer ranges of each bucket in each pending run."""
    starts_C = np.asarray(self._starts, np.int64)[:, None]
    ends_CxP = np.stack(self._ends) if self._ends else np.zeros((0, self.num_buckets),
                                                                 np.int64)
    begin_CxP = np.concatenate([np.zeros((ends_CxP.shape[0], 1), np.int64),
                                ends_CxP[:, :-1]], axis=1)
    # Bucket-major, so each bucket's column is contiguous for the kernels.
    return (np.ascontiguousarray((begin_CxP + starts_C).T),
            np.ascontiguousarray((ends_CxP + starts_C).T))

  def _map(self, fn, items):
    return list(self._pool.map(fn, items) if self._pool is not None else map(fn, items))

  def _spill(self) -> None:
    """Writes each bucket's summed pending entries (and, keep_runs, the runs' keys)."""
    k = len(self._spilled)
    if self._keep_runs:
      self._run_paths.append(os.path.join(self._tmp_dir, f'{self._tag}-runs{k:05d}.npy'))
      np.save(self._run_paths[-1], self._keys_E[:self._fill])
      self._run_at.extend((k, s, s + int(e[-1])) for s, e in zip(self._starts, self._ends))
    begin_PxC, end_PxC = self._ranges()
    sums = self._map(lambda b: count_ranges(self._keys_E, self._counts_E, begin_PxC[b],
                                            end_PxC[b]), range(self.num_buckets))
    base = os.path.join(self._tmp_dir, f'{self._tag}-sums{k:05d}')
    np.save(base + '-keys.npy', np.concatenate([s[0] for s in sums]))
    np.save(base + '-counts.npy', np.concatenate([s[1] for s in sums]))
    self._spilled.append((base + '-keys.npy', base + '-counts.npy',
                          np.cumsum([s[0].size for s in sums])))
    self._fill, self._starts, self._ends = 0, [], []

  def finish(self) -> tuple[np.ndarray, np.ndarray]:
    """All keys with total count >= min_count, ascending, and their counts."""
    if self._spilled and self._fill:
      self._spill()
    if self._spilled:
      maps = [(np.load(k, mmap_mode='r'), np.load(c, mmap_mode='r'), ends)
              for k, c, ends in self._spilled]
      kept = self._map(lambda b: self._finish_spilled_bucket(maps, b),
                       range(self.num_buckets))
      del maps
    else:
      begin_PxC, end_PxC = self._ranges()
      inverse_E = np.zeros(0, np.int32 if self._fill < 1 << 31 else np.int64)
      if self._keep_runs:
        self._inverse_buffer = self._grown('inverse', inverse_E, 0, self._fill)
        inverse_E = self._inverse_buffer[:self._fill]
      kept = self._map(lambda b: self._finish_bucket(begin_PxC[b], end_PxC[b],
                                                     inverse_E), range(self.num_buckets))
    keys = np.concatenate([np.zeros(0, np.uint64)] + [k for k, _, _ in kept])
    counts = np.concatenate([np.zeros(0, np.int64)] + [c for _, c, _ in kept])
    if self._keep_runs and self._spilled:
      # Frequent keys get their home slot: most lookups then take one probe.
      self._kept_hash = KeyHash(keys, np.arange(keys.size), counts)
    elif self._keep_runs:
      # Bucket-local ids -> global kept ids (the buckets' offsets are known only now).
      offsets = np.cumsum([0] + [k.size for k, _, _ in kept])

      def remap(b):
        new_of_distinct = kept[b][2]
        new_of_distinct[new_of_distinct >= 0] += offsets[b]
        new_of_distinct = new_of_distinct.astype(inverse_E.dtype)
        _remap_ranges(inverse_E, begin_PxC[b], end_PxC[b], new_of_distinct)
      self._map(remap, range(self.num_buckets))
      self._kept_of_entry = inverse_E
    self._scratch.update(keys=self._keys_E, counts=self._counts_E)  # For the next one.
    self._keys_E = self._counts_E = None
    for keys_path, counts_path, _ in self._spilled:
      os.remove(keys_path)
      os.remove(counts_path)
    self._spilled = []
    return keys, counts

  def _kept(self, keys_D, counts_D):
    """The kept keys of one bucket, ascending: (keys, counts, bucket-local kept id of each
    distinct key or -1)."""
    keep = np.flatnonzero(counts_D >= self._min_count)
    order = keep[np.argsort(keys_D[keep])]
    local = np.full(keys_D.size, -1, np.int64)
    local[order] = np.arange(order.size)
    return keys_D[order], counts_D[order], local

  def _finish_bucket(self, begin_C, end_C, inverse_E):
    keys_D, counts_D = count_ranges(self._keys_E, self._counts_E, begin_C, end_C,
                                    inverse_E if self._keep_runs else None)
    return self._kept(keys_D, counts_D)

  def _finish_spilled_bucket(self, maps, b: int):
    """Bucket b's kept keys from its sums in every spill (maps: memory-mapped spills)."""
    keys, counts = [], []
    for keys_mm, counts_mm, ends in maps:
      lo, hi = (ends[b - 1] if b else 0), ends[b]
      keys.append(keys_mm[lo:hi])
      counts.append(counts_mm[lo:hi])
    keys, counts = np.concatenate(keys), np.concatenate(counts)
    keys_D, counts_D = count_ranges(keys, counts, np.array([0], np.int64),
                                    np.array([keys.size], np.int64))
    return self._kept(keys_D, counts_D)

  def kept_ids(self, i: int) -> np.ndarray:
    """After `finish` (keep_runs=True): int [U_i], for each entry of the i-th added run
    (in its bucket-grouped order) its index among the kept keys, -1 where it was not
    kept. Thread-safe."""
    if self._kept_hash is not None:
      k, start, stop = self._run_at[i]
      return self._kept_hash.lookup(np.array(np.load(self._run_paths[k],
                                                     mmap_mode='r')[start:stop]))
    if self._kept_of_entry is None:
      raise ValueError('RunMerger.kept_ids needs keep_runs=True and finish() first')
    stop = self._starts[i + 1] if i + 1 < len(self._starts) else self._fill
    return self._kept_of_entry[self._starts[i]:stop]

  def close(self) -> None:
    """Removes the saved keys of spilled runs (keep_runs=True)."""
    for path in self._run_paths:
      os.remove(path)
    self._run_paths = []
    if self._inverse_buffer is not None:
      self._scratch['inverse'] = self._inverse_buffer
    self._kept_of_entry = self._kept_hash = self._inverse_buffer = None

  def _grown(self, name: str, array: np.ndarray, fill: int, size: int) -> np.ndarray:
    """`array` with room for `size` entries (its first `fill` kept): the scratch buffer
    of that name if it is large enough and of the same dtype, else a new one."""
    out = self._scratch.pop(name, None)
    if out is None or out.size < size or out.dtype != array.dtype:
      out = np.empty(size, array.dtype)
    out[:fill] = array[:fill]
    return out
