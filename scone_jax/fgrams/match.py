"""Longest-suffix f-gram matching: for each position, the longest f-gram ENDING there.

Level-n lookup maps (row of the (n-1)-gram ending at i-1, x_i) -> row of the n-gram ending
at i (for n = 2 the "row" is the token x_{i-1}). A table is closed under prefixes and
suffixes (mine.py), so the chain needs only table rows, and once the n-gram ending at i is
absent no longer one ending at i exists: each level probes only the previous level's hits,
at most K-1 probes per token, vectorised over all positions of the batch.
"""

from __future__ import annotations

import numpy as np

from scone_jax.fgrams.keyhash import KeyHash
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


# Below this batch size `push` probes the hash maps one key at a time in Python: a numpy
# call costs microseconds however few its keys, and decode steps are latency-bound.
SCALAR_MAX_BATCH = 64


class IncrementalMatcher:
  """Matching for decoding: one token per sequence per step, equal to `table.match`.

  Keeps, per sequence, the rows of the 1..K-1-grams ending at the previous token (for
  n = 1 the token itself), i.e. the information in its last K-1 tokens. The n-gram ending
  at the new token x is the (n-1)-gram ending at the previous token extended by x, so
  level n is one exact lookup of (that row, x), and the first miss ends the chain.
  Batches up to SCALAR_MAX_BATCH keep that state in Python lists and probe one key at a
  time (`KeyHash.lookup_one`); larger ones keep a [B, K-1] array and probe vectorised.
  """

  def __init__(self, table: FgramTable, batch_size: int):
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    self._matcher = table.matcher
    self._k = table.max_len
    self.batch_size = batch_size
    self._scalar = batch_size <= SCALAR_MAX_BATCH
    if self._scalar:
      # Per sequence: rows of the 1..m-grams ending at the previous token, m <= K-1
      # (shorter where a level missed).
      self._history: list[list[int]] = [[] for _ in range(batch_size)]
      self._lookups = [self._matcher.hashes[n].lookup_one for n in range(2, self._k + 1)]
    else:
      self._codes_BxL = np.full((batch_size, self._k - 1), -1, np.int64)  # L = K-1 lengths.

  def reset(self, b: int | None = None) -> None:
    """Forgets the history of sequence `b` (or all): call at a document start."""
    if self._scalar:
      if b is None:
        self._history = [[] for _ in range(self.batch_size)]
      else:
        self._history[b] = []
    elif b is None:
      self._codes_BxL[:] = -1
    else:
      self._codes_BxL[b] = -1

  def push(self, tokens_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Appends one token per sequence; returns (ids_B, lens_B) as `match` would."""
    tokens_B = np.asarray(tokens_B)
    if tokens_B.shape != (self.batch_size,):
      raise ValueError(f'tokens_B must have shape ({self.batch_size},), got '
                       f'{tokens_B.shape}')
    if self._scalar:
      return self._push_scalar(tokens_B)
    x_B = _check_tokens(tokens_B, 'tokens_B')
    codes_BxL = self._codes_BxL
    new_BxL = np.full_like(codes_BxL, -1)
    new_BxL[:, 0] = x_B
    ids_B = np.full(self.batch_size, -1, np.int32)
    lens_B = np.ones(self.batch_size, np.int32)
    active = np.arange(self.batch_size)
    for n in range(2, self._k + 1):
      code = codes_BxL[active, n - 2]  # Row of the (n-1)-gram ending at the last token.
      active, code = active[code >= 0], code[code >= 0]
      rows = self._matcher.hashes[n].lookup(_pack(code, x_B[active]))
      active, rows = active[rows >= 0], rows[rows >= 0]
      if not active.size:
        break
      ids_B[active] = rows
      lens_B[active] = n
      if n < self._k:
        new_BxL[active, n - 1] = rows
    self._codes_BxL = new_BxL
    return ids_B, lens_B

  def _push_scalar(self, tokens_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Plain-Python checks: np.issubdtype and ufunc reductions cost microseconds each.
    if tokens_B.dtype.kind not in 'iu':
      raise ValueError(f'tokens_B must be integer token ids, got dtype {tokens_B.dtype}')
    xs = tokens_B.tolist()
    if min(xs) < 0 or max(xs) >= _TOKEN_LIMIT:
      raise ValueError(f'tokens_B holds token ids outside [0, 2**31): {xs}')
    history, lookups, last = self._history, self._lookups, self._k - 1
    ids, lens = [-1] * len(xs), [1] * len(xs)
    for b, x in enumerate(xs):
      new = [x]  # Then the rows of the 2-, 3-, ... grams ending at x.
      for lookup, code in zip(lookups, history[b]):
        row = lookup((code << 31) | x)
        if row < 0:
          break
        new.append(row)
      if len(new) > 1:
        ids[b], lens[b] = new[-1], len(new)
      history[b] = new[:last]
    return np.array(ids, np.int32), np.array(lens, np.int32)
