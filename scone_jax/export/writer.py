"""Streaming, resumable writer of an [S, d] row matrix as a sharded zarr3 store.

The layout of a finished store is in export/format.py.

Work happens in `<out>.partial/` with one done-marker per shard in `<out>.partial.done/`
(outside the store so the store stays a clean zarr3 array). A rerun after a kill skips
finished shards; the partial directory is renamed to `<out>` only after every shard and
the manifest are on disk, so a reader never sees a half-written store as complete.
In an object store (gs://, no rename) the shards are written in place under `<out>`
after its old manifest is removed, and the manifest, written last, is the completion
marker `EmbeddingStore.open` requires.

Several processes write one store together (`Part`): each computes and writes only the
shards its row group owns, in lock-step rounds (the computation is one SPMD program over
the global mesh); process 0 creates the partial array, and writes the manifest once every
process has passed the barrier after its last shard. A shard reaches disk whole
(tensorstore's file driver writes a temp file and renames it) before its marker; a
resumed write re-reads each marked shard and recomputes it unless its crc32c matches.

Every shard's rows are checked finite before it is written, and nothing at `<out>` is
touched before the first shard passes: a diverged checkpoint (NaN weights) fails the
export naming the first bad row and leaves the previous store as it was.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Part:
  """This process's part of a store that several processes write (the default: all of it).

  Processes whose devices hold the same rows of an A_f batch form a row group; group g
  computes the shards i with i % groups == g, the group's lowest process (`writes`)
  writes them, and process 0 (`first`) creates the partial store and writes the manifest.

  Attributes:
    group: this process's row group.
    groups: the number of row groups.
    writes: this process writes its group's shards and their markers.
    first: this process creates the partial store and publishes the manifest.
    agree_max: n -> the largest n over every process (a collective every process calls).
    barrier: name -> returns once every process has reached the barrier `name`.
  """
  group: int = 0
  groups: int = 1
  writes: bool = True
  first: bool = True
  agree_max: Callable[[int], int] = int
  barrier: Callable[[str], None] = lambda name: None

  def owns(self, shard: int) -> bool:
    return shard % self.groups == self.group


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


def _create_partial(out_dir: str, partial: str, done_dir: str, plan_path: str,
                    plan: dict[str, Any], remote: bool, create_spec: dict[str, Any]) -> None:
  """A fresh partial array and plan (discarding a partial write of another plan)."""
  if remote:  # Unpublish first: the manifest is the completion marker.
    paths.remove(paths.join(out_dir, artifacts.MANIFEST))
  paths.rmtree(partial)
  paths.rmtree(done_dir)
  paths.makedirs(done_dir)
  ts.open(create_spec, create=True, delete_existing=True).result()
  artifacts.write_json_atomic(plan_path, plan)


def _open_partial(partial: str):
  """The partial array the shards are written into."""
  # Zero rows are stored too, so every shard holds all its inner chunks in order and the
  # disk tier can memory-map it (serve/store.py checks the shard index before it does).
  return ts.open({**zarr3_spec(partial), 'store_data_equal_to_fill_value': True}).result()


def _done_marker(array, done_dir: str, partial: str, i: int, start: int,
                 stop: int) -> dict[str, Any] | None:
  """Shard i's marker if the shard on disk still has the crc32c it records, else None (the
  shard is recomputed)."""
  marker = paths.join(done_dir, f'{i}.json')
  if not (paths.exists(marker) and paths.exists(paths.join(partial, shard_file(i)))):
    return None
  done = json.loads(paths.read_text(marker))
  if 'crc32c' not in done or crc32c(array[start:stop].read().result()) != done['crc32c']:
    return None
  return done


def write_store(out_dir: str, num_rows: int, d_model: int, dtype: str, chunk_rows: int,
                compute_rows: Callable[[int, int], np.ndarray], meta: dict[str, Any],
                inner_rows: int = 64, progress: bool = True,
                quant: quant_lib.Quant = 'none',
                row_name: Callable[[int], str] = lambda r: f'store row {r}',
                part: Part = Part()) -> str:
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
    compute_rows: (start, stop) -> [stop - start, d] array of rows start..stop-1. With
      several processes (`part`) every process calls it once per round, with
      start == stop in a round where it has no shard left (it must still take part in
      the round's collectives).
    meta: extra manifest fields (e.g. checkpoint step and fingerprints).
    inner_rows: rows per inner chunk of a shard (the unit of a disk-tier read).
    progress: show a progress bar.
    quant: 'none', or 'int8' | 'fp8': rows quantised on the host with a float32 scale
      per row (export/quant.py), stored as [S, d + 4].
    row_name: row -> how an error names it (e.g. its f-gram).
    part: this process's shards when several processes write the store (module
      docstring); every process calls write_store with the same arguments but `part`.

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
  # Every process reads the old partial state before process 0 may replace it.
  resume = (paths.exists(paths.join(partial, 'zarr.json')) and
            _plan_matches(plan_path, plan))
  part.barrier('scone_jax.export.plan_read')
  num_shards = -(-num_rows // chunk_rows)
  bounds = [(i * chunk_rows, min((i + 1) * chunk_rows, num_rows)) for i in range(num_shards)]
  array = _open_partial(partial) if resume else None
  todo = [i for i in range(num_shards) if part.owns(i) and not (
      resume and _done_marker(array, done_dir, partial, i, *bounds[i]))]
  mine = sum(stop - start for i, (start, stop) in enumerate(bounds) if part.owns(i))
  bar = tqdm.tqdm(total=mine, initial=mine - sum(bounds[i][1] - bounds[i][0] for i in todo),
                  unit='row', desc='export', disable=not progress)
  for r in range(part.agree_max(len(todo))):
    i = todo[r] if r < len(todo) else None
    start, stop = bounds[i] if i is not None else (0, 0)
    rows_RxD = np.asarray(compute_rows(start, stop))
    if rows_RxD.shape != (stop - start, d_model):
      raise ValueError(f'compute_rows({start}, {stop}) returned shape {rows_RxD.shape}, '
                       f'expected {(stop - start, d_model)}')
    finite = bool(np.isfinite(np.asarray(rows_RxD, np.float32)).all())
    if part.agree_max(int(not finite)):  # Every process stops, not only the one that saw it.
      _check_finite(rows_RxD, start, row_name, meta)
      raise ValueError('another process computed rows that are not finite (NaN/Inf); its '
                       'log names the first one. Nothing was published')
    if array is None:
      # Only now that the first new rows are known good is anything at out_dir touched
      # (an object store's old manifest removed), so a run whose rows are not finite
      # leaves the previous store as it was.
      if part.first:
        _create_partial(out_dir, partial, done_dir, plan_path, plan, remote,
                        zarr3_spec(partial, num_rows, width, stored, chunk_rows, inner_rows))
      part.barrier('scone_jax.export.partial_created')
      array = _open_partial(partial)
    if i is None or not part.writes:
      continue
    rows_RxD = np.ascontiguousarray(rows_RxD.astype(np_dtype) if quant == 'none' else
                                    quant_lib.quantize(rows_RxD, quant))
    array[start:stop].write(rows_RxD).result()
    # The marker is written after the shard is durably in place: a kill in between only
    # costs recomputing this one shard.
    artifacts.write_json_atomic(paths.join(done_dir, f'{i}.json'), {
        'sha256': hashlib.sha256(rows_RxD.view(np.uint8).data).hexdigest(),
        'crc32c': crc32c(rows_RxD)})
    bar.update(stop - start)
  bar.close()

  part.barrier('scone_jax.export.shards_written')
  if part.first:
    _publish(out_dir, partial, done_dir, remote, num_shards, {
        'num_rows': num_rows, 'd_model': d_model, 'dtype': stored, 'quant': quant,
        'row_width': width, 'chunk_rows': chunk_rows, 'inner_rows': inner_rows}, meta)
  part.barrier('scone_jax.export.published')
  return out_dir


def _publish(out_dir: str, partial: str, done_dir: str, remote: bool, num_shards: int,
             layout: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes the manifest (the layout, every shard's checksums from its marker, the caller's
  `meta`) and moves the partial store to `out_dir`."""
  done = [json.loads(paths.read_text(paths.join(done_dir, f'{i}.json')))
          for i in range(num_shards)]
  files = ['zarr.json'] + [shard_file(i) for i in range(num_shards)]
  artifacts.write_manifest(partial, STORE_KIND, {
      **layout, 'shard_sha256': [m['sha256'] for m in done],
      'shard_crc32c': [m['crc32c'] for m in done], **meta}, files=files)
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
