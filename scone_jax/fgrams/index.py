"""The table's match index: an exact open-addressing map from an f-gram's key to its row,
stored as plain arrays so a saved table memory-maps it instead of rebuilding it.

An f-gram of n tokens is the pair (its (n-1)-token prefix, its last token): its key is
  code << 31 | last_token,  code = row of the prefix (n >= 3) or 2**32 + first token (n = 2)
(the `keys_S` of the table: a trie in rank order, since a prefix always ranks before its
extensions). Token ids are < 2**31 and rows < 2**32 - 1, so a key fits in a uint64 and no
two f-grams share one.

slots_Cx3 (uint32, C ~ S / LOAD slots, any C, not a power of two) holds per used slot
its key (low, high 32 bits) and row; row EMPTY marks a free slot. A key's home slot is the
high bits of key * _SLOT_MULT scaled to C; probing steps +1 mod C. A probe reads only the
slot array (12 bytes a slot, one cache line for a few probes): no dependent second read.
Rows are inserted in rank order, so frequent f-grams sit in their home slot. Bytes per
f-gram: 12 / LOAD for the index, plus 8 for keys_S (kept for the tokens and the
fingerprint, not read by a probe).
"""

from __future__ import annotations

import numba
import numpy as np

EMPTY = np.uint32(0xFFFF_FFFF)  # The row of a free slot (rows are < 2**32 - 1).
LOAD = 0.65  # Slots used at most; expected probes per hit ~2, per miss ~4.6.
TOKEN_BITS = 31
TOKEN_CODE = 1 << 32  # code of a bigram's first token t: TOKEN_CODE + t.
MAX_ROWS = (1 << 32) - 1
_SLOT_MULT = 0x9E37_79B9_7F4A_7C15


def capacity(num_rows: int) -> int:
  """Slots of an index for `num_rows` rows (at least one free slot, so probes end)."""
  return max(8, int(np.ceil(num_rows / LOAD)) + 1)


def empty_slots(num_rows: int) -> np.ndarray:
  """An index with no rows, sized for `num_rows`."""
  return np.full((capacity(num_rows), 3), EMPTY, np.uint32)


@numba.njit(nogil=True, inline='always')
def _home(key, num_slots):
  h = (np.uint64(key) * np.uint64(_SLOT_MULT)) >> np.uint64(32)
  return np.int64((h * np.uint64(num_slots)) >> np.uint64(32))


@numba.njit(nogil=True, inline='always')
def _key_at(slots_Cx3, slot):
  return (np.uint64(slots_Cx3[slot, 1]) << np.uint64(32)) | np.uint64(slots_Cx3[slot, 0])


@numba.njit(nogil=True, inline='always')
def find(slots_Cx3, limit, key):
  """Row of `key` if it is in the index and below `limit` (a sliced table), else -1."""
  num_slots = slots_Cx3.shape[0]
  slot = _home(key, num_slots)
  while True:
    row = slots_Cx3[slot, 2]
    if row == EMPTY:
      return np.int64(-1)
    if _key_at(slots_Cx3, slot) == np.uint64(key):
      return np.int64(row) if np.int64(row) < limit else np.int64(-1)
    slot += 1
    if slot == num_slots:
      slot = 0


@numba.njit(nogil=True, inline='always')
def pack(code, token):
  return (np.uint64(code) << np.uint64(TOKEN_BITS)) | np.uint64(token)


@numba.njit(nogil=True, inline='always')
def _insert(slots_Cx3, key, row):
  """Inserts (key, row); returns False if the key is already present."""
  num_slots = slots_Cx3.shape[0]
  slot = _home(key, num_slots)
  while True:
    if slots_Cx3[slot, 2] == EMPTY:
      slots_Cx3[slot, 0] = np.uint32(key & np.uint64(0xFFFF_FFFF))
      slots_Cx3[slot, 1] = np.uint32(key >> np.uint64(32))
      slots_Cx3[slot, 2] = np.uint32(row)
      return True
    if _key_at(slots_Cx3, slot) == key:
      return False
    slot += 1
    if slot == num_slots:
      slot = 0


@numba.njit(nogil=True, cache=True)
def build_kernel(tokens_SxK, lengths_S, slots_C, keys_S):
  """Fills keys_S and slots_C (empty_slots on entry) from a table's tokens.

  Returns (0, -1) on success, else (error, row): 1 a row's prefix is not a row, 2 two rows
  are equal, 3 a row's suffix is not a row, 4 a row's prefix ranks after it. Keys are found level by level (a prefix is
  shorter); then the index is rebuilt in row order so frequent rows get home slots.
  """
  num, max_len = tokens_SxK.shape
  big = np.int64(1) << 62
  for n in range(2, max_len + 1):
    for r in range(num):
      if lengths_S[r] != n:
        continue
      code = TOKEN_CODE + np.int64(tokens_SxK[r, 0])
      for j in range(1, n - 1):
        code = find(slots_C, big, pack(code, tokens_SxK[r, j]))
        if code < 0:
          return 1, r
      keys_S[r] = pack(code, tokens_SxK[r, n - 1])
      if not _insert(slots_C, keys_S[r], r):
        return 2, r
  slots_C[:, :] = EMPTY
  for r in range(num):
    _insert(slots_C, keys_S[r], r)
  for r in range(num):  # Suffix closure: tokens 1..n-1 of every row of 3+ tokens.
    n = lengths_S[r]
    if n < 3:
      continue
    code = TOKEN_CODE + np.int64(tokens_SxK[r, 1])
    for j in range(2, n):
      code = find(slots_C, big, pack(code, tokens_SxK[r, j]))
      if code < 0:
        return 3, r
  for r in range(num):
    if lengths_S[r] >= 3 and np.int64(keys_S[r] >> np.uint64(TOKEN_BITS)) >= r:
      return 4, r
  return 0, -1


@numba.njit(nogil=True, cache=True)
def index_kernel(keys_S, slots_C):
  """Fills slots_C (empty_slots) from keys_S in row order; -1, or the first duplicate."""
  for r in range(keys_S.size):
    if not _insert(slots_C, keys_S[r], r):
      return r
  return -1


home = _home  # A key's home slot; also callable from Python (one key at a time).


@numba.njit(nogil=True, cache=True)
def homes(keys_N, num_slots):
  """int64 [N] home slot of each key in an index of `num_slots` slots."""
  out_N = np.empty(keys_N.size, np.int64)
  for i in range(keys_N.size):
    out_N[i] = _home(keys_N[i], num_slots)
  return out_N


# An index built in parts (the Beam pipeline: one worker per range of slots, fgrams/beam.py).
# Every key homed in [lo, lo + R) goes into the range's slots by the same linear probing,
# without wrapping; a key that finds no free slot before the range's end "spills" and is
# placed afterwards by `place_kernel`, probing on from its home across the following
# ranges (and past the end to slot 0) like `_insert`. A probe still finds every key: the
# slots from its home up to it are all taken (a spill only fills a free slot, so no probe
# chain gets a gap). Rows go in rank order within a range, so frequent rows still get
# their home slots; only the layout of spilled keys can differ from `index_kernel`'s.
@numba.njit(nogil=True, cache=True)
def range_kernel(keys_N, rows_N, homes_N, lo, slots_Rx3, spilled_N):
  """Inserts keys (rank order) homed in [lo, lo + R) into slots_Rx3, the index's slots
  lo..lo + R - 1; marks in spilled_N the keys that ran past the range's end. Returns -1,
  or i for a key i already present (two rows with one key)."""
  num = slots_Rx3.shape[0]
  for i in range(keys_N.size):
    key = np.uint64(keys_N[i])
    slot = homes_N[i] - lo
    placed = False
    while slot < num:
      if slots_Rx3[slot, 2] == EMPTY:
        slots_Rx3[slot, 0] = np.uint32(key & np.uint64(0xFFFF_FFFF))
        slots_Rx3[slot, 1] = np.uint32(key >> np.uint64(32))
        slots_Rx3[slot, 2] = np.uint32(rows_N[i])
        placed = True
        break
      if _key_at(slots_Rx3, slot) == key:
        return i
      slot += 1
    if not placed:
      spilled_N[i] = True
  return -1


@numba.njit(nogil=True, cache=True)
def place_kernel(slots_Cx3, keys_N, rows_N):
  """Inserts the spilled keys of `range_kernel` into the assembled index; -1, or the
  index of a key already present."""
  for i in range(keys_N.size):
    if not _insert(slots_Cx3, np.uint64(keys_N[i]), rows_N[i]):
      return i
  return -1


@numba.njit(nogil=True, cache=True)
def tokens_kernel(keys_S, lengths_S, rows_R, tokens_RxK):
  """tokens_RxK[i] = tokens of row rows_R[i] (0-padded), by walking its prefix chain."""
  mask = np.uint64((1 << TOKEN_BITS) - 1)
  for i in range(rows_R.size):
    r = rows_R[i]
    n = lengths_S[r]
    tokens_RxK[i, :] = 0
    for j in range(n - 1, 0, -1):
      key = keys_S[r]
      tokens_RxK[i, j] = np.int32(key & mask)
      r = np.int64(key >> np.uint64(TOKEN_BITS))
    tokens_RxK[i, 0] = np.int32(r - TOKEN_CODE)


@numba.njit(nogil=True, cache=True)
def all_tokens_kernel(keys_S, lengths_S, tokens_SxK):
  """tokens_kernel for every row, copying each row's prefix from its (earlier) row."""
  mask = np.uint64((1 << TOKEN_BITS) - 1)
  for r in range(keys_S.size):
    n = lengths_S[r]
    key = keys_S[r]
    code = np.int64(key >> np.uint64(TOKEN_BITS))
    if n == 2:
      tokens_SxK[r, 0] = np.int32(code - TOKEN_CODE)
    else:
      tokens_SxK[r, :n - 1] = tokens_SxK[code, :n - 1]
    tokens_SxK[r, n - 1] = np.int32(key & mask)
