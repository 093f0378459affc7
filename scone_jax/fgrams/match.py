"""Longest-suffix f-gram matching: for each position, the longest f-gram ENDING there.

The n-gram ending at position i is the (n-1)-gram ending at i-1 extended by x_i, i.e. the
key (row of that (n-1)-gram, x_i) in the table's index (index.py; for n = 2 the "row" is
the token x_{i-1}). A table is closed under prefixes and suffixes (mine.py), so the chain
needs only table rows, and once the n-gram ending at i is absent no longer one ending at
i exists: at most K-1 probes per token. Both matchers keep, per sequence, the rows of the
1..K-1-grams ending at the previous token and run one compiled call per batch.
"""

from __future__ import annotations

from typing import Protocol

import numba
import numpy as np

from scone_jax.fgrams import index as index_lib

_TOKEN_LIMIT = 1 << 31


class Indexed(Protocol):
  """What matching needs of a table (fgrams/table.py's FgramTable, which builds its
  matcher from this module: the table is below the matcher, never the reverse)."""
  max_len: int

  @property
  def index(self) -> tuple[np.ndarray, int]: ...


def _check_tokens(tokens: np.ndarray, name: str) -> np.ndarray:
  if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{name} must be integer token ids, got dtype {tokens.dtype}')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 31):
    raise ValueError(f'{name} holds token ids outside [0, 2**31) (min {tokens.min()}, '
                     f'max {tokens.max()})')
  return tokens.astype(np.int64, copy=False)


class Matcher:
  """Batch matching over a table's index; see the module docstring."""

  def __init__(self, table: Indexed):
    self.max_len = table.max_len
    slots, limit = table.index  # Builds (and validates) an in-memory table's index.
    self.index = slots
    self.limit = limit

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
    x_BxT = _check_tokens(tokens_BxT, 'tokens_BxT')
    # link_BxT[i]: position i continues the segment of position i-1 in the same row.
    link_BxT = np.ones((b, t), bool)
    link_BxT[:, 0] = False
    if segment_ids_BxT is not None:
      seg = np.asarray(segment_ids_BxT)
      if seg.shape != tokens_BxT.shape:
        raise ValueError(f'segment_ids_BxT {seg.shape} must have the shape of tokens_BxT '
                         f'{tokens_BxT.shape}')
      link_BxT[:, 1:] &= (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    ids_BxT = np.empty((b, t), np.int32)
    lens_BxT = np.empty((b, t), np.int32)
    _match_kernel(x_BxT, link_BxT, self.index, self.limit, self.max_len, ids_BxT, lens_BxT)
    return ids_BxT, lens_BxT


@numba.njit(nogil=True, inline='always')
def _step(x, codes_L, old_L, index, limit):
  """Advances one sequence by token x: codes_L (rows of the 1..K-1-grams ending at the
  previous token, -1 none; old_L scratch) becomes those ending at x. Returns (row, n) of
  the longest f-gram ending at x, (-1, 1) if none."""
  levels = codes_L.size
  for j in range(levels):
    old_L[j] = codes_L[j]
    codes_L[j] = -1
  codes_L[0] = x
  best, best_n = np.int64(-1), 1
  for n in range(2, levels + 2):
    code = old_L[n - 2]  # Row of the (n-1)-gram ending at the previous token.
    if code < 0:
      break
    if n == 2:
      code += index_lib.TOKEN_CODE
    row = index_lib.find(index, limit, index_lib.pack(code, x))
    if row < 0:
      break
    best, best_n = row, n
    if n - 1 < levels:
      codes_L[n - 1] = row
  return best, best_n


@numba.njit(nogil=True, cache=True)
def _match_kernel(x_BxT, link_BxT, index, limit, max_len, ids_BxT, lens_BxT):
  batch, length = x_BxT.shape
  codes_L = np.empty(max_len - 1, np.int64)
  old_L = np.empty(max_len - 1, np.int64)
  for b in range(batch):
    for t in range(length):
      if not link_BxT[b, t]:
        codes_L[:] = -1  # Nothing before a segment start (or padding) extends into it.
      row, n = _step(x_BxT[b, t], codes_L, old_L, index, limit)
      ids_BxT[b, t] = row
      lens_BxT[b, t] = n


class IncrementalMatcher:
  """Matching for decoding: one token per sequence per step, equal to `table.match`.

  Keeps, per sequence, the rows of the 1..K-1-grams ending at the previous token (for
  n = 1 the token itself), i.e. the information in its last K-1 tokens. The n-gram ending
  at the new token x is the (n-1)-gram ending at the previous token extended by x, so
  level n is one exact lookup of (that row, x), and the first miss ends the chain. `push`
  is one compiled call for the whole batch: it sits on the decode critical path, where
  each numpy call would cost microseconds however few its keys.
  """

  def __init__(self, table, batch_size: int):
    """`table`: an FgramTable (its `matcher` is reused)."""
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    matcher = table.matcher
    self._k = table.max_len
    self.batch_size = batch_size
    self._index, self._limit = matcher.index, matcher.limit
    # Row b, column n-1: row of the n-gram ending at b's last token (n = 1: the token);
    # -1 where none (or nothing came before).
    self._codes_BxL = np.full((batch_size, self._k - 1), -1, np.int64)

  @property
  def kernel_args(self) -> tuple:
    """(codes_BxL, index, limit): `push_kernel`'s state arguments, for compiled callers
    that fuse a push with more work (serve/decode.py). codes_BxL is updated in place."""
    return self._codes_BxL, self._index, self._limit

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
    bad = push_kernel(tokens_B.astype(np.int64, copy=False), self._codes_BxL, self._index,
                      self._limit, ids_B, lens_B)
    if bad >= 0:
      raise ValueError(f'tokens_B holds token ids outside [0, 2**31): row {bad} has '
                       f'{tokens_B[bad]}')
    return ids_B, lens_B


@numba.njit(nogil=True, cache=True)
def push_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B):
  """IncrementalMatcher.push; returns -1, or the first row with an invalid token (rows
  before it are updated, it and later ones are not)."""
  batch, levels = codes_BxL.shape
  old_L = np.empty(levels, np.int64)
  for b in range(batch):
    x = tokens_B[b]
    if x < 0 or x >= _TOKEN_LIMIT:
      return b
    row, n = _step(x, codes_BxL[b], old_L, index, limit)
    ids_B[b] = row
    lens_B[b] = n
  return -1
