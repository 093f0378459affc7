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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scone_jax import compat, paths, restore
from scone_jax.config import Config, ExportConfig
from scone_jax.export.format import EXPORT_DIR, hashed_meta, store_meta
from scone_jax.export.writer import write_store
from scone_jax.model import SconeLM, model_shardings, trained_table
from scone_jax.model.hashed import hash_fingerprint


def export_embeddings(lm: SconeLM, table: Any, out_dir: str, export_cfg: ExportConfig,
                      meta: dict[str, Any], mesh: jax.sharding.Mesh | None = None,
                      progress: bool = True) -> str:
  """Writes f-gram r's store row for every row r of `table` to a zarr3 store at `out_dir`:
  A_f(f-gram r), or the trained table's row r (kind='table'), as `combine.store_rows`
  prepares it for the run's combine mode (recorded in the manifest as `combine`).

  Batches of `export_cfg.batch_size` f-grams are split over the mesh's batch axes
  (data x fsdp); one shard (`export_cfg.chunk_rows` rows) is on the host at a time and
  shards are written as they are computed, so S x D never sits in host memory. A rerun
  after a kill resumes at the first unfinished shard.

  Args:
    lm: a SCONE model (lm.fgram_model is A_f or the f-gram table).
    table: the f-gram table (its `tokens_of`, `max_len`, `lengths`, `len`).
    out_dir: the store directory (normally W/export).
    export_cfg: dtype, quant, batch_size and chunk_rows.
    meta: manifest fields (checkpoint step, fingerprints).
    mesh: where A_f runs (default: all devices on the data axis).
    progress: show a progress bar.

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

  @jax.jit
  def embed(state, tokens_NxK, lens_N, ids_N, last_N):
    e_NxD = nnx.merge(graphdef, state).export_rows(tokens_NxK, lens_N, ids_N, last_N)
    return jax.lax.with_sharding_constraint(e_NxD.astype(jnp.float32), rows_sh)

  def compute_rows(start: int, stop: int) -> np.ndarray:
    pending = []
    for lo in range(start, stop, batch):
      hi = min(lo + batch, stop)
      tokens_NxK = np.zeros((batch, k), np.int32)
      lens_N, ids_N, last_N = (np.zeros(batch, np.int32) for _ in range(3))
      if lm.kind != 'table':  # kind='table' reads rows by id: it needs no tokens.
        # Per batch (tokens_of), so S x K is never materialised at 100M+ rows.
        tokens_NxK[:hi - lo] = table.tokens_of(np.arange(lo, hi))
      lens_N[:hi - lo] = lens_S[lo:hi]
      ids_N[:hi - lo], last_N[:hi - lo] = np.arange(lo, hi), last_S[lo:hi]
      # Dispatch every batch of the shard before reading any back (async dispatch keeps
      # the device busy while the host copies the previous results).
      pending.append((hi - lo, embed(state, *(jax.device_put(a, rows_sh) for a in (
          tokens_NxK, lens_N, ids_N, last_N)))))
    return np.concatenate([np.asarray(e_NxD)[:n] for n, e_NxD in pending], axis=0)

  # Under the mesh, the model's logical-axis constraints apply while `embed` traces.
  with compat.set_mesh(mesh):
    return write_store(out_dir, num_rows, d_model, export_cfg.dtype,
                       export_cfg.chunk_rows, compute_rows, meta, progress=progress,
                       quant=export_cfg.quant, row_name=lambda r: _fgram_name(table, r))


def export_hashed(lm: SconeLM, out_dir: str, export_cfg: ExportConfig,
                  meta: dict[str, Any], progress: bool = True) -> str:
  """kind='hashed': writes the n-gram tables, times their fixed scale s, as the store
  [O * M, d] (order n's rows at [(n - 2) * M, (n - 1) * M), model/hashed.py).

  The rows are s * E (float32 product, as the training forward computes it before
  summing), so the host only sums gathered rows. One shard's slice of the table is
  copied to the host at a time.
  """
  if lm.hashed is None:
    raise ValueError("this run has no hashed n-gram tables (config.fgram_model.kind is not "
                     "'hashed')")
  table = lm.hashed.table[...]
  scale = np.float32(lm.hashed.scale)

  def compute_rows(start: int, stop: int) -> np.ndarray:
    return np.asarray(table[start:stop], np.float32) * scale

  buckets = lm.hashed.buckets
  return write_store(out_dir, table.shape[0], table.shape[1], export_cfg.dtype,
                     export_cfg.chunk_rows, compute_rows, meta, progress=progress,
                     row_name=lambda r: (f'store row {r} (order {r // buckets + 2}, bucket '
                                         f'{r % buckets})'))


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
  return export_embeddings(run.lm, run.table, out, cfg.export, meta, run.mesh, progress)
