"""Locations: local paths and object-store URLs (gs://, s3://) through one set of calls.

Every location a user names or the code writes (workdir, data.artifacts_dir, corpus
globs, tokenizer.model_file, sweep roots, checkpoints, metrics, the export store, the
report) is a string handed to these helpers. They are thin: `etils.epath` does the file
system work (gcsfs under it for gs://), orbax and tensorstore take the same URLs natively
(`kvstore` below), so there is no file-system layer of our own. A local path keeps its
meaning relative to the working directory until `resolve` makes it absolute; a URL is
never touched (`os.path.abspath('gs://b/x')` is '/cwd/gs:/b/x', the bug this module ends).

Object stores have no rename and no append, so:
  * an artifact directory is built in a local temp dir and published by uploading its
    files, `manifest.json` last: the manifest is the marker readers require
    (`artifacts.atomic_dir`);
  * a small file (JSON, a report) is one object PUT, which GCS makes visible whole or not
    at all;
  * token shards are read remotely by byte range (`RangeArray`), through a per-process
    block cache, so a host reads the documents it trains on and never the whole corpus.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from typing import Any, Iterator

import numpy as np
from etils import epath

_URL_RE = re.compile(r'^[a-z][a-z0-9+.-]*://')


def _no_listing_cache() -> None:
  """gcsfs caches directory listings per process by default, so a checkpoint, eval.json or
  metrics file another process (or host) wrote stays invisible to `exists`, `walk_files`
  and orbax's step listing: readers here poll runs that others write. Off for gs://."""
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


_no_listing_cache()


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (gs://bucket/x), False for a local path."""
  return bool(_URL_RE.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """A canonical string: URLs unchanged, local paths absolute with ~ expanded."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """`base/part/...` for paths and URLs alike (os.path.join keeps 'gs://' intact)."""
  return os.path.join(os.fspath(base), *parts)


def path(p: str | os.PathLike) -> epath.Path:
  """The epath.Path of a location (local or URL)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def exists(p: str) -> bool:
  return path(p).exists()


def isdir(p: str) -> bool:
  return path(p).is_dir()


def isfile(p: str) -> bool:
  return path(p).is_file()


def getsize(p: str) -> int:
  return os.path.getsize(p) if not is_remote(p) else int(path(p).stat().length)


def makedirs(p: str) -> None:
  """Creates a directory (a no-op on object stores, which have no directories)."""
  if not is_remote(p):
    os.makedirs(os.path.expanduser(p), exist_ok=True)


def read_bytes(p: str) -> bytes:
  return path(p).read_bytes()


def read_text(p: str) -> str:
  return path(p).read_text()


def write_bytes(p: str, data: bytes) -> None:
  """Writes a whole file: atomically (temp + rename) locally, one PUT on a store."""
  if is_remote(p):
    path(p).write_bytes(data)
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(resolve(p))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def rmtree(p: str) -> None:
  """Removes a directory tree if present."""
  target = path(p)
  if target.exists():
    target.rmtree(missing_ok=True) if is_remote(p) else target.rmtree()


def remove(p: str) -> None:
  target = path(p)
  if target.exists():
    target.unlink()


def walk_files(root: str) -> Iterator[str]:
  """Paths of the files under `root`, relative to it ('/'-separated)."""
  # epath's walk yields object-store roots without their scheme ('bucket/dir').
  base = os.fspath(path(root)).split('://', 1)[-1].rstrip('/')
  for directory, _, files in path(root).walk():
    rel = os.fspath(directory).split('://', 1)[-1][len(base):].strip('/')
    for name in files:
      yield f'{rel}/{name}' if rel else name


def glob(pattern: str) -> list[str]:
  """Sorted files matching a glob; '*', '?' and '[...]' work for URLs too."""
  if not is_remote(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(m for m in glob_lib.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
  parts = pattern.split('/')
  first = next((i for i, s in enumerate(parts) if i > 2 and re.search(r'[*?[]', s)), None)
  if first is None:
    return [pattern] if isfile(pattern) else []
  base = path('/'.join(parts[:first]))
  return sorted(os.fspath(m) for m in base.glob('/'.join(parts[first:])) if m.is_file())


def kvstore(p: str) -> dict[str, Any] | str:
  """The tensorstore kvstore spec of a directory (file driver locally, URL otherwise)."""
  if is_remote(p):
    return p.rstrip('/') + '/'
  return {'driver': 'file', 'path': resolve(p)}


class RangeArray:
  """A read-only 1-D array in a (remote) file, read by byte range through a block cache.

  Supports what readers of token shards do: `len`, `dtype`, `shape`, slices and integer
  fancy indexing (the batch builder gathers tokens by index). Blocks of `block_bytes`
  are fetched on first touch and kept in an LRU of `cache_blocks` blocks, so a process
  reads only the byte ranges it uses; memory stays <= block_bytes * cache_blocks.
  """

  def __init__(self, location: str, dtype: np.dtype, size: int,
               block_bytes: int = 1 << 20, cache_blocks: int = 256):
    self.location = location
    self.dtype = np.dtype(dtype)
    self.shape = (int(size),)
    self._block = max(block_bytes // self.dtype.itemsize, 1)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._cache_blocks = cache_blocks
    self._lock = threading.Lock()
    self._file = None

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def ndim(self) -> int:
    return 1

  def _fetch(self, b: int) -> np.ndarray:
    if b in self._cache:
      self._cache.move_to_end(b)
      return self._cache[b]
    if self._file is None:
      self._file = path(self.location).open('rb')
    start = b * self._block
    count = min(self._block, len(self) - start)
    self._file.seek(start * self.dtype.itemsize)
    data = self._file.read(count * self.dtype.itemsize)
    if len(data) != count * self.dtype.itemsize:
      raise OSError(f'{self.location}: short read at element {start} ({len(data)} bytes); '
                    'the file is truncated')
    block = np.frombuffer(data, self.dtype)
    self._cache[b] = block
    if len(self._cache) > self._cache_blocks:
      self._cache.popitem(last=False)
    return block

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step != 1:
        return self[np.arange(start, stop, step)]
      if stop <= start:
        return np.empty(0, self.dtype)
      with self._lock:
        blocks = [self._fetch(b) for b in range(start // self._block,
                                               (stop - 1) // self._block + 1)]
      first = start - (start // self._block) * self._block
      return np.concatenate(blocks)[first:first + stop - start]
    idx = np.asarray(key)
    if idx.dtype.kind not in 'iu':
      raise TypeError(f'RangeArray index must be a slice or integers, got {idx.dtype}')
    flat = idx.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + len(self), flat)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise IndexError(f'index out of range for {self.location} of {len(self)} elements')
    blocks, inverse = np.unique(flat // self._block, return_inverse=True)
    with self._lock:
      data = [self._fetch(int(b)) for b in blocks]
    out = np.empty(flat.size, self.dtype)
    for j, block in enumerate(data):
      sel = inverse == j
      out[sel] = block[flat[sel] - int(blocks[j]) * self._block]
    return out.reshape(idx.shape)

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[0:len(self)]
    return out if dtype is None else out.astype(dtype)

  def __getstate__(self):  # grain may pickle datasets into worker processes.
    state = dict(self.__dict__)
    state.update(_file=None, _lock=None, _cache=collections.OrderedDict())
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
