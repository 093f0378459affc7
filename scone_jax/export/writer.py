"""Streaming, resumable writer of an [S, d] row matrix as a sharded zarr3 store.

The layout of a finished store is in export/format.py.

Work happens in `<out>.partial/` with one done-marker per shard in `<out>.partial.done/`
(outside the store so the store stays a clean zarr3 array). A rerun after a kill skips
finished shards; the partial directory is renamed to `<out>` only after every shard and
the manifest are on disk, so a reader never sees a half-written store as complete.
In an object store (gs://, no rename) the shards are written in place under `<out>`
after its old manifest is removed, and the manifest, written last, is the completion
marker `EmbeddingStore.open` requires.

Every shard's rows are checked finite before it is written, and nothing at `<out>` is
touched before the first shard passes: a diverged checkpoint (NaN weights) fails the
export naming the first bad row and leaves the previous store as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable

import numpy as np
import tensorstore as ts
import tqdm

from scone_jax import artifacts, paths
from scone_jax.export import quant as quant_lib
from scone_jax.export.format import DTYPES, STORE_KIND, crc32c, shard_file, zarr3_spec


def _plan_matches(path: str, plan: dict[str, Any]) -> bool:
  try:
    return json.loads(paths.read_text(path)) == plan
  except (OSError, json.JSONDecodeError):
    return False


def _check_finite(rows_RxD: np.ndarray, start: int, row_name: Callable[[int], str],
                  meta: dict[str, Any]) -> None:
  """Raises naming the first row of rows_RxD (store rows from `start`) that holds a NaN or
  an Inf: a store is never written with rows the decoder would serve as garbage."""
  bad_R = ~np.isfinite(np.asarray(rows_RxD, np.float32)).all(axis=1)
  if bad_R.any():
    r = start + int(np.argmax(bad_R))
    step = meta.get('checkpoint_step', 'unknown')
    raise ValueError(
        f'{row_name(r)} is not finite (NaN/Inf) in the weights of checkpoint step {step}; '
        'nothing was published and any previous store is unchanged. Export a checkpoint '
        'whose training did not diverge (see W/metrics.jsonl)')


def _open_partial(resume: bool, out_dir: str, partial: str, done_dir: str, plan_path: str,
                  plan: dict[str, Any], remote: bool, create_spec: dict[str, Any]):
  """The array the shards are written into: the partial write being resumed, or a fresh
  one (discarding a partial write of another plan)."""
  if not resume:
    if remote:  # Unpublish first: the manifest is the completion marker.
      paths.remove(paths.join(out_dir, artifacts.MANIFEST))
    paths.rmtree(partial)
    paths.rmtree(done_dir)
    paths.makedirs(done_dir)
    ts.open(create_spec, create=True, delete_existing=True).result()
    artifacts.write_json_atomic(plan_path, plan)
  # Zero rows are stored too, so every shard holds all its inner chunks in order and the
  # disk tier can memory-map it (serve/store.py checks the shard index before it does).
  return ts.open({**zarr3_spec(partial), 'store_data_equal_to_fill_value': True}).result()


def write_store(out_dir: str, num_rows: int, d_model: int, dtype: str, chunk_rows: int,
                compute_rows: Callable[[int, int], np.ndarray], meta: dict[str, Any],
                inner_rows: int = 64, progress: bool = True,
                quant: quant_lib.Quant = 'none',
                row_name: Callable[[int], str] = lambda r: f'store row {r}') -> str:
  """Writes rows [0, num_rows) produced by `compute_rows` as a zarr3 store at `out_dir`.

  Streams: only one shard (chunk_rows x d) is in host memory at a time. Resumes a
  partial write with the same plan (shape, dtype, chunking and `meta`); a partial
  write from another plan is discarded. An existing complete store at `out_dir` is
  replaced atomically at the end.

  Args:
    out_dir: the final store directory.
    num_rows: S, the number of rows.
    d_model: d, the row width.
    dtype: 'bfloat16' | 'float16' | 'float32' (rows are cast on the host; unused when
      quantised).
    chunk_rows: rows per zarr3 shard (also the resume granularity).
    compute_rows: (start, stop) -> [stop - start, d] array of rows start..stop-1.
    meta: extra manifest fields (e.g. checkpoint step and fingerprints).
    inner_rows: rows per inner chunk of a shard (the unit of a disk-tier read).
    progress: show a progress bar.
    quant: 'none', or 'int8' | 'fp8': rows quantised on the host with a float32 scale
      per row (export/quant.py), stored as [S, d + 4].
    row_name: row -> how an error names it (e.g. its f-gram).

  Raises:
    ValueError: a computed row holds a NaN or an Inf (checked per shard before it is
      written; nothing at `out_dir` has changed then, except in an object store, where
      rows are written in place and an earlier shard's good rows may have replaced the
      old store's).

  Returns:
    out_dir.
  """
  if dtype not in DTYPES:
    raise ValueError(f'export dtype {dtype!r} is not one of {sorted(DTYPES)}')
  if quant not in quant_lib.QUANTS:
    raise ValueError(f'export quant {quant!r} is not one of {list(quant_lib.QUANTS)}')
  if num_rows < 1 or d_model < 1:
    raise ValueError(f'cannot export an empty [{num_rows}, {d_model}] matrix: the f-gram '
                     'table (or fgram.use_size) has no rows')
  if chunk_rows < 1:
    raise ValueError(f'export.chunk_rows={chunk_rows} must be >= 1')
  chunk_rows = min(chunk_rows, num_rows)
  inner_rows = max(1, min(inner_rows, chunk_rows))
  while chunk_rows % inner_rows:  # sharding_indexed needs inner chunks to tile a shard.
    inner_rows -= 1
  np_dtype = DTYPES[dtype]
  stored = quant_lib.STORAGE_DTYPE.get(quant, dtype)  # The zarr3 data type.
  width = d_model + (quant_lib.SCALE_BYTES if quant != 'none' else 0)
  out_dir = paths.resolve(out_dir)
  remote = paths.is_remote(out_dir)
  partial, done_dir = (out_dir if remote else out_dir + '.partial'), out_dir + '.partial.done'
  plan = {'num_rows': num_rows, 'd_model': d_model, 'dtype': stored, 'quant': quant,
          'chunk_rows': chunk_rows, 'inner_rows': inner_rows, 'meta': meta}
  plan_path = paths.join(done_dir, 'plan.json')
  resume = (paths.exists(paths.join(partial, 'zarr.json')) and
            _plan_matches(plan_path, plan))
  num_shards = -(-num_rows // chunk_rows)
  shard_sha = [''] * num_shards
  shard_crc = [0] * num_shards
  todo = []
  for i in range(num_shards):
    marker = paths.join(done_dir, f'{i}.json')
    done = None
    if resume and paths.exists(marker) and paths.exists(paths.join(partial, shard_file(i))):
      done = json.loads(paths.read_text(marker))
    if done and 'crc32c' in done:
      shard_sha[i], shard_crc[i] = done['sha256'], done['crc32c']
    else:
      todo.append(i)
  done_rows = num_rows - sum(min(chunk_rows, num_rows - i * chunk_rows) for i in todo)
  bar = tqdm.tqdm(total=num_rows, initial=done_rows, unit='row', desc='export',
                  disable=not progress)
  array = None
  for i in todo:
    start, stop = i * chunk_rows, min((i + 1) * chunk_rows, num_rows)
    rows_RxD = np.asarray(compute_rows(start, stop))
    if rows_RxD.shape != (stop - start, d_model):
      raise ValueError(f'compute_rows({start}, {stop}) returned shape {rows_RxD.shape}, '
                       f'expected {(stop - start, d_model)}')
    _check_finite(rows_RxD, start, row_name, meta)
    if array is None:
      # Only now that the first new rows are known good is anything at out_dir touched
      # (an object store's old manifest removed), so a run whose rows are not finite
      # leaves the previous store as it was.
      array = _open_partial(resume, out_dir, partial, done_dir, plan_path, plan, remote,
                            zarr3_spec(partial, num_rows, width, stored, chunk_rows,
                                       inner_rows))
    rows_RxD = np.ascontiguousarray(rows_RxD.astype(np_dtype) if quant == 'none' else
                                    quant_lib.quantize(rows_RxD, quant))
    array[start:stop].write(rows_RxD).result()
    shard_sha[i] = hashlib.sha256(rows_RxD.view(np.uint8).data).hexdigest()
    shard_crc[i] = crc32c(rows_RxD)
    # The marker is written after the shard is durably in place: a kill in between only
    # costs recomputing this one shard.
    artifacts.write_json_atomic(paths.join(done_dir, f'{i}.json'),
                                {'sha256': shard_sha[i], 'crc32c': shard_crc[i]})
    bar.update(stop - start)
  bar.close()

  files = ['zarr.json'] + [shard_file(i) for i in range(num_shards)]
  artifacts.write_manifest(partial, STORE_KIND, {
      'num_rows': num_rows, 'd_model': d_model, 'dtype': stored, 'quant': quant,
      'row_width': width, 'chunk_rows': chunk_rows,
      'inner_rows': inner_rows, 'shard_sha256': shard_sha, 'shard_crc32c': shard_crc,
      **meta}, files=files)
  # In an object store the shards were written in place and the manifest published them.
  if not remote and os.path.exists(out_dir):
    old = out_dir + '.old'
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  elif not remote:
    os.replace(partial, out_dir)
  paths.rmtree(done_dir)
  return out_dir
