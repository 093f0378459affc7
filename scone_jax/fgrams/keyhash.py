"""Open-addressing hashing of exact uint64 keys: an exact map (KeyHash) and counting.

Both the miner (per-position id of the kept (n-1)-gram) and the matcher (row of the
f-gram ending at a position) resolve millions of exact keys per call. A sorted array with
`np.searchsorted` costs ~log2(M) cache misses per query; linear probing at load <= 1/2
costs ~1.5, so lookups are several times faster. Keys are exact (the whole uint64 is
stored and compared): hashing only picks the slot, it never merges two keys.
"""

from __future__ import annotations

import numba
import numpy as np

EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # Never a valid key: callers keep keys < 2**63.
_MULT = np.uint64(0x9E37_79B9_7F4A_7C15)  # Fibonacci hashing: top bits of key * 2**64/phi.
_MULT_INT = int(_MULT)
# count_distinct splits more keys than 4x this into parts of about this many, by the top
# bits of a second, independent hash (the slot hash's own bits would crowd each part into
# a fraction of its table): one table of 10M+ slots misses cache and TLB on every access,
# ~3x slower than the parts' small tables (5.3M text bigram keys: 1.8 s vs 0.65 s).
PART_KEYS = 1 << 18
_PART_MULT = np.uint64(0xD6E8_FEB8_6659_FD93)


class KeyHash:
  """Exact map from unique uint64 keys (< 2**63) to int64 values.

  Attributes:
    slots_Cx2: uint64 [C, 2], per slot its key (EMPTY where free) and value (as uint64),
      C a power of two >= 2 * len: a probe reads a slot's key and value from one cache
      line (`probe`, compiled; `lookup` runs it per key).
    keys: uint64 [C] slot keys, a strided view of slots_Cx2.
    values: int64 [C] slot values, likewise.
    shift: a key's home slot is (key * _MULT mod 2**64) >> shift; probing steps + 1 mod C.
  """

  def __init__(self, keys_M: np.ndarray, values_M: np.ndarray,
               priority_M: np.ndarray | None = None):
    """Builds the map. M = number of entries; keys must be unique.

    Args:
      keys_M: the keys.
      values_M: their values.
      priority_M: optional, e.g. how often each key will be looked up. Where keys compete
        for a slot the higher priority wins, so frequent keys resolve in one probe.
    """
    keys_M = np.asarray(keys_M, dtype=np.uint64)
    values_M = np.asarray(values_M, dtype=np.int64)
    if keys_M.shape != values_M.shape or keys_M.ndim != 1:
      raise ValueError(f'keys {keys_M.shape} and values {values_M.shape} must be equal 1-D')
    if priority_M is not None:
      # Fancy assignment to a repeated slot keeps the last write: highest priority last.
      order = np.argsort(priority_M, kind='stable')
      keys_M, values_M = keys_M[order], values_M[order]
    bits = max(3, int(2 * max(len(keys_M), 1) - 1).bit_length())
    self._shift = np.uint64(64 - bits)
    self._mask = (1 << bits) - 1
    slots_Cx2 = np.full((1 << bits, 2), EMPTY, dtype=np.uint64)  # Value -1 as uint64.
    self.slots_Cx2 = slots_Cx2
    self.shift = 64 - bits
    self.keys, self.values = slots_Cx2[:, 0], slots_Cx2[:, 1].view(np.int64)
    self._len = len(keys_M)
    pending = np.arange(len(keys_M))
    slot = self._slot(keys_M)
    # Insert in rounds: every pending key tries its slot; where several land on one free
    # slot one write wins (read back) and the others probe on.
    while pending.size:
      s, k = slot[pending], keys_M[pending]
      free = self.keys[s] == EMPTY
      self.keys[s[free]] = k[free]
      placed = self.keys[s] == k
      self.values[s[placed]] = values_M[pending[placed]]
      pending = pending[~placed]
      slot[pending] = (slot[pending] + 1) & self._mask
    # A duplicate key overwrites its first copy's slot, leaving fewer occupied slots.
    if np.count_nonzero(self.keys != EMPTY) != len(keys_M):
      raise ValueError('KeyHash keys must be unique')

  def __len__(self) -> int:
    return self._len

  def _slot(self, keys_N: np.ndarray) -> np.ndarray:
    return ((keys_N * _MULT) >> self._shift).view(np.int64)  # < 2**63: shift >= 1.

  def lookup(self, keys_N: np.ndarray) -> np.ndarray:
    """Values for uint64 keys [N]; -1 where a key is absent."""
    return _lookup_kernel(self.slots_Cx2, self.shift, np.asarray(keys_N, dtype=np.uint64))


@numba.njit(nogil=True, cache=True)
def _lookup_kernel(slots_Cx2, shift, keys_N):
  out = np.empty(keys_N.size, np.int64)
  for i in range(keys_N.size):
    out[i] = probe(slots_Cx2, shift, keys_N[i])
  return out


def count_distinct(keys_N: np.ndarray, return_inverse: bool = False, sort: bool = True,
                   weights_N: np.ndarray | None = None, pool=None):
  """Distinct uint64 keys (< 2**63), ascending, with their counts: (keys_U, counts_U).

  Equals run-length counting after np.sort, several times faster: one compiled pass puts
  each key in an open-addressing table and counts it there; only the U distinct keys are
  sorted.

  Args:
    keys_N: the keys.
    return_inverse: also return inverse_N (int32, int64 from 2**31 keys), the index of
      each key in keys_U as np.unique gives it (where looking the keys up again would
      cost a hash probe each).
    sort: False leaves keys_U in an arbitrary order, skipping the argsort where the
      caller sorts only what it keeps.
    weights_N: optional int64 counts to add per key (merging runs) instead of 1 each.
    pool: optional concurrent.futures executor; more than 4 * PART_KEYS keys are counted
      as parts on it in parallel (the kernel releases the GIL).
  """
  keys_N = np.asarray(keys_N, dtype=np.uint64)
  weights_N = (np.zeros(0, np.int64) if weights_N is None
               else np.asarray(weights_N, dtype=np.int64))
  if weights_N.size not in (0, keys_N.size):
    raise ValueError(f'weights_N has {weights_N.size} entries for {keys_N.size} keys')
  if keys_N.size > 4 * PART_KEYS:
    return _count_parts(keys_N, weights_N, return_inverse, sort, pool)
  return _count_table(keys_N, weights_N, return_inverse, sort)


def _count_parts(keys_N: np.ndarray, weights_N: np.ndarray, return_inverse: bool,
                 sort: bool, pool):
  """count_distinct of many keys: one small table per part of about PART_KEYS keys."""
  part_bits = (keys_N.size // PART_KEYS).bit_length()
  part_N = ((keys_N * _PART_MULT) >> np.uint64(64 - part_bits)).astype(np.uint16)
  perm = np.argsort(part_N, kind='stable')  # A radix sort for 16-bit keys.
  ends = np.cumsum(np.bincount(part_N, minlength=1 << part_bits))
  del part_N
  keys_N = keys_N[perm]
  if weights_N.size:
    weights_N = weights_N[perm]
  spans = list(zip(np.concatenate(([0], ends[:-1])), ends))

  def count(span):
    lo, hi = span
    return _count_table(keys_N[lo:hi], weights_N[lo:hi], return_inverse, sort=False)

  results = list(pool.map(count, spans) if pool is not None else map(count, spans))
  del keys_N, weights_N
  keys_U = np.concatenate([r[0] for r in results])
  counts_U = np.concatenate([r[1] for r in results])
  order = np.argsort(keys_U) if sort else slice(None)
  if not return_inverse:
    return keys_U[order], counts_U[order]
  # A part's local index + the part's offset = the index in keys_U (before `order`).
  offsets = np.cumsum([0] + [r[0].size for r in results[:-1]])
  inverse_N = np.empty(perm.size, np.int32 if perm.size < 1 << 31 else np.int64)
  inverse_N[perm] = np.concatenate([r[2] + off for r, off in zip(results, offsets)])
  if sort:
    rank = np.empty(keys_U.size, inverse_N.dtype)
    rank[order] = np.arange(keys_U.size)
    inverse_N = rank[inverse_N]
  return keys_U[order], counts_U[order], inverse_N


def _count_table(keys_N: np.ndarray, weights_N: np.ndarray, return_inverse: bool,
                 sort: bool):
  """count_distinct with one open-addressing table (one compiled pass over the keys)."""
  num = keys_N.size
  bits = table_bits(num)
  inverse_dtype = np.int32 if num < 1 << 31 else np.int64
  keys_U, counts_U, inverse_N = _count_kernel(keys_N, weights_N, bits, return_inverse,
                                              np.zeros(0, inverse_dtype))
  if sort:
    order = np.argsort(keys_U)
    keys_U, counts_U = keys_U[order], counts_U[order]
    if return_inverse:
      rank = np.empty(keys_U.size, inverse_dtype)
      rank[order] = np.arange(keys_U.size, dtype=inverse_dtype)
      inverse_N = rank[inverse_N]
  return (keys_U, counts_U, inverse_N) if return_inverse else (keys_U, counts_U)


def table_bits(num: int) -> int:
  """log2 of a counting table's slots for up to `num` keys: > 1.25 num, so probing ends and
  stays short (load <= 0.8) even when (nearly) all keys are distinct."""
  return max(3, (num + num // 4).bit_length())


@numba.njit(nogil=True, inline='always')
def new_count_table(num, bits, like):
  """An empty counting table for up to `num` keys in 2**bits slots: (index_of_slot, keys_U,
  counts_U, shift) for `place`; `like` (empty) carries the index dtype."""
  return (np.full(1 << bits, -1, like.dtype), np.empty(num, np.uint64),
          np.zeros(num, np.int64), np.uint64(64 - bits))


@numba.njit(nogil=True, inline='always')
def place(index_of_slot, keys_U, num_distinct, key, shift):
  """Finds `key` in a counting table (index_of_slot: a power-of-two array of indices into
  keys_U, -1 free), appending it to keys_U as distinct key number `num_distinct` if absent.
  Returns (its index in keys_U, the new number of distinct keys)."""
  mask = index_of_slot.size - 1
  slot = np.int64((key * np.uint64(_MULT_INT)) >> shift)
  while True:
    j = index_of_slot[slot]
    if j < 0:
      index_of_slot[slot] = num_distinct
      keys_U[num_distinct] = key
      return num_distinct, num_distinct + 1
    if keys_U[j] == key:
      return j, num_distinct
    slot = (slot + 1) & mask


@numba.njit(nogil=True, cache=True)
def _count_kernel(keys_N, weights_N, bits, return_inverse, like):
  """Distinct keys in first-seen order, their counts (or summed weights where weights_N
  is not empty), and optionally each key's index among them.

  Linear probing over a table of indices into keys_U; nogil, so the miner's threads count
  chunks on all cores. `like` (empty) carries the index dtype.
  """
  num = keys_N.size
  weighted = weights_N.size > 0
  index_of_slot, keys_U, counts_U, shift = new_count_table(num, bits, like)
  inverse_N = np.empty(num if return_inverse else 0, like.dtype)
  u = 0
  for i in range(num):
    j, u = place(index_of_slot, keys_U, u, keys_N[i], shift)
    counts_U[j] += weights_N[i] if weighted else 1
    if return_inverse:
      inverse_N[i] = j
  return keys_U[:u].copy(), counts_U[:u].copy(), inverse_N


@numba.njit(nogil=True, inline='always')
def probe(slots_Cx2, shift, key):
  """KeyHash lookup of one key inside a compiled kernel: its value, or -1."""
  mask = slots_Cx2.shape[0] - 1
  slot = np.int64((np.uint64(key) * np.uint64(_MULT_INT)) >> np.uint64(shift))
  while True:
    found = slots_Cx2[slot, 0]
    if found == np.uint64(key):
      return np.int64(slots_Cx2[slot, 1])
    if found == EMPTY:
      return np.int64(-1)
    slot = (slot + 1) & mask
