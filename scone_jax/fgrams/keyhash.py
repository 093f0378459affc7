"""A vectorised open-addressing hash map from uint64 keys to int64 values (numpy only).

Both the miner (per-position id of the kept (n-1)-gram) and the matcher (row of the
f-gram ending at a position) resolve millions of exact keys per call. A sorted array with
`np.searchsorted` costs ~log2(M) cache misses per query; linear probing at load <= 1/2
costs ~1.5, so lookups are several times faster. Keys are exact (the whole uint64 is
stored and compared): hashing only picks the slot, it never merges two keys.
"""

from __future__ import annotations

import numpy as np

EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # Never a valid key: callers keep keys < 2**63.
_MULT = np.uint64(0x9E37_79B9_7F4A_7C15)  # Fibonacci hashing: top bits of key * 2**64/phi.
_EMPTY_INT, _MULT_INT, _U64_INT = int(EMPTY), int(_MULT), (1 << 64) - 1
# count_distinct splits more keys than 4x this into parts of about this many, by the top
# bits of a second, independent hash (the slot hash's own bits would crowd each part into
# a fraction of its table): one table of 10M+ slots misses cache and TLB on every access,
# ~3x slower than the parts' small tables (5.3M text bigram keys: 1.8 s vs 0.65 s).
PART_KEYS = 1 << 18
_PART_MULT = np.uint64(0xD6E8_FEB8_6659_FD93)


class KeyHash:
  """Exact map from unique uint64 keys (< 2**63) to int64 values.

  Attributes:
    keys: uint64 [C] slot keys (EMPTY where free), C a power of two >= 2 * len.
    values: int64 [C] slot values.
  Both are strided views of one [C, 2] array, so a lookup fetches a slot's key and value
  with one 16-byte gather (one cache line instead of two: ~35% faster when out of cache).
    lookup_one: (key: int) -> int, `lookup` of one Python-int key in plain Python.
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
    self.keys, self.values = slots_Cx2[:, 0], slots_Cx2[:, 1].view(np.int64)
    self._slots_C = slots_Cx2.view(np.complex128).reshape(-1)  # 16-byte items for take.
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
    self.lookup_one = _one_key_lookup(self.keys, self.values, 64 - bits, self._mask)

  def __len__(self) -> int:
    return self._len

  def _slot(self, keys_N: np.ndarray) -> np.ndarray:
    return ((keys_N * _MULT) >> self._shift).view(np.int64)  # < 2**63: shift >= 1.

  def lookup(self, keys_N: np.ndarray) -> np.ndarray:
    """Values for uint64 keys [N]; -1 where a key is absent."""
    keys_N = np.asarray(keys_N, dtype=np.uint64)
    slot = self._slot(keys_N)
    pairs_Nx2 = self._slots_C.take(slot).view(np.uint64).reshape(-1, 2)
    found = pairs_Nx2[:, 0]
    out = np.where(found == keys_N, pairs_Nx2[:, 1].view(np.int64), -1)
    # Only keys that met another key in their first slot probe further (few at load 1/2).
    pending = np.flatnonzero((found != keys_N) & (found != EMPTY))
    slot = slot[pending]
    while pending.size:
      slot = (slot + 1) & self._mask
      found = self.keys[slot]
      want = keys_N[pending]
      hit = found == want
      out[pending[hit]] = self.values[slot[hit]]
      more = ~hit & (found != EMPTY)
      pending, slot = pending[more], slot[more]
    return out


def _one_key_lookup(keys_C: np.ndarray, values_C: np.ndarray, shift: int, mask: int):
  """`KeyHash.lookup` for one key without numpy: a numpy call costs microseconds however
  few its keys, this ~0.2 us per probe (for the decode-time matcher at small batch).

  Strided memoryviews index to Python ints, and a closure reads its state from cells,
  faster than a method's attribute loads.
  """
  keys, values = memoryview(keys_C), memoryview(values_C)

  def lookup_one(key: int) -> int:
    slot = ((key * _MULT_INT) & _U64_INT) >> shift
    found = keys[slot]
    while found != key:
      if found == _EMPTY_INT:
        return -1
      slot = (slot + 1) & mask
      found = keys[slot]
    return values[slot]

  return lookup_one


def count_distinct(keys_N: np.ndarray, return_inverse: bool = False, sort: bool = True):
  """Distinct uint64 keys (< 2**63), ascending, with their counts: (keys_U, counts_U).

  Equals run-length counting after np.sort, ~1.6x faster on text n-grams: each key is
  placed in an open-addressing table (most resolve in the first round, duplicates land on
  their own key), counted with one bincount, and only the U distinct keys are sorted.

  Args:
    keys_N: the keys.
    return_inverse: also return inverse_N (int32, int64 from 2**31 keys), the index of
      each key in keys_U as np.unique gives it: one more gather, where looking the keys
      up again would cost a hash probe each.
    sort: False leaves keys_U in an arbitrary order, skipping the argsort (half the cost
      on text n-grams) where the caller sorts only what it keeps.
  """
  keys_N = np.asarray(keys_N, dtype=np.uint64)
  if keys_N.size > 4 * PART_KEYS:
    return _count_parts(keys_N, return_inverse, sort)
  return _count_table(keys_N, return_inverse, sort)


def _count_parts(keys_N: np.ndarray, return_inverse: bool, sort: bool):
  """count_distinct of many keys: one small table per part of about PART_KEYS keys."""
  part_bits = (keys_N.size // PART_KEYS).bit_length()
  part_N = ((keys_N * _PART_MULT) >> np.uint64(64 - part_bits)).astype(np.uint16)
  perm = np.argsort(part_N, kind='stable')  # A radix sort for 16-bit keys.
  ends = np.cumsum(np.bincount(part_N, minlength=1 << part_bits))
  del part_N
  keys_N = keys_N[perm]
  results = [_count_table(keys_N[lo:hi], return_inverse, sort=False)
             for lo, hi in zip(np.concatenate(([0], ends[:-1])), ends)]
  del keys_N
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


def _count_table(keys_N: np.ndarray, return_inverse: bool, sort: bool):
  """count_distinct with one open-addressing table."""
  num = keys_N.size
  if num == 0:
    empty = (keys_N, np.zeros(0, np.int64))
    return empty + (np.zeros(0, np.int32),) if return_inverse else empty
  # Capacity > 1.25 N >= 1.25 U: probing ends, and stays short (load <= 0.8) even when
  # (nearly) all keys are distinct.
  bits = max(3, (num + num // 4).bit_length())
  mask = (1 << bits) - 1
  table = np.full(1 << bits, EMPTY, dtype=np.uint64)
  slot = ((keys_N * _MULT) >> np.uint64(64 - bits)).view(np.int64)
  # Round 1 writes every key to its slot; where keys collide one write wins (read back),
  # the others probe on: to their own key, or claim a free slot.
  table[slot] = keys_N
  pending = np.flatnonzero(table[slot] != keys_N)
  while pending.size:
    slot[pending] = (slot[pending] + 1) & mask
    s, k = slot[pending], keys_N[pending]
    free = table[s] == EMPTY
    table[s[free]] = k[free]
    pending = pending[table[s] != k]
  occupied = np.flatnonzero(table != EMPTY)
  keys_U = table[occupied]
  order = np.argsort(keys_U) if sort else slice(None)
  if not return_inverse:
    return keys_U[order], np.bincount(slot, minlength=table.size)[occupied][order]
  # Only occupied slots are read.
  index_of_slot = np.empty(table.size, np.int32 if num < 1 << 31 else np.int64)
  index_of_slot[occupied[order]] = np.arange(keys_U.size)
  inverse_N = index_of_slot[slot]
  # Counting over the U indices, not the C slots: a smaller, cache-resident output.
  return keys_U[order], np.bincount(inverse_N, minlength=keys_U.size), inverse_N
