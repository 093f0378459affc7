"""FgramTable: the ranked f-grams (row r = f-gram r), persisted as .npy + manifest."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Any

import numpy as np

from scone_jax import artifacts, paths

KIND = 'fgram_table'
_FILES = ('tokens.npy', 'counts.npy', 'lengths.npy')


class FgramTable:
  """S f-grams of 2..K tokens in rank order (count desc, length asc, token ids asc).

  Attributes:
    tokens_SxK: int32 [S, K], row r's tokens left-aligned, padded with 0.
    counts: int64 [S] corpus counts (non-increasing).
    lengths: int32 [S] in [2, K].
    max_len: K.
    min_count: the least count a mined f-gram needed.
    meta: free-form provenance (tokenizer_fingerprint, corpus_fingerprint, ...), saved
      with the table; `meta['tokenizer_fingerprint']` is checked by `load`.
  """

  def __init__(self, tokens_SxK: np.ndarray, counts: np.ndarray, lengths: np.ndarray,
               max_len: int, min_count: int, meta: dict[str, Any] | None = None):
    tokens_SxK = np.ascontiguousarray(tokens_SxK, dtype=np.int32)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    num = counts.shape[0] if counts.ndim == 1 else -1
    if tokens_SxK.shape != (num, max_len) or lengths.shape != (num,):
      raise ValueError(f'FgramTable needs tokens [S, max_len={max_len}], counts [S], '
                       f'lengths [S]; got {tokens_SxK.shape}, {counts.shape}, '
                       f'{lengths.shape}')
    if num and (lengths.min() < 2 or lengths.max() > max_len):
      raise ValueError(f'FgramTable lengths must be in [2, max_len={max_len}]')
    if np.any(np.diff(counts) > 0):
      raise ValueError('FgramTable rows must be in rank order (counts non-increasing)')
    if np.any(tokens_SxK < 0):
      raise ValueError('FgramTable tokens must be non-negative token ids')
    if np.any(tokens_SxK[np.arange(max_len)[None, :] >= lengths[:, None]]):
      raise ValueError('FgramTable tokens must be 0-padded after each row\'s length')
    self.tokens_SxK, self.counts, self.lengths = tokens_SxK, counts, lengths
    self.max_len, self.min_count = int(max_len), int(min_count)
    self.meta = dict(meta or {})
    for array in (self.tokens_SxK, self.counts, self.lengths):
      array.flags.writeable = False  # The fingerprint and matcher depend on them.

  def __len__(self) -> int:
    return self.counts.shape[0]

  def __repr__(self) -> str:
    return (f'FgramTable(size={len(self)}, max_len={self.max_len}, '
            f'min_count={self.min_count}, cutoff_count={self.cutoff_count})')

  def grams(self) -> list[tuple[int, ...]]:
    """The f-grams as token tuples, in rank order."""
    return [tuple(row[:n]) for row, n in zip(self.tokens_SxK.tolist(), self.lengths.tolist())]

  @property
  def cutoff_count(self) -> int:
    """Count of the last kept row (0 for an empty table)."""
    return int(self.counts[-1]) if len(self) else 0

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of K, min_count and the rows (tokens, lengths, counts)."""
    h = hashlib.sha256(f'{KIND}:K={self.max_len}:min_count={self.min_count}:'.encode())
    for array in (self.tokens_SxK, self.lengths, self.counts):
      h.update(array.astype(array.dtype.newbyteorder('<')).tobytes())
    return h.hexdigest()[:16]

  def slice(self, size: int) -> FgramTable:
    """The first `size` rows: equal to mining again with that size (see mine.py)."""
    if not 1 <= size <= len(self):
      raise ValueError(f'slice size={size} must be in [1, {len(self)}] (the table size)')
    return FgramTable(self.tokens_SxK[:size], self.counts[:size], self.lengths[:size],
                      self.max_len, self.min_count, self.meta)

  @functools.cached_property
  def matcher(self):
    """The vectorised longest-suffix matcher (built on first use)."""
    from scone_jax.fgrams.match import Matcher  # match.py imports this module.
    return Matcher(self)

  def match(self, tokens_BxT: np.ndarray,
            segment_ids_BxT: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and length of the longest f-gram ending at each position (see match.py)."""
    return self.matcher.match(tokens_BxT, segment_ids_BxT)

  def save(self, directory: str) -> None:
    """Writes tokens/counts/lengths .npy and a manifest atomically into `directory`."""
    with artifacts.atomic_dir(directory) as tmp:
      for name, array in zip(_FILES, (self.tokens_SxK, self.counts, self.lengths)):
        np.save(os.path.join(tmp, name), array, allow_pickle=False)
      artifacts.write_manifest(tmp, KIND, {
          'max_len': self.max_len, 'size': len(self), 'min_count': self.min_count,
          'cutoff_count': self.cutoff_count, 'fingerprint': self.fingerprint,
          'tokenizer_fingerprint': self.meta.get('tokenizer_fingerprint'),
          'meta': self.meta}, files=list(_FILES))

  @classmethod
  def load(cls, directory: str, expect_tokenizer: str | None = None) -> FgramTable:
    """Loads a saved table; ArtifactError if incomplete, corrupted or from another tokenizer.

    Args:
      directory: a directory written by `save`.
      expect_tokenizer: if given, the tokenizer fingerprint the table must be built with.
    """
    expect = {'tokenizer_fingerprint': expect_tokenizer} if expect_tokenizer else None
    manifest = artifacts.read_manifest(directory, KIND, verify=True, expect=expect)
    try:
      arrays = [np.load(io.BytesIO(paths.read_bytes(paths.join(directory, name))),
                        allow_pickle=False) for name in _FILES]
      table = cls(*arrays, max_len=manifest['max_len'], min_count=manifest['min_count'],
                  meta=manifest.get('meta'))
    except (ValueError, OSError, KeyError) as e:
      raise artifacts.ArtifactError(f'{KIND} at {directory} is unreadable ({e}); rebuild '
                                    'it with mine_fgrams') from e
    if table.fingerprint != manifest.get('fingerprint') or len(table) != manifest.get('size'):
      raise artifacts.ArtifactError(
          f'{KIND} at {directory} has fingerprint {table.fingerprint}, manifest says '
          f'{manifest.get("fingerprint")}: the files were modified; rebuild it')
    return table
