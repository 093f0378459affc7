"""EmbeddingStore: the exported [S, d] f-gram embeddings in host memory or on disk.

Two tiers (docs/METHOD.md, section 4, has the measured costs behind the choice):
  'ram'   the matrix is read once into host numpy with one extra zero row at index S,
          so a gather is a single `np.take` and rows -1 (no match) come back as zeros.
  'disk'  the matrix stays in the zarr3 store. Reader 'memmap' (the default when the
          layout allows) memory-maps each shard's raw rows: the export writes shards
          uncompressed with every inner chunk present and in order, which this module
          checks from the shard index before trusting it; the OS page cache then serves
          hot f-grams. Reader 'tensorstore' reads rows through tensorstore with a bounded
          cache_pool (any valid zarr3 layout). On a 1M x 256 bf16 store the memmap
          reader is ~20x faster per call (benchmarks/bench_decode.py prints both).

The accelerator never sees the store: the decoder gathers on the host and transfers a
small [B, d] slab per step (indexing a pinned_host array inside jit fails or runs slow
host compute; docs/METHOD.md, section 4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Literal

import numba
import numpy as np
import tensorstore as ts
import tqdm

from scone_jax import artifacts
from scone_jax.export.writer import DTYPES, STORE_KIND, shard_file, zarr3_spec

Tier = Literal['ram', 'disk']
DiskReader = Literal['auto', 'memmap', 'tensorstore']


@dataclasses.dataclass
class GatherStats:
  """Running totals of `gather` calls: latency and bytes returned."""
  calls: int = 0
  rows: int = 0
  hits: int = 0  # rows that were not -1
  bytes: int = 0
  seconds: float = 0.0

  def add(self, rows: int, hits: int, nbytes: int, seconds: float) -> None:
    self.calls += 1
    self.rows += rows
    self.hits += hits
    self.bytes += nbytes
    self.seconds += seconds

  @property
  def ms_per_call(self) -> float:
    return 1e3 * self.seconds / max(self.calls, 1)

  @property
  def ms_per_row(self) -> float:
    return 1e3 * self.seconds / max(self.rows, 1)


class EmbeddingStore:
  """Read-only access to an exported f-gram embedding store.

  Use `EmbeddingStore.open(path, tier, expect)`; `gather(rows_N)` returns [N, d] rows in
  the store's dtype with zeros where a row is -1.
  """

  def __init__(self, path: str, tier: Tier, manifest: dict[str, Any],
               table: np.ndarray | None, array: ts.TensorStore | None,
               shards: list[np.ndarray] | None):
    self.path = path
    self.tier = tier
    self.reader = 'numpy' if table is not None else ('memmap' if shards else 'tensorstore')
    self.manifest = manifest
    self.num_rows = int(manifest['num_rows'])
    self.d_model = int(manifest['d_model'])
    self.dtype = DTYPES[manifest['dtype']]
    self.stats = GatherStats()
    self._table = table
    self._raw_rows = (None if table is None
                      else table.view(np.dtype(f'u{self.dtype.itemsize}')))
    self._array = array
    self._shards = shards
    self._chunk_rows = int(manifest['chunk_rows'])

  @property
  def raw_rows(self) -> np.ndarray | None:
    """Tier 'ram': the [S + 1, d] matrix (row S all zeros, for id -1) viewed as unsigned
    ints of the dtype's width, the form `gather_kernel` copies (numba has no bfloat16);
    None for tier 'disk'."""
    return self._raw_rows

  @property
  def nbytes(self) -> int:
    """Bytes of the [S, d] matrix (what the tier holds in RAM or on disk)."""
    return self.num_rows * self.d_model * self.dtype.itemsize

  @classmethod
  def open(cls, path: str, tier: Tier = 'ram', expect: dict[str, Any] | None = None,
           verify: bool = False, disk_reader: DiskReader = 'auto',
           cache_bytes: int = 256 << 20, progress: bool = False) -> 'EmbeddingStore':
    """Opens the store at `path` after checking its manifest.

    Args:
      path: the store directory written by `python -m scone_jax.export` (W/export).
      tier: 'ram' (load into host memory) or 'disk' (read rows through tensorstore).
      expect: manifest fields that must match, e.g. {'checkpoint_step': 200,
        'table_fingerprint': table.fingerprint, 'tokenizer_fingerprint': tok.fingerprint,
        'dtype': 'bfloat16'}.
      verify: also recompute file checksums (and, for 'ram', the rows' checksums).
      disk_reader: for tier 'disk': 'memmap', 'tensorstore', or 'auto' (memmap when the
        shard layout allows it).
      cache_bytes: tensorstore cache_pool size for the 'disk' tier.
      progress: show a progress bar while loading the 'ram' tier.

    Raises:
      ArtifactError: missing, truncated, corrupted store, or one built from other inputs.
    """
    if tier not in ('ram', 'disk'):
      raise ValueError(f"store tier {tier!r} must be 'ram' or 'disk'")
    if not os.path.isdir(path):
      raise artifacts.ArtifactError(
          f'no embedding store at {path}; run `python -m scone_jax.export --workdir=W` '
          'first')
    manifest = artifacts.read_manifest(path, STORE_KIND, verify=verify, expect=expect)
    _check_metadata(path, manifest)
    if tier == 'ram':
      table = _load_ram(path, manifest, verify, progress)
      return cls(path, tier, manifest, table, None, None)
    if disk_reader not in ('auto', 'memmap', 'tensorstore'):
      raise ValueError(f"disk_reader {disk_reader!r} must be 'auto', 'memmap' or "
                       "'tensorstore'")
    if disk_reader != 'tensorstore':
      shards = _map_shards(path, manifest)
      if shards is not None:
        return cls(path, tier, manifest, None, None, shards)
      if disk_reader == 'memmap':
        raise artifacts.ArtifactError(
            f'embedding store {path} has no raw contiguous shard layout (compressed or '
            "sparse shards); open it with disk_reader='tensorstore'")
    context = ts.Context({'cache_pool': {'total_bytes_limit': int(cache_bytes)},
                          'file_io_concurrency': {'limit': 32}})
    array = ts.open(zarr3_spec(path), read=True, context=context).result()
    return cls(path, tier, manifest, None, array, None)

  def gather(self, rows_N: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of the matrix for ids `rows_N` (int, -1 = no f-gram -> a zero row).

    `out`, optional: an [N, d] array of the store's dtype (a strided view is fine, e.g.
    the first d columns of a decode slab) to write into instead of a new array.
    """
    start = time.perf_counter()
    rows_N = np.asarray(rows_N)
    if rows_N.ndim != 1 or rows_N.dtype.kind not in 'iu':
      raise ValueError(f'gather expects a 1-D integer array of row ids, got '
                       f'{rows_N.dtype}{list(rows_N.shape)}')
    if out is None:
      out = np.empty((rows_N.size, self.d_model), self.dtype)
    elif out.shape != (rows_N.size, self.d_model) or out.dtype != self.dtype:
      raise ValueError(f'gather out= must be {self.dtype}[{rows_N.size}, {self.d_model}], '
                       f'got {out.dtype}{list(out.shape)}')
    if self._raw_rows is not None:
      hits = gather_kernel(self._raw_rows, rows_N, self.num_rows,
                           out.view(self._raw_rows.dtype))
    else:
      hits = self._gather_disk(rows_N, out)
    if hits < 0:
      raise IndexError(f'row ids must be in [-1, {self.num_rows}); got {rows_N[-1 - hits]} '
                       f'at index {-1 - hits}: the matcher and the store come from different '
                       'f-gram tables')
    self.stats.add(rows_N.size, hits, out.nbytes, time.perf_counter() - start)
    return out

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
    if self._shards is None:
      # One read per distinct row: batches repeat frequent f-grams.
      uniq_U, inverse_H = np.unique(rows_H, return_inverse=True)
      return self._array[uniq_U].read().result()[inverse_H]
    shard_H, offset_H = np.divmod(rows_H, self._chunk_rows)
    if rows_H.size == 1 or (shard_H == shard_H[0]).all():
      return np.take(self._shards[int(shard_H[0])], offset_H, axis=0)
    out_HxD = np.empty((rows_H.size, self.d_model), self.dtype)
    for shard in np.unique(shard_H):
      sel_H = shard_H == shard
      out_HxD[sel_H] = np.take(self._shards[int(shard)], offset_H[sel_H], axis=0)
    return out_HxD


def _map_shards(path: str, manifest: dict[str, Any]) -> list[np.ndarray] | None:
  """Read-only memmaps of each shard's rows, or None if a shard is not raw + contiguous.

  A sharding_indexed shard ends with its index: (offset, nbytes) uint64 pairs per inner
  chunk, then a crc32c. The rows are a plain C-order array at the start of the file
  exactly when inner chunk k sits at offset k * inner_bytes with inner_bytes bytes.
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
  num_rows, d_model, chunk_rows = (manifest['num_rows'], manifest['d_model'],
                                   manifest['chunk_rows'])
  inner_rows = conf['chunk_shape'][0]
  dtype = DTYPES[manifest['dtype']]
  inner_bytes = inner_rows * d_model * dtype.itemsize
  shards = []
  for i, start in enumerate(range(0, num_rows, chunk_rows)):
    rows = min(chunk_rows, num_rows - start)
    n_inner = chunk_rows // inner_rows
    fpath = os.path.join(path, shard_file(i))
    with open(fpath, 'rb') as f:
      f.seek(-(16 * n_inner + 4), os.SEEK_END)
      index = np.frombuffer(f.read(16 * n_inner), '<u8').reshape(n_inner, 2)
    # Inner chunks wholly past the end of the array are absent from a partial shard.
    used = -(-rows // inner_rows)
    if not ((index[:used, 0] == np.arange(used) * inner_bytes).all() and
            (index[:used, 1] == inner_bytes).all()):
      return None
    shards.append(np.memmap(fpath, dtype=dtype, mode='r', shape=(rows, d_model)))
  return shards


def _check_metadata(path: str, manifest: dict[str, Any]) -> None:
  """The zarr3 metadata must agree with the manifest (shape and dtype)."""
  try:
    with open(os.path.join(path, 'zarr.json')) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise artifacts.ArtifactError(f'{path}/zarr.json is missing or corrupted ({e}); '
                                  're-run `python -m scone_jax.export`') from e
  want_shape = [manifest['num_rows'], manifest['d_model']]
  if meta.get('shape') != want_shape or meta.get('data_type') != manifest['dtype']:
    raise artifacts.ArtifactError(
        f'embedding store {path}: zarr.json says shape {meta.get("shape")} dtype '
        f'{meta.get("data_type")!r}, the manifest says {want_shape} {manifest["dtype"]!r}; '
        'the store was modified after export: re-run `python -m scone_jax.export`')
  if manifest['dtype'] not in DTYPES:
    raise artifacts.ArtifactError(f'embedding store {path} has unsupported dtype '
                                  f'{manifest["dtype"]!r}; expected one of {sorted(DTYPES)}')


def _load_ram(path: str, manifest: dict[str, Any], verify: bool,
              progress: bool) -> np.ndarray:
  """Reads the store shard by shard into an [S + 1, d] array whose last row is zero."""
  num_rows, d_model, chunk_rows = (manifest['num_rows'], manifest['d_model'],
                                   manifest['chunk_rows'])
  array = ts.open(zarr3_spec(path), read=True).result()
  table_SxD = np.zeros((num_rows + 1, d_model), DTYPES[manifest['dtype']])
  shas = manifest['shard_sha256']
  for i, start in enumerate(tqdm.trange(0, num_rows, chunk_rows, desc='load store',
                                        unit='shard', disable=not progress)):
    stop = min(start + chunk_rows, num_rows)
    table_SxD[start:stop] = array[start:stop].read().result()
    if verify and hashlib.sha256(table_SxD[start:stop].tobytes()).hexdigest() != shas[i]:
      raise artifacts.ArtifactError(
          f'embedding store {path}: rows {start}..{stop - 1} fail their checksum '
          '(corrupted); re-run `python -m scone_jax.export`')
  return table_SxD


@numba.njit(nogil=True, cache=True)
def gather_kernel(table_RxD, rows_N, num_rows, out_NxD):
  """out[i] = table[rows[i]] (row num_rows, all zeros, for -1) on raw bits; returns the
  number of hits, or -1 - i for the first invalid id (nothing after it is written)."""
  hits = 0
  for i in range(rows_N.size):
    r = rows_N[i]
    if r < -1 or r >= num_rows:
      return -1 - i
    if r < 0:
      r = num_rows
    else:
      hits += 1
    out_NxD[i, :] = table_RxD[r, :]
  return hits
