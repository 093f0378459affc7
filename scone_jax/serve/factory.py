"""The one place a decoder's f-gram lookup (serve/lookup.py) is chosen: from the store (an
f-gram store with its table, a hashed n-gram store, or none), `serve.lookup`,
`serve.cache_rows` and the JAX backend.

lookup='auto': on the CPU backend 'native' (the fused host match + gather, ~2 us); on a
CUDA GPU 'device' (match on the device, rows by the FFI gather of serve/ffi_gather.py); on
any other backend, or when those are unavailable (the reason logged once as a warning),
the io_callback ('callback').
"""

from __future__ import annotations

from typing import Any, Literal

import jax
from absl import logging

from scone_jax.model import combine as combine_lib
from scone_jax.serve import ffi_gather, native_lookup
from scone_jax.serve.device_cache import DeviceCacheLookup
from scone_jax.serve.hashed import HashedLookup, is_hashed_store
from scone_jax.serve.host_lookup import HostLookup
from scone_jax.serve.lookup import Lookup, NoLookup
from scone_jax.serve.store import EmbeddingStore

LookupMode = Literal['auto', 'native', 'callback', 'cache', 'device']
MODES = ('auto', 'native', 'callback', 'cache', 'device')


def ffi_target(shards, backend: str) -> tuple[str, str]:
  """(the FFI gather's target for `backend`, '') or ('', why it is unavailable)."""
  if shards is None:
    return '', ("the store has no rows in memory or memory-mapped (tier 'ram', or 'disk' "
                'with the memmap reader)')
  try:
    return ffi_gather.target(backend), ''
  except ffi_gather.GatherUnavailable as e:
    return '', str(e)


def make_lookup(store: EmbeddingStore | None, table: Any, *, combine: str, d_model: int,
                dtype, batch_size: int, mode: LookupMode = 'auto', cache_rows: int = 0,
                loop: str = 'device') -> Lookup:
  """The lookup of a decoder of `batch_size` rows for a model of `d_model` computing in
  `dtype` that joins f-gram rows with `combine` (fgram_model.combine).

  store/table: an f-gram store and the table it was exported from (SCONE); a hashed
  n-gram store (its manifest says so) and no table (kind='hashed'); or neither (the
  baseline). mode: config.serve.lookup ('auto': native where it applies, else the
  callback on CPU; 'device' on a CUDA GPU, else the callback). cache_rows: C for
  mode='cache' | 'device'.

  Raises:
    ValueError: the store does not fit the model or the table, or the mode does not fit
      the store, the loop or the backend; the message names the fix.
  """
  if mode not in MODES:
    raise ValueError(f'lookup={mode!r} must be one of {list(MODES)}')
  if mode in ('cache', 'device') and loop != 'device':
    raise ValueError(f"lookup='{mode}' runs inside the device loop; use loop='device'")
  if store is None:
    if table is not None:
      raise ValueError('pass both the f-gram store and its table (SCONE) or neither '
                       '(baseline)')
    return NoLookup(batch_size, d_model, dtype)
  if store.d_model != d_model:
    raise ValueError(f'store rows have d={store.d_model} but the model has d_model='
                     f'{d_model}: the store was exported from another model')
  rule = combine_lib.stored_rule(combine)
  if is_hashed_store(store):
    if table is not None:
      raise ValueError('a hashed n-gram store is addressed by hashing, not by an f-gram '
                       'table: pass the store alone')
    if mode in ('native', 'cache', 'device'):
      raise ValueError(f"lookup='{mode}' serves f-gram stores only; a hashed n-gram run "
                       "uses lookup='callback' (or 'auto')")
    lookup = HashedLookup(store, batch_size, dtype)
    if lookup.rule != rule:
      raise ValueError(f"a hashed n-gram store's rows are added to T(x_i), but the model "
                       f'combines with {combine!r}: a hashed run has combine=add')
    return lookup
  if table is None:
    raise ValueError('pass both the f-gram store and its table (SCONE) or neither '
                     '(baseline)')
  # The store must have been exported for the model's combine mode (gate's rows hold
  # sigmoid(g) * (e - T)).
  stored = store.manifest.get('combine', 'replace')
  if stored != combine:
    raise ValueError(f'the store was exported for fgram_model.combine={stored!r} but the '
                     f'model combines with {combine!r}: export this run again')
  if store.num_rows != len(table):
    raise ValueError(f'store has {store.num_rows} rows but the f-gram table has '
                     f'{len(table)}: export with the same fgram.use_size / fgram.size')
  shards = native_lookup.store_shards(store)
  backend = jax.default_backend()
  on_cpu = backend == 'cpu'
  if mode in ('cache', 'device') or (mode == 'auto' and not on_cpu and loop == 'device'):
    target, why = ffi_target(shards, backend)
    if mode == 'device' and not target:
      raise ValueError(f"lookup='device' needs the FFI gather: {why}; use "
                       "lookup='callback' (or 'auto')")
    if target or mode == 'cache':
      return DeviceCacheLookup(store, table, batch_size, rule, cache_rows, shards, target,
                               name='cache' if mode == 'cache' else 'device')
    logging.warning("lookup='auto': no device lookup on %s (%s); using the callback",
                    backend, why)
  if mode == 'native' and (shards is None or not on_cpu):
    raise ValueError("lookup='native' needs the CPU backend and a store in memory or "
                     "memory-mapped (tier 'ram', or 'disk' with the memmap reader); use "
                     "lookup='callback' (or 'auto')")
  if mode != 'callback' and shards is not None and on_cpu:
    try:
      return native_lookup.NativeLookup(store, table, batch_size, rule, shards)
    except Exception as e:  # pylint: disable=broad-except
      if mode == 'native':
        raise
      logging.warning('native f-gram lookup unavailable (%s); using the callback', e)
  return HostLookup(store, table, batch_size, rule)
