"""EmbeddingStore: the exported [S, d] f-gram embeddings in host memory or on disk.

Two tiers (docs/METHOD.md, section 4, has the measured costs behind the choice):
  'ram'   the matrix is read once into host memory with one extra zero row at index S,
          so rows -1 (no match) gather zeros without a branch. Shards are read straight
          into that buffer by parallel threads (no intermediate copies; the buffer is
          advised onto transparent huge pages, so first-touch page faults are few) and
          each shard's crc32c is checked as it lands: the load reads every byte anyway.
  'disk'  the matrix stays in the zarr3 store. Reader 'memmap' (the default when the
          layout allows) maps each shard's raw rows: the export writes shards
          uncompressed with every inner chunk present and in order, which this module
          checks from the shard index before trusting it; the OS page cache serves hot
          f-grams. A gather first asks the kernel for all its rows' pages at once
          (madvise WILLNEED), so a batch's cold reads overlap instead of faulting one by
          one, and the mappings are advised MADV_RANDOM (no readahead of neighbours). Each
          shard's crc32c is checked when a gather first touches it (or all at open with
          shard_checks='open'). Reader 'tensorstore' reads rows through tensorstore with
          a bounded cache_pool (any valid zarr3 layout).

A quantised store (export.quant 'int8' | 'fp8') holds [S, d + 4] int8 | float8_e4m3fn rows,
each ending in its float32 scale's bytes (export/quant.py): both tiers, the checksums and
every gather treat a row as its W = `row_width` stored columns; the decode step
dequantises on the device.

The accelerator never sees the store: the decoder gathers on the host and transfers a
small [B, d] slab per step (indexing a pinned_host array inside jit fails or runs slow
host compute; docs/METHOD.md, section 4). BENCHMARKS.md has the measured load, gather
and disk latencies; ARCHITECTURE.md the sharded-store design for tables beyond one host.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import os
import threading
import time
from typing import Any, Literal

import numba
import numpy as np
import tensorstore as ts
import tqdm

from scone_jax import artifacts, paths
from scone_jax.export.format import (STORE_DTYPES, STORE_KIND, crc32c, row_width,
                                     shard_file, zarr3_spec)

Tier = Literal['ram', 'disk']
DiskReader = Literal['auto', 'memmap', 'tensorstore']
ShardChecks = Literal['first_touch', 'open', 'off']
_PAGE = mmap.PAGESIZE
_U64 = np.dtype(np.uint64)
_perf_counter = time.perf_counter
_NDARRAY = np.ndarray
_I64 = np.dtype(np.int64)
_empty = np.empty


class GatherStats:
  """Running totals of `gather` calls: rows, hits (rows that were not -1), bytes returned
  and seconds spent. The counts live in an int64 array that the RAM tier's gather kernel
  updates in place: five Python attribute updates cost as much as gathering 16 rows. For
  the same reason a RAM-tier `gather` is not timed (two clock reads cost ~0.15 us of its
  ~1.4 us); `seconds` sums the disk tier's gathers and the decode loops' lookups."""

  __slots__ = ('counts', 'seconds')

  def __init__(self):
    self.counts = np.zeros(4, np.int64)  # calls, rows, hits, bytes.
    self.seconds = 0.0

  calls = property(lambda self: int(self.counts[0]))
  rows = property(lambda self: int(self.counts[1]))
  hits = property(lambda self: int(self.counts[2]))
  bytes = property(lambda self: int(self.counts[3]))

  def add(self, rows: int, hits: int, nbytes: int, seconds: float) -> None:
    self.counts += (1, rows, hits, nbytes)
    self.seconds += seconds

  @property
  def ms_per_call(self) -> float:
    return 1e3 * self.seconds / max(self.calls, 1)

  @property
  def ms_per_row(self) -> float:
    return 1e3 * self.seconds / max(self.rows, 1)

  def __repr__(self) -> str:
    return (f'GatherStats(calls={self.calls}, rows={self.rows}, hits={self.hits}, '
            f'bytes={self.bytes}, seconds={self.seconds:.6f})')


@dataclasses.dataclass(frozen=True)
class _Shard:
  """Shard i of the store: rows [start, start + rows) at the start of `file`."""
  index: int
  file: str
  start: int
  rows: int


class EmbeddingStore:
  """Read-only access to an exported f-gram embedding store.

  Use `EmbeddingStore.open(path, tier, expect)`; `gather(rows_N)` returns [N, W] rows in
  the store's dtype with zeros where a row is -1 (W = `row_width`: d, or d + 4 for a
  quantised store, whose rows end in their scale).
  """

  def __init__(self, path: str, tier: Tier, manifest: dict[str, Any],
               table: np.ndarray | None, array: ts.TensorStore | None,
               shards: list[tuple[np.ndarray, mmap.mmap]] | None,
               shard_checks: ShardChecks = 'off'):
    self.path = path
    self.tier = tier
    self.reader = 'numpy' if table is not None else ('memmap' if shards else 'tensorstore')
    self.manifest = manifest
    self.num_rows = int(manifest['num_rows'])
    self.d_model = int(manifest['d_model'])
    self.dtype = STORE_DTYPES[manifest['dtype']]
    self.quant = manifest.get('quant', 'none')
    self.row_width = row_width(manifest)
    self._stats = GatherStats()
    self._table = table
    self._raw_rows = (None if table is None
                      else table.view(np.dtype(f'u{self.dtype.itemsize}')))
    # Whole rows as uint64 words where they divide evenly: the gather copies 8 bytes a
    # step (2-4x np.take's speed on large batches) into a new [N, d] array.
    row_bytes = self.row_width * self.dtype.itemsize
    self._words = (table.view(np.uint64) if table is not None and row_bytes % 8 == 0
                   else None)
    self._word_width = row_bytes // 8
    self._counts = self._stats.counts  # What the RAM tier's kernel updates.
    self._gather_i64 = (None if self._words is None else _compiled(
        counted_gather_kernel, self._words, np.zeros(0, np.int64), self.num_rows,
        np.empty((0, self._word_width), _U64), np.zeros(4, np.int64)))
    self._array = array
    self._shards = [rows for rows, _ in shards] if shards else None
    self._maps = [mapped for _, mapped in shards] if shards else None
    self._chunk_rows = int(manifest['chunk_rows'])
    num_shards = -(-self.num_rows // self._chunk_rows)
    self._checked = np.full(num_shards, tier == 'ram' or shard_checks == 'off')
    self._check_lock = threading.Lock()

  @property
  def stats(self) -> GatherStats:
    """Totals of this store's gathers (and of the decode loops' lookups into it)."""
    return self._stats

  @property
  def raw_rows(self) -> np.ndarray | None:
    """Tier 'ram': the [S + 1, W] matrix (row S all zeros, for id -1) viewed as unsigned
    ints of the dtype's width, the form `gather_kernel` copies (numba has no bfloat16);
    None for tier 'disk'."""
    return self._raw_rows

  @property
  def nbytes(self) -> int:
    """Bytes of the [S, W] matrix (what the tier holds in RAM or on disk; a quantised
    store's scales included)."""
    return self.num_rows * self.row_width * self.dtype.itemsize

  @classmethod
  def open(cls, path: str, tier: Tier = 'ram', expect: dict[str, Any] | None = None,
           verify: bool = False, disk_reader: DiskReader = 'auto',
           cache_bytes: int = 256 << 20, progress: bool = False,
           shard_checks: ShardChecks = 'first_touch',
           load_workers: int | None = None) -> 'EmbeddingStore':
    """Opens the store at `path` after checking its manifest.

    Args:
      path: the store directory written by `python -m scone_jax.export` (W/export).
      tier: 'ram' (load into host memory) or 'disk' (read rows from the shard files).
      expect: manifest fields that must match, e.g. {'checkpoint_step': 200,
        'table_fingerprint': table.fingerprint, 'tokenizer_fingerprint': tok.fingerprint,
        'dtype': 'bfloat16'}.
      verify: also recompute every file's sha256 (a full extra read of the store).
      disk_reader: for tier 'disk': 'memmap', 'tensorstore', or 'auto' (memmap when the
        shard layout allows it).
      cache_bytes: tensorstore cache_pool size for the 'disk' tier's tensorstore reader.
      progress: show a progress bar while loading the 'ram' tier.
      shard_checks: per-shard crc32c checks. The 'ram' tier always checks while loading
        unless 'off'; the 'disk' tier checks a shard when a gather first touches it
        ('first_touch'), every shard now ('open'), or never ('off').
      load_workers: threads reading shards for the 'ram' tier (default: CPU count, <= 8).

    Raises:
      ArtifactError: missing, truncated, corrupted store, or one built from other inputs
        (a corrupted shard of the 'disk' tier raises when first read).
    """
    if tier not in ('ram', 'disk'):
      raise ValueError(f"store tier {tier!r} must be 'ram' or 'disk'")
    if shard_checks not in ('first_touch', 'open', 'off'):
      raise ValueError(f"shard_checks {shard_checks!r} must be 'first_touch', 'open' or "
                       "'off'")
    if not paths.isdir(path):
      raise artifacts.ArtifactError(
          f'no embedding store at {path}; run `python -m scone_jax.export --workdir=W` '
          'first')
    manifest = artifacts.read_manifest(path, STORE_KIND, verify=verify, expect=expect)
    _check_metadata(path, manifest)
    # Raw shard files are memory-mapped or read directly only on local disk.
    layout = None if paths.is_remote(path) else _raw_layout(path, manifest)
    if tier == 'ram':
      workers = load_workers or min(8, os.cpu_count() or 1)
      table = (_load_ram(path, manifest, layout, shard_checks != 'off', progress, workers)
               if layout is not None else
               _load_ram_tensorstore(path, manifest, shard_checks != 'off', progress))
      return cls(path, tier, manifest, table, None, None)
    if disk_reader not in ('auto', 'memmap', 'tensorstore'):
      raise ValueError(f"disk_reader {disk_reader!r} must be 'auto', 'memmap' or "
                       "'tensorstore'")
    if disk_reader == 'memmap' and paths.is_remote(path):
      raise artifacts.ArtifactError(
          f"embedding store {path} is in an object store; disk_reader='memmap' needs a "
          "local copy: use disk_reader='tensorstore' (or 'auto') or copy the store")
    if disk_reader != 'tensorstore' and layout is not None:
      store = cls(path, tier, manifest, None, None, _map_shards(layout, manifest),
                  shard_checks)
    elif disk_reader == 'memmap':
      raise artifacts.ArtifactError(
          f'embedding store {path} has no raw contiguous shard layout (compressed or '
          "sparse shards); open it with disk_reader='tensorstore'")
    else:
      context = ts.Context({'cache_pool': {'total_bytes_limit': int(cache_bytes)},
                            'file_io_concurrency': {'limit': 32}})
      array = ts.open(zarr3_spec(path), read=True, context=context).result()
      store = cls(path, tier, manifest, None, array, None, shard_checks)
    if shard_checks == 'open':
      store._check_shards(range(store._checked.size))
    return store

  def gather(self, rows_N: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of the matrix for ids `rows_N` (int, -1 = no f-gram -> a zero row).

    `out`, optional: an [N, W] array of the store's dtype (a strided view is fine, e.g.
    the first d columns of a decode slab) to write into instead of a new array.
    """
    # Lean on purpose: at decode sizes (16 rows, ~1 us) every Python step here costs as
    # much as the copy itself (BENCHMARKS.md compares this call with np.take).
    if rows_N.__class__ is not _NDARRAY:
      rows_N = np.asarray(rows_N)
    if rows_N.ndim != 1 or rows_N.dtype.kind not in 'iu':
      raise ValueError(f'gather expects a 1-D integer array of row ids, got '
                       f'{rows_N.dtype}{list(rows_N.shape)}')
    words = self._words
    if out is None and words is not None:
      # The RAM tier: whole rows as uint64 words, counted by the kernel, not timed (two
      # clock reads would cost a fifth of the call; GatherStats.seconds).
      out = _empty((rows_N.size, self._word_width), _U64)
      if rows_N.dtype is _I64 and rows_N.flags.c_contiguous and self._gather_i64:
        hits = self._gather_i64(words, rows_N, self.num_rows, out, self._counts)
      else:
        hits = counted_gather_kernel(words, rows_N, self.num_rows, out, self._counts)
      if hits < 0:
        self._invalid(rows_N, hits)
      return out.view(self.dtype)
    start = _perf_counter()
    if out is not None and (out.shape != (rows_N.size, self.row_width) or
                            out.dtype != self.dtype):
      raise ValueError(f'gather out= must be {self.dtype}[{rows_N.size}, '
                       f'{self.row_width}], got {out.dtype}{list(out.shape)}')
    if out is None:
      out = np.empty((rows_N.size, self.row_width), self.dtype)
    if self._raw_rows is not None:
      hits = gather_kernel(self._raw_rows, rows_N, self.num_rows,
                           out.view(self._raw_rows.dtype))
    else:
      hits = self._gather_disk(rows_N, out)
    if hits < 0:
      self._invalid(rows_N, hits)
    self.stats.add(rows_N.size, hits, out.nbytes, _perf_counter() - start)
    return out

  def _invalid(self, rows_N: np.ndarray, error: int):
    raise IndexError(f'row ids must be in [-1, {self.num_rows}); got {rows_N[-1 - error]} '
                     f'at index {-1 - error}: the matcher and the store come from different '
                     'f-gram tables')

  def prefetch(self, rows_N: np.ndarray) -> None:
    """Disk tier: asks the kernel to start reading these rows' pages (no wait); a later
    gather of them then finds them cached. A no-op for the ram tier."""
    if self._shards is None:
      return
    rows_N = np.asarray(rows_N)
    rows_N = rows_N[(rows_N >= 0) & (rows_N < self.num_rows)]
    row_bytes = self.row_width * self.dtype.itemsize
    shard_N, offset_N = np.divmod(rows_N, self._chunk_rows)
    for shard, offset in zip(shard_N.tolist(), offset_N.tolist()):
      lo = offset * row_bytes // _PAGE * _PAGE
      hi = (offset + 1) * row_bytes
      self._maps[shard].madvise(mmap.MADV_WILLNEED, lo, hi - lo)

  def _gather_disk(self, rows_N: np.ndarray, out_NxD: np.ndarray) -> int:
    """`gather` for the disk tier; returns the number of hits, or -1 - (a bad index)."""
    bad = np.flatnonzero((rows_N >= self.num_rows) | (rows_N < -1))
    if bad.size:
      return -1 - int(bad[0])
    hit_N = rows_N >= 0
    out_NxD[~hit_N] = 0
    if hit_N.any():
      out_NxD[hit_N] = self._read_disk(rows_N[hit_N])
    return int(hit_N.sum())

  def _read_disk(self, rows_H: np.ndarray) -> np.ndarray:
    """[H, d] rows for valid ids `rows_H` from the disk tier."""
    shard_H, offset_H = np.divmod(rows_H, self._chunk_rows)
    touched = np.unique(shard_H)
    if not self._checked[touched].all():
      self._check_shards(touched[~self._checked[touched]])
    if self._shards is None:
      # One read per distinct row: batches repeat frequent f-grams.
      uniq_U, inverse_H = np.unique(rows_H, return_inverse=True)
      return self._array[uniq_U].read().result()[inverse_H]
    if rows_H.size > 1:
      self.prefetch(rows_H)  # The batch's cold pages are read in parallel.
    if touched.size == 1:
      return np.take(self._shards[int(touched[0])], offset_H, axis=0)
    out_HxD = np.empty((rows_H.size, self.row_width), self.dtype)
    for shard in touched:
      sel_H = shard_H == shard
      out_HxD[sel_H] = np.take(self._shards[int(shard)], offset_H[sel_H], axis=0)
    return out_HxD

  def _check_shards(self, shards) -> None:
    """Checks the checksums of the given shards (disk tier) once; ArtifactError if bad."""
    with self._check_lock:
      for i in shards:
        i = int(i)
        if self._checked[i]:
          continue
        start = i * self._chunk_rows
        stop = min(start + self._chunk_rows, self.num_rows)
        rows = (self._shards[i] if self._shards is not None
                else self._array[start:stop].read().result())
        _check_shard(self.path, self.manifest, i, rows)
        self._checked[i] = True


def open_shards(path: str, indices, tier: Tier = 'ram', expect: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], list[np.ndarray]]:
  """The manifest and the shards `indices` of the store at `path` alone, each a
  [rows, W] array (tier 'ram': read into memory; 'disk': memory-mapped), every one
  checked against its recorded crc32c: what one process of a row-sharded store holds
  (serve/sharded_store.py).

  Raises:
    ArtifactError: as `EmbeddingStore.open`, or a store without the raw shard layout
      (compressed, or in an object store) that a shard-at-a-time reader needs.
  """
  if tier not in ('ram', 'disk'):
    raise ValueError(f"store tier {tier!r} must be 'ram' or 'disk'")
  if not paths.isdir(path):
    raise artifacts.ArtifactError(
        f'no embedding store at {path}; run `python -m scone_jax.export --workdir=W` '
        'first')
  manifest = artifacts.read_manifest(path, STORE_KIND, expect=expect)
  _check_metadata(path, manifest)
  layout = None if paths.is_remote(path) else _raw_layout(path, manifest)
  if layout is None:
    raise artifacts.ArtifactError(
        f'embedding store {path} is remote or has no raw contiguous shard layout; a '
        'row-sharded store reads whole local shards: copy the store to local disk')
  chosen = [layout[int(i)] for i in indices]
  shards = []
  for shard, (rows, _) in zip(chosen, _map_shards(chosen, manifest)):
    _check_shard(path, manifest, shard.index, rows)
    # 'ram': a copy; the mapping goes with the last view of it.
    shards.append(rows.copy() if tier == 'ram' else rows)
  return manifest, shards


def _check_shard(path: str, manifest: dict[str, Any], i: int, rows: np.ndarray) -> None:
  """Raises ArtifactError unless shard i's rows have the checksum the export recorded."""
  crcs = manifest.get('shard_crc32c')
  if crcs is not None:
    ok = crc32c(rows) == crcs[i]
  else:  # A store exported before crc32c: its sha256 (slower).
    ok = hashlib.sha256(np.ascontiguousarray(rows).view(np.uint8).data).hexdigest() == \
        manifest['shard_sha256'][i]
  if not ok:
    start = i * manifest['chunk_rows']
    stop = min(start + manifest['chunk_rows'], manifest['num_rows'])
    raise artifacts.ArtifactError(
        f'embedding store {path}: shard {shard_file(i)} (rows {start}..{stop - 1}) fails '
        'its checksum: the file is corrupted; re-run `python -m scone_jax.export`')


def _raw_layout(path: str, manifest: dict[str, Any]) -> list[_Shard] | None:
  """The shards, if each holds its rows as a plain C-order array at the file start; None
  if a shard is compressed or sparse (then only tensorstore can read it).

  A sharding_indexed shard ends with its index: (offset, nbytes) uint64 pairs per inner
  chunk, then a crc32c. The rows are a plain array at the start of the file exactly when
  inner chunk k sits at offset k * inner_bytes with inner_bytes bytes.
  """
  with open(os.path.join(path, 'zarr.json')) as f:
    codecs = json.load(f)['codecs']
  if len(codecs) != 1 or codecs[0]['name'] != 'sharding_indexed':
    return None
  conf = codecs[0]['configuration']
  inner = conf['codecs']
  if ([c['name'] for c in inner] != ['bytes'] or
      inner[0].get('configuration', {}).get('endian', 'little') != 'little' or
      conf.get('index_location', 'end') != 'end' or
      [c['name'] for c in conf['index_codecs']] != ['bytes', 'crc32c']):
    return None
  num_rows, width, chunk_rows = (manifest['num_rows'], row_width(manifest),
                                 manifest['chunk_rows'])
  inner_rows = conf['chunk_shape'][0]
  inner_bytes = inner_rows * width * STORE_DTYPES[manifest['dtype']].itemsize
  shards = []
  for i, start in enumerate(range(0, num_rows, chunk_rows)):
    rows = min(chunk_rows, num_rows - start)
    n_inner = chunk_rows // inner_rows
    fpath = os.path.join(path, shard_file(i))
    with open(fpath, 'rb') as f:
      f.seek(-(16 * n_inner + 4), os.SEEK_END)
      raw = f.read(16 * n_inner + 4)
    # The index's own crc32c (zarr's crc32c codec: 4 little-endian bytes after it): a
    # corrupted index is named here, not left to tensorstore's DATA_LOSS further down.
    if crc32c(np.frombuffer(raw[:-4], np.uint8)) != int.from_bytes(raw[-4:], 'little'):
      raise artifacts.ArtifactError(
          f'embedding store {path}: shard {shard_file(i)} (rows {start}..'
          f'{start + rows - 1}) has a corrupted shard index (its crc32c fails); '
          're-run `python -m scone_jax.export`')
    index = np.frombuffer(raw[:-4], '<u8').reshape(n_inner, 2)
    # Inner chunks wholly past the end of the array are absent from a partial shard.
    used = -(-rows // inner_rows)
    if not ((index[:used, 0] == np.arange(used) * inner_bytes).all() and
            (index[:used, 1] == inner_bytes).all()):
      return None
    shards.append(_Shard(i, fpath, start, rows))
  return shards


def _map_shards(layout: list[_Shard], manifest: dict[str, Any]
                ) -> list[tuple[np.ndarray, mmap.mmap]]:
  """Per shard: a read-only [rows, W] view of its mapped rows, and the mapping."""
  dtype, width = STORE_DTYPES[manifest['dtype']], row_width(manifest)
  shards = []
  for shard in layout:
    with open(shard.file, 'rb') as f:
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)  # A row is 128 B-8 KB: no readahead of neighbours.
    rows = np.frombuffer(mapped, dtype, count=shard.rows * width)
    shards.append((rows.reshape(shard.rows, width), mapped))
  return shards


def _check_metadata(path: str, manifest: dict[str, Any]) -> None:
  """The zarr3 metadata must agree with the manifest (shape and dtype)."""
  try:
    meta = json.loads(paths.read_text(paths.join(path, 'zarr.json')))
  except (OSError, json.JSONDecodeError) as e:
    raise artifacts.ArtifactError(f'{path}/zarr.json is missing or corrupted ({e}); '
                                  're-run `python -m scone_jax.export`') from e
  want_shape = [manifest['num_rows'], row_width(manifest)]
  if meta.get('shape') != want_shape or meta.get('data_type') != manifest['dtype']:
    raise artifacts.ArtifactError(
        f'embedding store {path}: zarr.json says shape {meta.get("shape")} dtype '
        f'{meta.get("data_type")!r}, the manifest says {want_shape} {manifest["dtype"]!r}; '
        'the store was modified after export: re-run `python -m scone_jax.export`')
  if manifest['dtype'] not in STORE_DTYPES:
    raise artifacts.ArtifactError(f'embedding store {path} has unsupported dtype '
                                  f'{manifest["dtype"]!r}; expected one of '
                                  f'{sorted(STORE_DTYPES)}')


def host_buffer(nbytes: int) -> memoryview:
  """Zeroed anonymous memory for a large table, advised onto transparent huge pages: a
  2 MiB page faults once where 512 small ones would (the faults, not the copy, bound a
  load into fresh memory). Freed when the last array over it goes."""
  buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  if hasattr(mmap, 'MADV_HUGEPAGE'):
    buf.madvise(mmap.MADV_HUGEPAGE)
  return buf


def _load_ram(path: str, manifest: dict[str, Any], layout: list[_Shard], check: bool,
              progress: bool, workers: int) -> np.ndarray:
  """Reads every shard's rows straight into one [S + 1, d] array (last row zero), on
  `workers` threads, checking each shard's crc32c as it lands."""
  num_rows, width = manifest['num_rows'], row_width(manifest)
  dtype = STORE_DTYPES[manifest['dtype']]
  row_bytes = width * dtype.itemsize
  buf = host_buffer((num_rows + 1) * row_bytes)
  table_SxD = np.frombuffer(buf, dtype, count=(num_rows + 1) * width).reshape(
      num_rows + 1, width)
  view = memoryview(buf)

  def load(shard: _Shard) -> int:
    lo, hi = shard.start * row_bytes, (shard.start + shard.rows) * row_bytes
    with open(shard.file, 'rb', buffering=0) as f:
      while lo < hi:
        got = f.readinto(view[lo:hi])
        if not got:
          raise artifacts.ArtifactError(
              f'embedding store {path}: shard {shard_file(shard.index)} ends early: '
              'truncated; re-run `python -m scone_jax.export`')
        lo += got
    if check:
      _check_shard(path, manifest, shard.index,
                   table_SxD[shard.start:shard.start + shard.rows])
    return shard.rows

  bar = tqdm.tqdm(total=num_rows, desc='load store', unit='row', disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for rows in pool.map(load, layout):
      bar.update(rows)
  bar.close()
  view.release()
  table_SxD.flags.writeable = False
  return table_SxD


def _load_ram_tensorstore(path: str, manifest: dict[str, Any], check: bool,
                          progress: bool) -> np.ndarray:
  """_load_ram for a layout only tensorstore reads (compressed or sparse shards)."""
  num_rows, width, chunk_rows = (manifest['num_rows'], row_width(manifest),
                                   manifest['chunk_rows'])
  array = ts.open(zarr3_spec(path), read=True).result()
  table_SxD = np.zeros((num_rows + 1, width), STORE_DTYPES[manifest['dtype']])
  for i, start in enumerate(tqdm.trange(0, num_rows, chunk_rows, desc='load store',
                                        unit='shard', disable=not progress)):
    stop = min(start + chunk_rows, num_rows)
    table_SxD[start:stop] = array[start:stop].read().result()
    if check:
      _check_shard(path, manifest, i, table_SxD[start:stop])
  table_SxD.flags.writeable = False
  return table_SxD


@numba.njit(nogil=True, cache=True)
def gather_kernel(table_RxW, rows_N, num_rows, out_NxW):
  """out[i] = table[rows[i]] (row num_rows, all zeros, for -1) on raw bits (any unsigned
  view of whole rows); returns the number of hits, or -1 - i for the first invalid id
  (nothing after it is written)."""
  hits = 0
  width = table_RxW.shape[1]
  for i in range(rows_N.size):
    r = rows_N[i]
    if r < -1 or r >= num_rows:
      return -1 - i
    if r < 0:
      r = num_rows
    else:
      hits += 1
    for j in range(width):
      out_NxW[i, j] = table_RxW[r, j]
  return hits


def _compiled(kernel, *args):
  """The compiled function behind numba dispatcher `kernel` for exactly these argument
  types, or None where numba does not expose it. Calling it skips the dispatcher's type
  resolution (~0.2 us, a sixth of a 16-row gather); callers must pass arguments of the
  same types (dtype, dimensions, C order)."""
  try:
    kernel(*args)  # Compiles, or loads from numba's cache, this signature.
    return kernel.overloads[tuple(numba.typeof(a) for a in args)].entry_point
  except (AttributeError, KeyError, TypeError):
    return None


@numba.njit(nogil=True, cache=True)
def counted_gather_kernel(table_RxW, rows_N, num_rows, out_NxW, counts_4):
  """gather_kernel, then adds (1 call, N rows, hits, bytes) to counts_4 (GatherStats)
  when every id was valid."""
  hits = gather_kernel(table_RxW, rows_N, num_rows, out_NxW)
  if hits >= 0:
    counts_4[0] += 1
    counts_4[1] += rows_N.size
    counts_4[2] += hits
    counts_4[3] += out_NxW.size * out_NxW.itemsize
  return hits
