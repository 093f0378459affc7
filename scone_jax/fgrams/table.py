"""FgramTable: the ranked f-grams (row r = f-gram r) with their match index, saved in a
layout that memory-maps: opening a table of any size reads only its manifest.

On-disk layout (`save`; all plain .npy, little-endian, mapped read-only by `load`):
  keys.npy     uint64 [S]  row r's key: (row of its prefix, or 2**32 + first token) << 31
                           | last token (index.py). The keys are the table: a trie in rank
                           order, tokens come from walking a row's prefix chain.
  counts.npy   int64 [S]   corpus counts, non-increasing.
  lengths.npy  uint8 [S]   2..K.
  index.npy    uint32 [C, 3]  the match index (index.py): key and row per slot, C ~ S / 0.65.
  manifest.json            K, min_count, S, fingerprint, sha256 + size of every file.
That is 17 + 12 / 0.65 ~ 35.5 bytes per f-gram for any K (the token matrix alone was 4K).
A host maps the whole table and the OS pages in only what its lookups touch; row ranges
of every file are byte ranges, so a host that serves rows [a, b) reads only those.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Any

import numpy as np

from scone_jax import artifacts, paths
from scone_jax.fgrams import index as index_lib
from scone_jax.fgrams import match as match_lib

KIND = 'fgram_table'
LAYOUT = 'trie-index-v2'
FILES = ('keys.npy', 'counts.npy', 'lengths.npy', 'index.npy')
_OLD_FILES = ('tokens.npy', 'counts.npy', 'lengths.npy')  # Layout before 2026-11-29.
_BUILD_ERRORS = {
    1: 'is not prefix-closed: an f-gram of 3+ tokens has its prefix missing (mined tables '
       'always have it)',
    2: 'rows must be distinct f-grams',
    3: 'is not suffix-closed: some f-gram\'s suffix is not a row (mined tables always have '
       'it)',
    4: 'rows must be in rank order: an f-gram\'s prefix ranks after it (counts desc, length '
       'asc)',
}


class FgramTable:
  """S f-grams of 2..K tokens in rank order (count desc, length asc, token ids asc).

  Attributes:
    counts: int64 [S] corpus counts (non-increasing).
    lengths: uint8 [S] in [2, K].
    keys: uint64 [S] each row's key (module docstring): prefix row and last token.
    tokens_SxK: int32 [S, K], row r's tokens left-aligned, padded with 0. An opened table
      derives it on first use (S x K x 4 bytes): on large tables use `tokens_of(rows)`.
    max_len: K.
    min_count: the least count a mined f-gram needed.
    meta: free-form provenance (tokenizer_fingerprint, corpus_fingerprint, ...), saved
      with the table; `meta['tokenizer_fingerprint']` is checked by `load`.
  """

  def __init__(self, tokens_SxK: np.ndarray, counts: np.ndarray, lengths: np.ndarray,
               max_len: int, min_count: int, meta: dict[str, Any] | None = None):
    tokens_SxK = np.ascontiguousarray(tokens_SxK, dtype=np.int32)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    lengths = np.asarray(lengths)
    num = counts.shape[0] if counts.ndim == 1 else -1
    if tokens_SxK.shape != (num, max_len) or lengths.shape != (num,):
      raise ValueError(f'FgramTable needs tokens [S, max_len={max_len}], counts [S], '
                       f'lengths [S]; got {tokens_SxK.shape}, {counts.shape}, '
                       f'{lengths.shape}')
    if not 2 <= max_len <= 255 or num > index_lib.MAX_ROWS - 1:
      raise ValueError(f'FgramTable needs 2 <= max_len <= 255 and < 2**32 - 1 rows; got '
                       f'max_len={max_len}, {num} rows')
    if num and (lengths.min() < 2 or lengths.max() > max_len):
      raise ValueError(f'FgramTable lengths must be in [2, max_len={max_len}]')
    if np.any(np.diff(counts) > 0):
      raise ValueError('FgramTable rows must be in rank order (counts non-increasing)')
    if np.any(tokens_SxK < 0):
      raise ValueError('FgramTable tokens must be non-negative token ids')
    if np.any(tokens_SxK[np.arange(max_len)[None, :] >= lengths[:, None]]):
      raise ValueError('FgramTable tokens must be 0-padded after each row\'s length')
    self._init(counts, lengths.astype(np.uint8), max_len, min_count, meta)
    self._tokens = tokens_SxK
    self._tokens.flags.writeable = False

  def _init(self, counts, lengths, max_len, min_count, meta, keys=None, fingerprint=None):
    self.counts, self.lengths = counts, lengths
    self.max_len, self.min_count = int(max_len), int(min_count)
    self.meta = dict(meta or {})
    self._keys = keys  # This table's rows' keys ([S]); None until built.
    # The index slots; a sliced table shares its parent's, whose probes return rows
    # < _limit only.
    self._index = None
    self._limit = len(counts)
    self._sliced = False
    self._tokens = None
    self._fingerprint = fingerprint
    for array in (self.counts, self.lengths):
      if array.flags.writeable:
        array.flags.writeable = False  # The fingerprint and matcher depend on them.

  @classmethod
  def _from_layout(cls, keys, counts, lengths, slots, max_len, min_count, meta,
                   fingerprint=None) -> FgramTable:
    table = cls.__new__(cls)
    table._init(counts, lengths, max_len, min_count, meta, keys=keys,
                fingerprint=fingerprint)
    table._index = slots
    return table

  @classmethod
  def from_keys(cls, keys: np.ndarray, counts: np.ndarray, lengths: np.ndarray,
                max_len: int, min_count: int,
                meta: dict[str, Any] | None = None) -> FgramTable:
    """A table from its layout arrays (keys as in the module docstring, rank order),
    indexing the keys. Checks distinct keys and non-increasing counts, not closure: for
    writers that produce keys directly (and synthetic benchmark tables)."""
    keys = np.ascontiguousarray(keys, np.uint64)
    counts = np.ascontiguousarray(counts, np.int64)
    lengths = np.ascontiguousarray(lengths, np.uint8)
    if not keys.shape == counts.shape == lengths.shape or keys.ndim != 1:
      raise ValueError(f'keys {keys.shape}, counts {counts.shape}, lengths '
                       f'{lengths.shape} must be equal 1-D')
    if np.any(counts[1:] > counts[:-1]):
      raise ValueError('FgramTable rows must be in rank order (counts non-increasing)')
    slots = index_lib.empty_slots(keys.size)
    duplicate = index_lib.index_kernel(keys, slots)
    if duplicate >= 0:
      raise ValueError(f'FgramTable rows must be distinct f-grams (row {duplicate})')
    for array in (keys, counts, lengths, slots):
      array.flags.writeable = False
    return cls._from_layout(keys, counts, lengths, slots, max_len, min_count, meta)

  def __len__(self) -> int:
    return self.counts.shape[0]

  def __repr__(self) -> str:
    return (f'FgramTable(size={len(self)}, max_len={self.max_len}, '
            f'min_count={self.min_count}, cutoff_count={self.cutoff_count})')

  # -- the index and the derived views ---------------------------------------------------

  def _build(self) -> None:
    """Keys and index from the tokens (a table made from arrays); validates closure."""
    num = len(self)
    keys = np.zeros(num, np.uint64)
    slots = index_lib.empty_slots(num)
    error, row = index_lib.build_kernel(self._tokens, self.lengths, slots, keys)
    if error:
      raise ValueError(f'FgramTable {_BUILD_ERRORS[error]} (row {row}: '
                       f'{self.grams_of([row])[0]})')
    keys.flags.writeable = slots.flags.writeable = False
    self._keys, self._index = keys, slots

  @property
  def keys(self) -> np.ndarray:
    if self._keys is None:
      self._build()
    return self._keys

  @property
  def index(self) -> tuple[np.ndarray, int]:
    """(slots_Cx3, limit): the match index and the number of rows a probe may return
    (index.find)."""
    if self._index is None:
      self._build()
    return self._index, self._limit

  @property
  def tokens_SxK(self) -> np.ndarray:
    if self._tokens is None:
      tokens = np.zeros((len(self), self.max_len), np.int32)
      index_lib.all_tokens_kernel(self.keys, self.lengths, tokens)
      tokens.flags.writeable = False
      self._tokens = tokens
    return self._tokens

  def tokens_of(self, rows_R: np.ndarray) -> np.ndarray:
    """int32 [R, K] tokens of the given rows, without materialising the whole table."""
    rows_R = np.asarray(rows_R, np.int64).reshape(-1)
    if rows_R.size and (rows_R.min() < 0 or rows_R.max() >= len(self)):
      raise IndexError(f'rows must be in [0, {len(self)})')
    if self._tokens is not None:
      return self._tokens[rows_R]
    out = np.zeros((rows_R.size, self.max_len), np.int32)
    index_lib.tokens_kernel(self.keys, self.lengths, rows_R, out)
    return out

  def grams_of(self, rows) -> list[tuple[int, ...]]:
    tokens = self._tokens[np.asarray(rows)] if self._tokens is not None else \
        self.tokens_of(rows)
    return [tuple(t[:n]) for t, n in zip(tokens.tolist(),
                                         np.asarray(self.lengths)[np.asarray(rows)].tolist())]

  def grams(self) -> list[tuple[int, ...]]:
    """The f-grams as token tuples, in rank order."""
    return self.grams_of(np.arange(len(self)))

  @property
  def cutoff_count(self) -> int:
    """Count of the last kept row (0 for an empty table)."""
    return int(self.counts[-1]) if len(self) else 0

  @property
  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of K, min_count and the rows (keys, lengths, counts)."""
    if self._fingerprint is None:
      h = fingerprint_hasher(self.max_len, self.min_count)
      for array in (self.keys, self.lengths, self.counts):
        h.update(np.ascontiguousarray(array, array.dtype.newbyteorder('<')).data)
      self._fingerprint = h.hexdigest()[:16]
    return self._fingerprint

  @property
  def nbytes(self) -> int:
    """Bytes of the saved layout (rows + index), what `load` maps."""
    return len(self) * 17 + self.index[0].nbytes

  def slice(self, size: int) -> FgramTable:
    """The first `size` rows: equal to mining again with that size (see mine.py). O(1):
    it shares this table's arrays and index (a probe skips rows >= size)."""
    if not 1 <= size <= len(self):
      raise ValueError(f'slice size={size} must be in [1, {len(self)}] (the table size)')
    if size == len(self):
      return self
    slots, _ = self.index
    table = FgramTable._from_layout(self.keys[:size], self.counts[:size],
                                    self.lengths[:size], slots, self.max_len,
                                    self.min_count, self.meta)
    table._sliced = True
    if self._tokens is not None:
      table._tokens = self._tokens[:size]
    return table

  @functools.cached_property
  def matcher(self):
    """The longest-suffix matcher over this table's index."""
    return match_lib.Matcher(self)

  def match(self, tokens_BxT: np.ndarray,
            segment_ids_BxT: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and length of the longest f-gram ending at each position (see match.py)."""
    return self.matcher.match(tokens_BxT, segment_ids_BxT)

  # -- persistence -------------------------------------------------------------------------

  def save(self, directory: str) -> None:
    """Writes the layout (module docstring) and a manifest atomically into `directory`."""
    slots, _ = self.index
    if self._sliced:  # Its own index, so the file holds its rows only.
      slots = index_lib.empty_slots(len(self))
      index_lib.index_kernel(np.ascontiguousarray(self.keys), slots)
    with artifacts.atomic_dir(directory) as tmp:
      for name, array in zip(FILES, (self.keys, self.counts, self.lengths, slots)):
        np.save(os.path.join(tmp, name), np.asarray(array), allow_pickle=False)
      write_manifest(tmp, max_len=self.max_len, size=len(self), min_count=self.min_count,
                     cutoff_count=self.cutoff_count, fingerprint=self.fingerprint,
                     index_slots=int(slots.shape[0]), meta=self.meta)

  @classmethod
  def load(cls, directory: str, expect_tokenizer: str | None = None,
           verify: bool | str = True) -> FgramTable:
    """Opens a saved table by memory-mapping it: no rebuild, O(1) with verify=False.

    Args:
      directory: a directory written by `save`.
      expect_tokenizer: if given, the tokenizer fingerprint the table must be built with.
      verify: True checks each file's sha256 unless it passed before unchanged (size,
        mtime, inode; artifacts.read_manifest), so only a first open reads every byte;
        'full' always; False checks sizes only.

    Raises:
      ArtifactError: incomplete, corrupted, or from another tokenizer.
    """
    expect = {'tokenizer_fingerprint': expect_tokenizer} if expect_tokenizer else None
    manifest = artifacts.read_manifest(directory, KIND, verify=verify, expect=expect)
    try:
      if manifest.get('layout') != LAYOUT:
        return cls._load_old(directory, manifest)
      num, k = manifest['size'], manifest['max_len']
      keys, counts, lengths, slots = (
          _load_npy(directory, name) for name in FILES)
      for array, dtype, shape in ((keys, np.uint64, (num,)), (counts, np.int64, (num,)),
                                  (lengths, np.uint8, (num,)),
                                  (slots, np.uint32, (manifest['index_slots'], 3))):
        if array.dtype != dtype or array.shape != shape:
          raise ValueError(f'an array is {array.dtype}{list(array.shape)}, expected '
                           f'{np.dtype(dtype)}{list(shape)}')
    except (ValueError, OSError, KeyError) as e:
      raise artifacts.ArtifactError(f'{KIND} at {directory} is unreadable ({e}); rebuild '
                                    'it with mine_fgrams') from e
    return cls._from_layout(keys, counts, lengths, slots, k, manifest['min_count'],
                            manifest.get('meta'), fingerprint=manifest['fingerprint'])

  @classmethod
  def _load_old(cls, directory: str, manifest: dict[str, Any]) -> FgramTable:
    """A table saved before the memory-mapped layout: read and indexed (O(S))."""
    arrays = [_load_npy(directory, name) for name in _OLD_FILES]
    return cls(*arrays, max_len=manifest['max_len'], min_count=manifest['min_count'],
               meta=manifest.get('meta'))


def fingerprint_hasher(max_len: int, min_count: int):
  """The sha256 behind FgramTable.fingerprint: update it with the little-endian bytes of
  the keys, then the lengths, then the counts (in any chunks); the fingerprint is
  `hexdigest()[:16]`."""
  return hashlib.sha256(f'{KIND}:{LAYOUT}:K={max_len}:min_count={min_count}:'.encode())


def write_manifest(directory: str, *, max_len: int, size: int, min_count: int,
                   cutoff_count: int, fingerprint: str, index_slots: int,
                   meta: dict[str, Any]) -> None:
  """The manifest of a table's files (FILES), written last into `directory`."""
  artifacts.write_manifest(directory, KIND, {
      'layout': LAYOUT, 'max_len': max_len, 'size': size, 'min_count': min_count,
      'cutoff_count': cutoff_count, 'fingerprint': fingerprint, 'index_slots': index_slots,
      'tokenizer_fingerprint': meta.get('tokenizer_fingerprint'), 'meta': meta},
      files=list(FILES))


def _load_npy(directory: str, name: str) -> np.ndarray:
  """A saved array: memory-mapped on local disk, read whole from an object store."""
  path = paths.join(directory, name)
  if paths.is_remote(path):
    return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
  return np.asarray(np.load(path, mmap_mode='r', allow_pickle=False))
