"""Longest-suffix f-gram matching: for each position, the longest f-gram ENDING there.

Level-n lookup maps (row of the (n-1)-gram ending at i-1, x_i) -> row of the n-gram ending
at i (for n = 2 the "row" is the token x_{i-1}). A table is closed under prefixes and
suffixes (mine.py), so the chain needs only table rows, and once the n-gram ending at i is
absent no longer one ending at i exists: each level probes only the previous level's hits,
at most K-1 probes per token, vectorised over all positions of the batch.
"""

from __future__ import annotations

import numba
import numpy as np

from scone_jax.fgrams.keyhash import KeyHash, probe
from scone_jax.fgrams.table import FgramTable

_SHIFT = np.uint64(31)
_TOKEN_LIMIT = 1 << 31


def _pack(codes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  return (codes.astype(np.uint64) << _SHIFT) | tokens.astype(np.uint64)


def _check_tokens(tokens: np.ndarray, name: str) -> np.ndarray:
  if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{name} must be integer token ids, got dtype {tokens.dtype}')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 31):
    raise ValueError(f'{name} holds token ids outside [0, 2**31) (min {tokens.min()}, '
                     f'max {tokens.max()})')
  return tokens.astype(np.int64)


class Matcher:
  """Per-length exact hash maps over a table's rows; see the module docstring."""

  def __init__(self, table: FgramTable):
    tokens, lengths, k = table.tokens_SxK, table.lengths, table.max_len
    self.max_len = k
    self.hashes: dict[int, KeyHash] = {}
    code = tokens[:, 0].astype(np.int64)  # Row of each row's n-prefix (n = 1: its token).
    for n in range(2, k + 1):
      rows = np.flatnonzero(lengths == n)
      try:
        # Frequent rows (low row ids) win slot conflicts: fewer probes on real text.
        self.hashes[n] = KeyHash(_pack(code[rows], tokens[rows, n - 1]), rows,
                                 table.counts[rows])
      except ValueError as e:
        raise ValueError('FgramTable rows must be distinct f-grams') from e
      longer = np.flatnonzero(lengths > n)
      code[longer] = self.hashes[n].lookup(_pack(code[longer], tokens[longer, n - 1]))
      if np.any(code[longer] < 0):
        raise ValueError(f'FgramTable is not prefix-closed: some f-gram of {n + 1}+ tokens '
                         f'has its {n}-token prefix missing (mined tables always have it)')
    # Every row's suffix must be a row too, or the chained lookup would miss it.
    for start in range(1, k - 1):
      rows = np.flatnonzero(lengths > start + 1)
      code = tokens[rows, start].astype(np.int64)
      for n in range(2, k - start + 1):
        part = np.flatnonzero(lengths[rows] >= start + n)
        code = code[part]
        rows = rows[part]
        code = self.hashes[n].lookup(_pack(code, tokens[rows, start + n - 1]))
        if np.any(code < 0):
          raise ValueError('FgramTable is not suffix-closed: some f-gram\'s suffix is not a '
                           'row (mined tables always have it)')

  def match(self, tokens_BxT: np.ndarray,
            segment_ids_BxT: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Longest f-gram ending at each position.

    Args:
      tokens_BxT: integer token ids, B sequences of T tokens.
      segment_ids_BxT: optional document ids per position (packed rows); a match never
        spans two segments, and segment 0 (padding) never matches.

    Returns:
      ids_BxT (int32 row, -1 if no f-gram ends there) and lens_BxT (int32 f-gram length,
      1 where none).
    """
    tokens_BxT = np.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2:
      raise ValueError(f'tokens_BxT must be 2-D [batch, length], got {tokens_BxT.shape}')
    b, t = tokens_BxT.shape
    x_N = _check_tokens(tokens_BxT, 'tokens_BxT').reshape(-1)  # N = B*T positions.
    # link_N[i]: position i continues the segment of i-1 in the same row (one spare False).
    link_BxT = np.ones((b, t + 1), bool)
    link_BxT[:, 0] = False
    link_BxT[:, t] = False
    if segment_ids_BxT is not None:
      seg = np.asarray(segment_ids_BxT)
      if seg.shape != tokens_BxT.shape:
        raise ValueError(f'segment_ids_BxT {seg.shape} must have the shape of tokens_BxT '
                         f'{tokens_BxT.shape}')
      link_BxT[:, 1:t] &= (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    link_N = np.append(link_BxT[:, :t].reshape(-1), False)
    ids_N = np.full(b * t, -1, np.int32)
    lens_N = np.ones(b * t, np.int32)
    pos = np.flatnonzero(link_N)
    code = x_N[pos - 1]
    for n in range(2, self.max_len + 1):
      rows = self.hashes[n].lookup(_pack(code, x_N[pos]))
      hit = rows >= 0
      pos, rows = pos[hit], rows[hit]
      ids_N[pos] = rows
      lens_N[pos] = n
      # The (n+1)-gram ending at p+1 extends the n-gram ending at p, if p+1 links to p.
      ok = link_N[pos + 1]
      pos, code = pos[ok] + 1, rows[ok]
      if not pos.size:
        break
    return ids_N.reshape(b, t), lens_N.reshape(b, t)


class IncrementalMatcher:
  """Matching for decoding: one token per sequence per step, equal to `table.match`.

  Keeps, per sequence, the rows of the 1..K-1-grams ending at the previous token (for
  n = 1 the token itself), i.e. the information in its last K-1 tokens. The n-gram ending
  at the new token x is the (n-1)-gram ending at the previous token extended by x, so
  level n is one exact lookup of (that row, x), and the first miss ends the chain. `push`
  is one compiled call for the whole batch: it sits on the decode critical path, where
  each numpy call would cost microseconds however few its keys.
  """

  def __init__(self, table: FgramTable, batch_size: int):
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    matcher = table.matcher
    self._k = table.max_len
    self.batch_size = batch_size
    levels = [matcher.hashes[n] for n in range(2, self._k + 1)]
    self._slots = tuple(h.slots_Cx2 for h in levels)
    self._shifts_L = np.array([h.shift for h in levels], np.int64)
    # Row b, column n-1: row of the n-gram ending at b's last token (n = 1: the token);
    # -1 where none (or nothing came before).
    self._codes_BxL = np.full((batch_size, self._k - 1), -1, np.int64)

  @property
  def kernel_args(self) -> tuple:
    """(codes_BxL, slots, shifts_L): `push_kernel`'s state arguments, for compiled callers
    that fuse a push with more work (serve/decode.py). codes_BxL is updated in place."""
    return self._codes_BxL, self._slots, self._shifts_L

  def reset(self, b: int | None = None) -> None:
    """Forgets the history of sequence `b` (or all): call at a document start."""
    if b is None:
      self._codes_BxL[:] = -1
    else:
      self._codes_BxL[b] = -1

  def push(self, tokens_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Appends one token per sequence; returns (ids_B, lens_B) as `match` would."""
    tokens_B = np.asarray(tokens_B)
    if tokens_B.shape != (self.batch_size,):
      raise ValueError(f'tokens_B must have shape ({self.batch_size},), got '
                       f'{tokens_B.shape}')
    if tokens_B.dtype.kind not in 'iu':
      raise ValueError(f'tokens_B must be integer token ids, got dtype {tokens_B.dtype}')
    ids_B = np.empty(self.batch_size, np.int32)
    lens_B = np.empty(self.batch_size, np.int32)
    bad = push_kernel(tokens_B.astype(np.int64, copy=False), self._codes_BxL, self._slots,
                       self._shifts_L, ids_B, lens_B)
    if bad >= 0:
      raise ValueError(f'tokens_B holds token ids outside [0, 2**31): row {bad} has '
                       f'{tokens_B[bad]}')
    return ids_B, lens_B


@numba.njit(nogil=True, cache=True)
def push_kernel(tokens_B, codes_BxL, slots, shifts_L, ids_B, lens_B):
  """IncrementalMatcher.push; returns -1, or the first row with an invalid token (rows
  before it are updated, it and later ones are not)."""
  batch, levels = codes_BxL.shape
  old_L = np.empty(levels, np.int64)
  for b in range(batch):
    x = tokens_B[b]
    if x < 0 or x >= _TOKEN_LIMIT:
      return b
    for j in range(levels):
      old_L[j] = codes_BxL[b, j]
      codes_BxL[b, j] = -1
    codes_BxL[b, 0] = x
    ids_B[b] = -1
    lens_B[b] = 1
    for n in range(2, levels + 2):
      code = old_L[n - 2]  # Row of the (n-1)-gram ending at the previous token.
      if code < 0:
        break
      row = probe(slots[n - 2], shifts_L[n - 2], (code << 31) | x)
      if row < 0:
        break
      ids_B[b] = row
      lens_B[b] = n
      if n - 1 < levels:
        codes_BxL[b, n - 1] = row
  return -1
