"""The f-gram store's on-disk format: what the writer (export/writer.py) and the readers
(serve/store.py, serve/session.py) share, in one module that imports neither: the layout,
the dtypes, checksums, and the manifest fields a store depends on (`store_meta`,
`hashed_meta`). With export/quant.py (the quantised row codec) it is all that serve/
imports from export/.

Layout of a finished store directory (a plain zarr3 array at the root, so any zarr3
reader opens it without this project):

  <out>/zarr.json        zarr3 array metadata: shape [S, d], sharding_indexed codec
                         (a quantised store, export.quant 'int8' | 'fp8': [S, d + 4] of
                         int8 | float8_e4m3fn, each row's float32 scale in its last 4
                         bytes; export/quant.py)
  <out>/c/<i>/0          shard i: rows [i * chunk_rows, (i + 1) * chunk_rows)
  <out>/manifest.json    written last: kind, S, d, dtype (stored), quant, row_width (the
                         stored columns: d, or d + 4 quantised), per-shard crc32c and sha256 of
                         the row bytes, per-file sizes and sha256, plus the caller's
                         metadata

The per-shard crc32c (Castagnoli, ~10 GB/s with the google-crc32c C extension, 6x sha256)
is what a reader checks while it loads (ram tier) or when it first touches a shard (disk
tier): verification costs little next to reading the bytes.

Shards are uncompressed (bytes codec): rows of a trained embedding matrix do not
compress, and raw inner chunks keep disk-tier row reads cheap.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import ml_dtypes
import numpy as np

from scone_jax import paths
from scone_jax.config import Config
from scone_jax.export import quant as quant_lib

EXPORT_DIR = 'export'  # The store's directory in a run directory W.
STORE_KIND = 'fgram_embedding_store'
# export.dtype choices (unquantised rows).
DTYPES = {'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float16': np.dtype(np.float16),
          'float32': np.dtype(np.float32)}
# Every dtype a store may hold: the export dtypes and the quantised ones.
STORE_DTYPES = {**DTYPES, **quant_lib.NP_DTYPES}


def row_width(manifest: dict[str, Any]) -> int:
  """Stored columns per row (d, or d + 4 for a quantised store; stores written before
  quantisation have no row_width and hold d)."""
  return int(manifest.get('row_width', manifest['d_model']))


def zarr3_spec(path: str, num_rows: int | None = None, d_model: int | None = None,
               dtype: str | None = None, chunk_rows: int | None = None,
               inner_rows: int | None = None) -> dict[str, Any]:
  """The tensorstore spec of the store at `path`; with shapes given, the create spec."""
  spec: dict[str, Any] = {'driver': 'zarr3',
                          'kvstore': paths.kvstore(path)}
  if num_rows is None:
    return spec
  raw = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  spec['metadata'] = {
      'shape': [num_rows, d_model],
      'data_type': dtype,
      'chunk_grid': {'name': 'regular',
                     'configuration': {'chunk_shape': [chunk_rows, d_model]}},
      'codecs': [{'name': 'sharding_indexed', 'configuration': {
          'chunk_shape': [inner_rows, d_model],
          'codecs': raw,
          'index_codecs': raw + [{'name': 'crc32c'}],
          'index_location': 'end'}}],
  }
  return spec


def crc32c(data: np.ndarray) -> int:
  """crc32c of a C-contiguous array's bytes (without copying them)."""
  view = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  if view.flags.writeable:
    view = view.view()
    view.flags.writeable = False  # The C extension takes read-only buffers only.
  return google_crc32c.value(view) if view.size else 0


def shard_file(i: int) -> str:
  """Relative path of shard i (default zarr3 chunk key encoding, '/' separator)."""
  return f'c/{i}/0'


def store_meta(step: int, table_fingerprint: str, tokenizer_fingerprint: str,
               weights_fingerprint: str) -> dict[str, Any]:
  """What the store depends on: the manifest fields `EmbeddingStore.open(..., expect=...)`
  checks so a store is never served with another checkpoint, table, tokenizer or run's
  weights (`run.weights_fingerprint`)."""
  return {'checkpoint_step': int(step), 'table_fingerprint': table_fingerprint,
          'tokenizer_fingerprint': tokenizer_fingerprint,
          'weights_fingerprint': weights_fingerprint}


def hashed_meta(cfg: Config) -> dict[str, Any]:
  """The manifest fields that say how a hashed store's rows are addressed."""
  fm = cfg.fgram_model
  return {'hash_max_n': fm.hash_max_n, 'hash_buckets': fm.hash_buckets}
