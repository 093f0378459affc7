"""A run's serving session: its exported store, checked, and a decoder over it.

On several processes (config.distributed) every process restores the run on the global
mesh, copies the backbone whole onto its own devices (`process_local`) and decodes the
same prompts; with serve.store_sharded each holds only its row shards of the store
(`ShardedStore`), and the rows of a step cross between processes in a collective.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.experimental import multihost_utils

from scone_jax import artifacts, compat, paths, restore
from scone_jax.config import Config, ConfigError
from scone_jax.export.format import EXPORT_DIR, hashed_meta, store_meta
from scone_jax.model.hashed import hash_fingerprint
from scone_jax.serve.decode import Decoder
from scone_jax.serve.sharded_store import ShardedStore
from scone_jax.serve.store import EmbeddingStore


def open_store(cfg: Config, workdir: str, run: restore.LoadedRun
               ) -> EmbeddingStore | ShardedStore | None:
  """The run's exported store, checked against its checkpoint, table (kind='hashed': the
  hash function and sizes) and tokenizer; None for a baseline. With serve.store_sharded,
  this process's row shards of it (`ShardedStore`; every process must open it)."""
  return open_checked_store(cfg, workdir, run.step, run.table, run.tokenizer,
                            lambda: run.weights_fingerprint, progress=True,
                            sharded=cfg.serve.store_sharded)


def open_checked_store(cfg: Config, workdir: str, step: int, table, tokenizer,
                       weights_fingerprint, progress: bool = False, sharded: bool = False,
                       ) -> EmbeddingStore | ShardedStore | None:
  """W/export checked against what it must have been computed from: checkpoint `step`,
  the table (or the hash function and sizes), the tokenizer and the weights
  (`weights_fingerprint()`: called only when there is a store to check). The one check of
  every reader of a store (generate, downstream scoring). None for a baseline. `sharded`:
  this process's `ShardedStore` part (a collective: every process opens it)."""
  hashed = cfg.fgram_model.kind == 'hashed'
  if table is None and not hashed:
    return None
  path = paths.join(paths.resolve(workdir), EXPORT_DIR)
  if not paths.exists(paths.join(path, artifacts.MANIFEST)):
    raise artifacts.ArtifactError(
        f'{path} holds no exported f-gram store; run `python -m scone_jax.export '
        f'--workdir={workdir}` first')
  if hashed:
    fm = cfg.fgram_model
    expect = {**store_meta(step, hash_fingerprint(fm.hash_max_n, fm.hash_buckets),
                           tokenizer.fingerprint, weights_fingerprint()),
              **hashed_meta(cfg)}
  else:
    expect = store_meta(step, table.fingerprint, tokenizer.fingerprint,
                        weights_fingerprint())
  if sharded:
    return ShardedStore.open(path, cfg.serve.store_tier, expect=expect)
  return EmbeddingStore.open(path, cfg.serve.store_tier, expect=expect, progress=progress)


def process_local(lm: nnx.Module) -> nnx.Module:
  """`lm` with its backbone (what a decoder runs) whole on this process's first device:
  restored on a mesh over several processes, an array is split or replicated across
  hosts, and a decoder on this host's devices needs it all here. A_f stays where it was
  (the store holds its output). `lm` itself on one process."""
  if jax.process_count() == 1:
    return lm
  device = jax.local_devices()[0]

  def here(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = (x.addressable_data(0) if x.is_fully_replicated else
           multihost_utils.process_allgather(x, tiled=True))
    return jax.device_put(x, device)
  graphdef, state = nnx.split(lm.backbone)
  local = nnx.merge(*nnx.split(lm))  # A new module over the same arrays; lm is unchanged.
  local.backbone = nnx.merge(graphdef, jax.tree.map(here, state))
  return local


def serving_mesh(cfg: Config) -> jax.sharding.Mesh | None:
  """The decode mesh of `serve.tensor` > 1: (data, fsdp, tensor) = (1, 1, serve.tensor)
  over this host's first devices, so heads, MLP and vocab (and the KV cache's heads) are
  split by model/sharding.py's table; None (one device) for serve.tensor = 1.

  Raises:
    ConfigError: serve.tensor exceeds the host's devices or does not divide the heads.
  """
  tensor = cfg.serve.tensor
  if tensor == 1:
    return None
  devices = jax.local_devices()
  if tensor > len(devices):
    raise ConfigError(f'config.serve.tensor={tensor} exceeds the {len(devices)} devices '
                      f'of this host; set it to at most {len(devices)}')
  if cfg.model.num_heads % tensor:
    raise ConfigError(f'config.serve.tensor={tensor} does not divide config.model.'
                      f'num_heads={cfg.model.num_heads}: the KV cache is split by heads; '
                      'pick a divisor of the heads')
  return compat.make_mesh((1, 1, tensor), devices=devices[:tensor])


def build_decoder(cfg: Config, workdir: str,
                  batch_size: int | None = None) -> tuple[restore.LoadedRun, Decoder]:
  """Restores W's model and store; a decoder of `batch_size` (default serve.batch_size)
  whose lookup config.serve chooses (`serve.factory.make_lookup`), on `serving_mesh`."""
  run = restore.load_run(cfg, workdir, with_table=True)  # Starts a multi-process runtime.
  mesh = serving_mesh(cfg)
  store = open_store(cfg, workdir, run)
  return run, Decoder(process_local(run.lm), store, run.table, batch_size=batch_size or cfg.serve.batch_size,
                      bos_id=run.tokenizer.bos_id, loop=cfg.serve.decode_loop,
                      lookup=cfg.serve.lookup, cache_rows=cfg.serve.cache_rows, mesh=mesh)
