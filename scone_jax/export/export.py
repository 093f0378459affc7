"""Export: run A_f over every f-gram of the table (kind='table': read the trained rows)
and write the [S, d] store.

Dimension letters: S f-grams in the table, N f-grams per A_f batch, K longest f-gram,
D d_model.

`export_embeddings` is the engine (a model, a table, an output path); `export_store` is
what `python -m scone_jax.export --workdir=W` calls: it restores the trained SconeLM from
W's latest checkpoint, loads the prepared f-gram table and tokenizer, and writes W/export.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from scone_jax import compat, paths, restore
from scone_jax.config import Config, ExportConfig
from scone_jax.export.format import EXPORT_DIR, hashed_meta, store_meta
from scone_jax.export.writer import Part, write_store
from scone_jax.model import SconeLM, flops as flops_lib, model_shardings, trained_table
from scone_jax.model.hashed import hash_fingerprint


def export_embeddings(lm: SconeLM, table: Any, out_dir: str, export_cfg: ExportConfig,
                      meta: dict[str, Any], mesh: jax.sharding.Mesh | None = None,
                      progress: bool = True, flops_per_row: float = 0.0,
                      peak_per_device: float | None = None) -> str:
  """Writes f-gram r's store row for every row r of `table` to a zarr3 store at `out_dir`:
  A_f(f-gram r), or the trained table's row r (kind='table'), as `combine.store_rows`
  prepares it for the run's combine mode (recorded in the manifest as `combine`).

  Batches of `export_cfg.batch_size` f-grams are split over the mesh's batch axes
  (data x fsdp); one shard (`export_cfg.chunk_rows` rows) is on the host at a time and
  shards are written as they are computed, so S x D never sits in host memory. A rerun
  after a kill resumes at the first unfinished shard.

  On several processes (the mesh spans them; every process calls this with the same
  arguments) each process feeds its own rows of every batch, from the shards its row
  group owns (`process_part`), reads back only its own results and writes only its
  shards; process 0 publishes the manifest after a barrier. Process 0 logs the
  throughput in rows/s and, given `flops_per_row`, as a fraction of the peak.

  Args:
    lm: a SCONE model (lm.fgram_model is A_f or the f-gram table).
    table: the f-gram table (its `tokens_of`, `max_len`, `lengths`, `len`).
    out_dir: the store directory (normally W/export).
    export_cfg: dtype, quant, batch_size and chunk_rows.
    meta: manifest fields (checkpoint step, fingerprints).
    mesh: where A_f runs (default: all devices on the data axis).
    progress: show a progress bar.
    flops_per_row: A_f's FLOPs per exported row, for the logged fraction of the peak
      (`flops.flops_per_token(cfg).fgram_forward_per_fgram`; 0 = not logged).
    peak_per_device: peak FLOP/s of one device (`flops.peak_flops_per_device`).

  Returns:
    out_dir.
  """
  if lm.fgram_model is None:
    raise ValueError('this run is a baseline (config.fgram_model.num_layers=0): it has no '
                     'f-gram side and nothing to export; generate without a store')
  if export_cfg.batch_size < 1:
    raise ValueError(f'config.export.batch_size={export_cfg.batch_size} must be >= 1')
  if mesh is None:
    mesh = compat.make_mesh((jax.device_count(), 1, 1))
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  # Every device gets the same number of f-grams per batch.
  batch = -(-export_cfg.batch_size // shards) * shards
  num_rows, d_model = len(table), lm.backbone.cfg.d_model
  k = int(table.max_len)
  lens_S = np.asarray(table.lengths, np.int32)
  last_S = trained_table.last_tokens(table)
  # What the store holds per combine mode (model/combine.py); the decode step applies
  # `combine.stored_rule` to it.
  meta = {**meta, 'combine': lm.combine, 'fgram_kind': lm.kind}

  graphdef, state = nnx.split(lm)
  with compat.set_mesh(mesh):
    state = jax.device_put(state, model_shardings(state, mesh))
  rows_sh = NamedSharding(mesh, P(('data', 'fsdp')))
  part, local = process_part(rows_sh, batch)  # local: this process's rows of a batch.
  # With several processes every call runs the same number of batches (one SPMD program
  # over the global mesh): a whole shard's worth, whatever this process's shard holds.
  lockstep = -(-min(export_cfg.chunk_rows, num_rows) // local) if jax.process_count() > 1 else 0
  computed = [0]

  @jax.jit
  def embed(state, tokens_NxK, lens_N, ids_N, last_N):
    e_NxD = nnx.merge(graphdef, state).export_rows(tokens_NxK, lens_N, ids_N, last_N)
    return jax.lax.with_sharding_constraint(e_NxD.astype(jnp.float32), rows_sh)

  def to_global(local_N: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(rows_sh, local_N,
                                                  (batch,) + local_N.shape[1:])

  def compute_rows(start: int, stop: int) -> np.ndarray:
    pending = []
    for b in range(max(lockstep, -(-(stop - start) // local))):
      lo_b, hi_b = min(start + b * local, stop), min(start + (b + 1) * local, stop)
      tokens_NxK = np.zeros((local, k), np.int32)
      lens_N, ids_N, last_N = (np.zeros(local, np.int32) for _ in range(3))
      if lm.kind != 'table':  # kind='table' reads rows by id: it needs no tokens.
        # Per batch (tokens_of), so S x K is never materialised at 100M+ rows.
        tokens_NxK[:hi_b - lo_b] = table.tokens_of(np.arange(lo_b, hi_b))
      lens_N[:hi_b - lo_b] = lens_S[lo_b:hi_b]
      ids_N[:hi_b - lo_b], last_N[:hi_b - lo_b] = np.arange(lo_b, hi_b), last_S[lo_b:hi_b]
      # Dispatch every batch of the shard before reading any back (async dispatch keeps
      # the device busy while the host copies the previous results).
      pending.append((hi_b - lo_b, embed(state, *(to_global(a) for a in (
          tokens_NxK, lens_N, ids_N, last_N)))))
    computed[0] += stop - start
    return np.concatenate([_local_rows(e_NxD)[:n] for n, e_NxD in pending], axis=0)

  # Under the mesh, the model's logical-axis constraints apply while `embed` traces.
  started = time.perf_counter()
  with compat.set_mesh(mesh):
    write_store(out_dir, num_rows, d_model, export_cfg.dtype, export_cfg.chunk_rows,
                compute_rows, meta, progress=progress, quant=export_cfg.quant,
                row_name=lambda r: _fgram_name(table, r), part=part)
  rows = computed[0] if part.groups == 1 else int(sum(
      multihost_utils.process_allgather(np.int64(computed[0] if part.writes else 0))))
  _log_throughput(rows, time.perf_counter() - started, mesh, flops_per_row, peak_per_device)
  return out_dir


def _log_throughput(rows: int, seconds: float, mesh: jax.sharding.Mesh,
                    flops_per_row: float, peak_per_device: float | None) -> None:
  """Process 0 logs rows/s and, for A_f, the fraction of the mesh's peak FLOP/s."""
  if not rows or jax.process_index():
    return
  rate = rows / seconds
  line = (f'export: {rows} rows in {seconds:.1f} s = {rate:.0f} rows/s on '
          f'{jax.process_count()} process(es), {mesh.size} devices')
  if flops_per_row and peak_per_device:
    line += (f'; A_f at {rate * flops_per_row / (peak_per_device * mesh.size):.2%} of '
             f"the devices' peak FLOP/s ({flops_per_row:.3g} FLOP/row)")
  elif flops_per_row:
    line += '; peak FLOP/s of this device kind unknown (--config.train.peak_tflops)'
  logging.info(line)


def process_part(rows_sh: NamedSharding, batch: int) -> tuple[Part, int]:
  """This process's `Part` of the store and its number of rows of every A_f batch
  (sharded `rows_sh`): processes holding the same rows (a `tensor` axis across processes)
  form one row group, which owns every groups-th shard (writer.Part)."""
  slices = {(s.start or 0, batch if s.stop is None else s.stop)
            for s, *_ in rows_sh.addressable_devices_indices_map((batch,)).values()}
  lo, hi = min(a for a, _ in slices), max(b for _, b in slices)
  if sum(b - a for a, b in slices) != hi - lo:
    raise ValueError(f"this process's devices hold batch rows {sorted(slices)}, not one "
                     f'contiguous block: export needs a mesh whose data x fsdp devices are '
                     'ordered by process (scone_jax.mesh.make_mesh over jax.devices())')
  if jax.process_count() == 1:
    return Part(), hi - lo
  ranges = [tuple(r) for r in multihost_utils.process_allgather(
      np.array([lo, hi], np.int64)).tolist()]
  groups = sorted(set(ranges))
  if sum(b - a for a, b in groups) != batch:
    raise ValueError(f'processes hold overlapping batch rows {groups}: export needs each '
                     "process's data x fsdp devices to hold rows no other process's hold, "
                     'or exactly the same ones')
  return _process_part(group=groups.index((lo, hi)), groups=len(groups),
                       writes=ranges.index((lo, hi)) == jax.process_index()), hi - lo


def _process_part(**fields: Any) -> Part:
  """A `Part` whose collectives span every process; process 0 publishes."""
  return Part(first=jax.process_index() == 0,
              agree_max=lambda n: int(np.max(multihost_utils.process_allgather(np.int64(n)))),
              barrier=multihost_utils.sync_global_devices, **fields)


def _local_rows(e_NxD: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded result, in order (replicas read once)."""
  shards = {s.index[0].start or 0: s.data for s in e_NxD.addressable_shards}
  return np.concatenate([np.asarray(shards[a]) for a in sorted(shards)], axis=0)


def export_hashed(lm: SconeLM, out_dir: str, export_cfg: ExportConfig,
                  meta: dict[str, Any], progress: bool = True) -> str:
  """kind='hashed': writes the n-gram tables, times their fixed scale s, as the store
  [O * M, d] (order n's rows at [(n - 2) * M, (n - 1) * M), model/hashed.py).

  The rows are s * E (float32 product, as the training forward computes it before
  summing), so the host only sums gathered rows. One shard's slice of the table is
  copied to the host at a time (on several processes, gathered from all of them and
  written by process 0).
  """
  if lm.hashed is None:
    raise ValueError("this run has no hashed n-gram tables (config.fgram_model.kind is not "
                     "'hashed')")
  table = lm.hashed.table[...]
  scale = np.float32(lm.hashed.scale)
  # On several processes the table is sharded across them: every process takes part in
  # gathering each shard's slice and process 0 writes it.
  multi = jax.process_count() > 1
  part = _process_part(writes=jax.process_index() == 0) if multi else Part()

  def compute_rows(start: int, stop: int) -> np.ndarray:
    rows = (multihost_utils.process_allgather(table[start:stop], tiled=True) if multi else
            table[start:stop])
    return np.asarray(rows, np.float32) * scale

  buckets = lm.hashed.buckets
  return write_store(out_dir, table.shape[0], table.shape[1], export_cfg.dtype,
                     export_cfg.chunk_rows, compute_rows, meta, progress=progress,
                     row_name=lambda r: (f'store row {r} (order {r // buckets + 2}, bucket '
                                         f'{r % buckets})'), part=part)


def _fgram_name(table: Any, row: int) -> str:
  """How an error names store row `row`: its f-gram's token ids."""
  tokens = table.tokens_of(np.array([row]))[0][:int(table.lengths[row])]
  return f'store row {row} (f-gram {tokens.tolist()})'


def export_store(cfg: Config, workdir: str, progress: bool = True) -> str:
  """Exports W's latest checkpoint's f-gram embeddings to W/export; returns the path."""
  run = restore.load_run(cfg, workdir, with_table=True)
  out = paths.join(paths.resolve(workdir), EXPORT_DIR)
  if cfg.fgram_model.kind == 'hashed':
    fm = cfg.fgram_model
    meta = {**store_meta(run.step, hash_fingerprint(fm.hash_max_n, fm.hash_buckets),
                         run.tokenizer.fingerprint, run.weights_fingerprint),
            **hashed_meta(cfg)}
    logging.info('export: hashed n-gram tables (%d orders x %d rows) of step %d -> %s',
                 fm.hash_max_n - 1, fm.hash_buckets, run.step, out)
    return export_hashed(run.lm, out, cfg.export, meta, progress)
  meta = store_meta(run.step, run.table.fingerprint, run.tokenizer.fingerprint,
                    run.weights_fingerprint)
  logging.info('export: A_f over %d f-grams of step %d -> %s', len(run.table), run.step, out)
  return export_embeddings(
      run.lm, run.table, out, cfg.export, meta, run.mesh, progress,
      flops_lib.flops_per_token(cfg, run.vocab_size).fgram_forward_per_fgram,
      flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_tflops))
