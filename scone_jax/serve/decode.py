"""KV-cache decoding fed with INPUT EMBEDDINGS, f-gram lookups done on the host.

Dimension letters: B batch (sequences), T padded prompt length, S cache length,
D d_model, W the stored row width (D; D + 4 for a quantised store, export/quant.py),
E = W + 1 (a decode slab row: the f-gram row, then the match flag), V vocab,
K longest f-gram.

One jitted prefill and one jitted decode step serve the baseline and SCONE: each takes
token ids plus a host-made slab of f-gram embeddings and a mask, and computes
x = where(mask, slab, T(token)) on the device (`model.combine.combine` with the store's
rule: where(mask, T(token) + slab, T(token)) for combine 'add' / 'gate', D more adds per
token); the baseline passes a mask that is all False. Only the backbone's parameters go
to the accelerator: A_f was folded into the exported store, so a SCONE step costs what the
baseline's does (tests assert XLA's FLOP counts agree).

Per decode step the host (1) pushes each sequence's new token into an
`IncrementalMatcher`, which returns the longest f-gram ending there, (2) gathers those
rows from the `EmbeddingStore` into one [B, D + 1] slab whose last column is the match
flag, and (3) hands the slab to the jitted step (one small transfer per step). For the
'ram' tier (1)-(2) are one compiled call (`_slab_kernel`). The prompt's matching, gather
and transfer are issued before the prefill is dispatched, sampled tokens stay on the
device as the next step's input, and the host's bookkeeping of token t runs while step
t+1 runs on the device. Steps (1)-(3) need token t, so they sit between two device
steps: they are SCONE's whole per-step cost over the baseline (benchmarks/bench_decode.py
prints it: ~2 us isolated, ~10-20 us inside the CPU decode loop, whose device step has
just evicted the host's caches).
The store is never indexed inside jit (docs/METHOD.md, section 4: a pinned_host table
indexed in jit fails or runs slow host compute).

That is the 'host' loop (`loop='host'`), one jitted step per token from Python. The
default, `loop='device'`, runs the same step in an on-device `lax.while_loop` (serve/
device_loop.py): sampling, EOS and max_new_tokens are decided on the device and tokens
come back in chunks; SCONE's lookup is called from inside the loop (`lookup`: 'native',
an XLA FFI call into the compiled match + gather, on the CPU backend with the 'ram' tier
or the memmapped 'disk' tier; 'callback', a host callback into `step_slab`, anywhere).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numba
import numpy as np
from absl import logging
from flax import nnx

from scone_jax.export import quant
from scone_jax.fgrams import IncrementalMatcher
from scone_jax.fgrams.match import push_kernel
from scone_jax.model import Backbone, KVCache, SconeLM
from scone_jax.model import combine as combine_lib
from scone_jax.serve import device_loop, native_lookup
from scone_jax.serve.hashed import HashedLookup
from scone_jax.serve.sampling import Sampling, sample
from scone_jax.serve.store import EmbeddingStore, gather_kernel

Loop = Literal['device', 'host']
LookupMode = Literal['auto', 'native', 'callback', 'cache']


def _inputs(backbone: Backbone, tokens_BxT: jax.Array, slab_BxTxW: jax.Array,
            mask_BxT: jax.Array, combine: str = 'replace') -> jax.Array:
  """The combine rule (model/combine.py) with precomputed f-gram rows: `combine` is the
  store's rule (`combine.stored_rule`): where mask, slab ('replace') or T(token) + slab
  ('add': combine add / gate, and kind='hashed', serve/hashed.py; D adds per token more
  than 'replace'), else T(token).

  slab_BxTxW holds the store's rows as gathered: W = D, or D + 4 for a quantised store,
  dequantised here on the device (its int8/fp8 dtype says so at trace time; D converts
  and D multiplies per position, the step's only extra over the baseline's:
  quant.dequant_xla_flops_per_row).
  """
  x_BxTxD = backbone.embed(tokens_BxT)
  slab_BxTxD = quant.dequantize(slab_BxTxW, x_BxTxD.shape[-1])
  return combine_lib.combine(x_BxTxD, slab_BxTxD, mask_BxT, combine)


def _prefill(graphdef, sampling: Sampling, all_logits: bool, state, tokens_BxT, slab_BxTxE,
             lengths_B, cache: KVCache, key, combine: str = 'replace'):
  """slab_BxTxE: the prompts' f-gram rows with the match flag last (None: baseline)."""
  backbone = nnx.merge(graphdef, state)
  if slab_BxTxE is None:
    x_BxTxD = backbone.embed(tokens_BxT)
  else:
    x_BxTxD = _inputs(backbone, tokens_BxT, slab_BxTxE[..., :-1], slab_BxTxE[..., -1] > 0,
                      combine)
  logits_BxTxV, cache = backbone.prefill(x_BxTxD, lengths_B, cache)
  last_BxV = jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return (logits_BxTxV if all_logits else last_BxV), sample(last_BxV, key, sampling), cache


def _decode(graphdef, sampling: Sampling, state, token_B, slab_BxE, cache: KVCache, key,
            step, combine: str = 'replace'):
  backbone = nnx.merge(graphdef, state)
  mask_B = slab_BxE[:, -1] > 0
  x_Bx1xD = _inputs(backbone, token_B[:, None], slab_BxE[:, None, :-1], mask_B[:, None],
                    combine)
  logits_Bx1xV, cache = backbone.decode(x_Bx1xD, cache)
  next_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, step), sampling)
  return logits_Bx1xV[:, 0], next_B, cache


@numba.njit(nogil=True, cache=True)
def _slab_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B, rows_RxD, num_rows,
                 slab_BxE, one):
  """IncrementalMatcher.push + EmbeddingStore.gather + the match flag, on raw bits; returns
  the number of matched rows, or -1 - b for the first row b with an invalid token."""
  bad = push_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B)
  if bad >= 0:
    return -1 - bad
  hits = gather_kernel(rows_RxD, ids_B, num_rows, slab_BxE[:, :-1])
  for b in range(ids_B.size):
    slab_BxE[b, -1] = one if lens_B[b] > 1 else 0
  return hits


@numba.njit(nogil=True, cache=True)
def _prompt_kernel(tokens_BxT, lengths_B, codes_BxL, index, limit, ids_BxT, rows_RxD,
                   num_rows, slab_NxE, one):
  """Matches every prompt row (positions < lengths_B[b]; later ones get -1) by pushing its
  tokens into a fresh incremental matcher, which ends primed with the row's last K-1
  tokens. With `rows_RxD` (raw bits) also fills slab_NxE (N = B*T positions): the
  f-gram row and the match flag. Returns the number of matched positions."""
  b, t = tokens_BxT.shape
  codes_BxL[:] = -1
  lens_1 = np.empty(1, np.int32)
  hits = 0
  for r in range(b):
    for j in range(t):
      if j >= lengths_B[r]:
        ids_BxT[r, j] = -1
      else:
        push_kernel(tokens_BxT[r, j:j + 1], codes_BxL[r:r + 1], index, limit,
                    ids_BxT[r, j:j + 1], lens_1)
      if ids_BxT[r, j] >= 0:
        hits += 1
      if rows_RxD is not None:
        row = ids_BxT[r, j] if ids_BxT[r, j] >= 0 else num_rows
        slab_NxE[r * t + j, :-1] = rows_RxD[row, :]
        slab_NxE[r * t + j, -1] = one if ids_BxT[r, j] >= 0 else 0
  return hits


# Module level, so decoders of one model shape share compilations.
_PREFILL = jax.jit(_prefill, static_argnums=(0, 1, 2), static_argnames=('combine',),
                   donate_argnames=('cache',))
_DECODE = jax.jit(_decode, static_argnums=(0, 1), static_argnames=('combine',),
                  donate_argnames=('cache',))


@dataclasses.dataclass
class Generation:
  """Result of `Decoder.generate`: new tokens per prompt and where the time went."""
  tokens: list[np.ndarray]
  prefill_seconds: float
  decode_seconds: float
  # Steps timed in decode_seconds: all of them for the device loop (compiled beforehand),
  # all but the first (its compilation) for the host loop.
  decode_steps: int
  batch_size: int
  lookup_seconds: float = 0.0  # host match + gather + device_put, the timed steps
  # This process's CPU time over the timed steps (all threads): on a CPU backend shared with
  # other jobs, the work done, not the time spent waiting for a core.
  decode_cpu_seconds: float = 0.0
  prompt_lookup_seconds: float = 0.0  # host match + gather of the prompts (in prefill)
  # lookup='cache': the timed steps' host calls (steps with a cache miss) and rows served
  # by the host.
  host_calls: int = 0
  host_rows: int = 0

  @property
  def tokens_per_second(self) -> float:
    """Decode throughput: generated tokens (all rows) per second after the prefill."""
    return self.decode_steps * self.batch_size / max(self.decode_seconds, 1e-12)


class Decoder:
  """Batched KV-cache generation through the host-side f-gram store.

  Args:
    lm: the trained model; only `lm.backbone` is put on the accelerator.
    store: the exported f-gram embeddings (None for a baseline run).
    table: the f-gram table the store was exported from (its `match`, and
      `IncrementalMatcher(table, B)` from scone_jax.fgrams).
    batch_size: B, rows decoded together (prompts are padded to it).
    bos_id: prepended to every prompt; no f-gram contains it, so matches never reach
      before it.
    cache_len: S, the KV cache length (default and maximum: model.max_seq_len).
    loop: 'device' (an on-device while loop, tokens streamed in chunks of `chunk_steps`)
      or 'host' (one jitted step per token from Python).
    lookup: SCONE's per-step lookup inside the device loop: 'native' (XLA FFI call, CPU
      backend and 'ram' tier only), 'callback' (host callback), or 'auto' (native where
      it applies), or 'cache' (match on the device, `cache_rows` hottest rows resident
      there, the host only for misses: serve/device_cache.py).
    cache_rows: C for lookup='cache' (C x d_model x the store's itemsize bytes on the
      device, plus 12 bytes per table row for the match index).
    chunk_steps: decode steps per device call (the streaming granularity).
    hashed: kind='hashed' runs: the store path through `HashedLookup` (serve/hashed.py),
      given instead of store and table; the step adds its slab (combine='add').
  """

  def __init__(self, lm: SconeLM, store: EmbeddingStore | None = None, table: Any = None,
               *, batch_size: int = 1, bos_id: int = 1, cache_len: int | None = None,
               loop: Loop = 'device', lookup: LookupMode = 'auto', chunk_steps: int = 64,
               hashed: HashedLookup | None = None, cache_rows: int = 0):
    backbone = lm.backbone
    cfg = backbone.cfg
    self._hashed, self._combine = hashed, 'replace' if hashed is None else 'add'
    if hashed is not None and (store is not None or table is not None):
      raise ValueError('a hashed n-gram decoder takes hashed= only (its store is inside)')
    if hashed is not None and (hashed.d_model != cfg.d_model or
                               hashed.batch_size != batch_size):
      raise ValueError(f'hashed lookup has d={hashed.d_model}, batch {hashed.batch_size}; '
                       f'the decoder d_model={cfg.d_model}, batch_size={batch_size}')
    if (store is None) != (table is None):
      raise ValueError('pass both the f-gram store and its table (SCONE) or neither '
                       '(baseline)')
    # The rule the steps apply to store rows (model/combine.py); the store must have been
    # exported for the model's combine mode (gate's rows hold sigmoid(g) * (e - T)).
    if store is not None:
      self._combine = combine_lib.stored_rule(lm.combine)
    if store is not None:
      stored = store.manifest.get('combine', 'replace')
      if stored != lm.combine:
        raise ValueError(f'the store was exported for fgram_model.combine={stored!r} but the '
                         f'model combines with {lm.combine!r}: export this run again')
      if store.d_model != cfg.d_model:
        raise ValueError(f'store rows have d={store.d_model} but the model has d_model='
                         f'{cfg.d_model}: the store was exported from another model')
      if store.num_rows != len(table):
        raise ValueError(f'store has {store.num_rows} rows but the f-gram table has '
                         f'{len(table)}: export with the same fgram.use_size')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    self.cache_len = cache_len or cfg.max_seq_len
    if self.cache_len > cfg.max_seq_len:
      raise ValueError(f'cache_len={self.cache_len} exceeds the context (config.model.'
                       f'max_seq_len={cfg.max_seq_len})')
    # A hashed run's store is `self.store` too (accounting, stats); its lookup is hashed's.
    self.store, self.table = (store if hashed is None else hashed.store), table
    self.batch_size, self.bos_id = batch_size, bos_id
    self.d_model, self.dtype = cfg.d_model, jnp.dtype(cfg.dtype)
    self.graphdef, self.state = nnx.split(backbone)
    slab_dtype = (store.dtype if store is not None else
                  hashed.slab_dtype if hashed is not None else self.dtype)
    self._slab_dtype = np.dtype(slab_dtype)
    # Stored columns of a row: D, or D + 4 for a quantised store (values, then scale).
    self._row_width = store.row_width if store is not None else cfg.d_model
    self._no_match_BxE = jnp.zeros((batch_size, self._row_width + 1), slab_dtype)
    self._init_cache = jax.jit(functools.partial(backbone.init_cache, batch_size,
                                                 self.cache_len))
    self._prefill, self._decode = _PREFILL, _DECODE
    self._matcher = None
    if table is not None:
      self._matcher = IncrementalMatcher(table, batch_size)
      self.max_fgram_len = int(table.max_len)
      if store.raw_rows is not None:
        # Tier 'ram': one compiled call per step (_slab_kernel) on the raw bits; the ids
        # and lengths buffers are its scratch space.
        raw = store.raw_rows.dtype
        self._fused_args = (*self._matcher.kernel_args, np.empty(batch_size, np.int32),
                            np.empty(batch_size, np.int32), store.raw_rows, store.num_rows)
        self._raw_one = np.array(1, self._slab_dtype).view(raw)[()]
        self._raw_dtype = raw
      else:
        self._fused_args = None
    if loop not in ('device', 'host'):
      raise ValueError(f"loop={loop!r} must be 'device' or 'host'")
    if chunk_steps < 1:
      raise ValueError(f'chunk_steps={chunk_steps} must be >= 1')
    self.loop, self.chunk_steps = loop, chunk_steps
    self._cache = None
    if lookup == 'cache' and loop != 'device':
      raise ValueError("lookup='cache' runs inside the device loop; use loop='device'")
    self.lookup = self._resolve_lookup(lookup, cache_rows)
    if self.lookup != 'none' and loop == 'device':
      devices = {d for leaf in jax.tree.leaves(self.state) for d in leaf.devices()}
      if len(devices) > 1:
        # XLA's SPMD partitioner cannot split a side-effecting call (the lookup), so a
        # loop that makes one runs on one device; weights spread over several are copied
        # there (use loop='host' to decode with them sharded).
        self.state = jax.device_put(self.state, jax.devices()[0])
    self._chunk_programs = {}

  def _resolve_lookup(self, lookup: LookupMode, cache_rows: int) -> str:
    """The device loop's lookup mode, and its operand (native context / callback handle)."""
    if lookup not in ('auto', 'native', 'callback', 'cache'):
      raise ValueError(f"lookup={lookup!r} must be 'auto', 'native', 'callback' or 'cache'")
    self._target, self._native = '', None
    self._lookup_operand = np.int32(0)
    if self._hashed is not None:  # Hashing + gather run in numpy: the host callback.
      if lookup in ('native', 'cache'):
        raise ValueError(f"lookup='{lookup}' serves f-gram stores only; a hashed n-gram "
                         "run uses lookup='callback' (or 'auto')")
      self._lookup_operand = np.int32(device_loop.register_callback(self.step_slab))
      return 'callback'
    if self.store is None:
      return 'none'
    shards = native_lookup.store_shards(self.store)
    if lookup == 'cache':
      from scone_jax.serve import device_cache  # pylint: disable=g-import-not-at-top
      self._cache = device_cache.DeviceCache(
          self.store, self.table, cache_rows, self.batch_size,
          native=shards is not None and jax.default_backend() == 'cpu')
      self._target, self._lookup_operand = self._cache.target, self._cache.operand
      return 'cache'
    if lookup == 'native' and (shards is None or jax.default_backend() != 'cpu'):
      raise ValueError("lookup='native' needs the CPU backend and a store in memory or "
                       "memory-mapped (tier 'ram', or 'disk' with the memmap reader); use "
                       "lookup='callback' (or 'auto')")
    if lookup != 'callback' and shards is not None and jax.default_backend() == 'cpu':
      one = np.array(1, self._slab_dtype).view(shards[0][0].dtype)[()]
      try:
        self._native = native_lookup.LookupContext(self._matcher.kernel_args, *shards, one,
                                                   self.batch_size)
      except Exception as e:  # pylint: disable=broad-except
        if lookup == 'native':
          raise
        logging.warning('native f-gram lookup unavailable (%s); using the callback', e)
    if self._native is not None:
      self._target, self._lookup_operand = self._native.target, self._native.operand
      return 'native'
    self._lookup_operand = np.int32(device_loop.register_callback(self.step_slab))
    return 'callback'

  # -- host side -----------------------------------------------------------------------

  def _prompt_batch(self, prompts: Sequence[np.ndarray], max_new_tokens: int):
    """Validates prompts; returns BOS-prepended, right-padded tokens_BxT and lengths_B."""
    if not 1 <= len(prompts) <= self.batch_size:
      raise ValueError(f'got {len(prompts)} prompts for a decoder of batch_size='
                       f'{self.batch_size}; pass 1..{self.batch_size} prompts')
    rows = []
    for i, p in enumerate(prompts):
      p = np.asarray(p, np.int32).reshape(-1)
      if p.size == 0:
        raise ValueError(f'prompt {i} is empty; give at least one token (BOS is added)')
      rows.append(np.concatenate([[self.bos_id], p]).astype(np.int32))
    longest = max(r.size for r in rows)
    if longest + max_new_tokens > self.cache_len:
      raise ValueError(
          f'prompt of {longest} tokens (with BOS) + max_new_tokens={max_new_tokens} exceeds '
          f'the context of {self.cache_len} tokens (config.model.max_seq_len); shorten the '
          'prompt or lower max_new_tokens')
    # Padding T up to a multiple of 16 bounds the number of prefill compilations.
    t = min(-(-longest // 16) * 16, self.cache_len)
    tokens_BxT = np.zeros((self.batch_size, t), np.int32)
    lengths_B = np.ones(self.batch_size, np.int32)  # Unused rows hold just BOS.
    tokens_BxT[:, 0] = self.bos_id
    for b, r in enumerate(rows):
      tokens_BxT[b, :r.size] = r
      lengths_B[b] = r.size
    return tokens_BxT, lengths_B

  def _prompt_slab(self, tokens_BxT: np.ndarray, lengths_B: np.ndarray):
    """The prompts' f-gram rows for one prefill: slab_BxTxE on the device (None for the
    baseline), the matcher primed to continue every row.

    One compiled call matches every prompt position (`_prompt_kernel`: the incremental
    matcher run along each row from an empty history, equal to `table.match` with one
    segment per row) and, for the 'ram' tier, gathers the rows and match flags into the
    slab; the 'disk' tier gathers with one `store.gather`. One transfer follows.
    """
    if self._hashed is not None:
      return jax.device_put(self._hashed.prompt_slab(tokens_BxT, lengths_B))
    if self.store is None:
      return None
    b, t = tokens_BxT.shape
    start = time.perf_counter()
    ids_BxT = np.empty((b, t), np.int32)
    slab_BxTxE = np.empty((b, t, self._row_width + 1), self._slab_dtype)
    codes_BxL, index, limit = self._matcher.kernel_args
    if self._fused_args is not None:
      raw_BxTxE = slab_BxTxE.view(self._raw_dtype)
      hits = _prompt_kernel(tokens_BxT, lengths_B, codes_BxL, index, limit, ids_BxT,
                            self.store.raw_rows, self.store.num_rows,
                            raw_BxTxE.reshape(b * t, -1), self._raw_one)
      self.store.stats.add(b * t, hits, slab_BxTxE.nbytes, time.perf_counter() - start)
    else:
      _prompt_kernel(tokens_BxT, lengths_B, codes_BxL, index, limit, ids_BxT,
                     None, 0, None, 0)
      self.store.gather(ids_BxT.reshape(-1), out=slab_BxTxE.reshape(b * t, -1)[:, :-1])
      slab_BxTxE[..., -1] = ids_BxT >= 0
    return jax.device_put(slab_BxTxE)

  def step_slab(self, token_B: np.ndarray) -> jax.Array | np.ndarray:
    """The host's lookup for one decode step: pushes one new token per row into the
    matcher and gathers the f-gram rows -> slab_BxE (last column the match flag)."""
    if self._hashed is not None:
      return self._hashed.step_slab(token_B)
    if self.store is None:
      return self._no_match_BxE
    slab_BxE = np.empty((self.batch_size, self._row_width + 1), self._slab_dtype)
    if self._fused_args is None:
      ids_B, lens_B = self._matcher.push(token_B)
      self.store.gather(ids_B, out=slab_BxE[:, :-1])
      slab_BxE[:, -1] = lens_B > 1  # Matched (an f-gram has 2+ tokens).
      return slab_BxE
    # The same three steps as one compiled call: on the decode critical path every
    # Python-level numpy call costs microseconds (several times more in the loop, where
    # the device step has just evicted the host's caches).
    start = time.perf_counter()
    token_B = np.asarray(token_B)
    if token_B.shape != (self.batch_size,) or token_B.dtype.kind not in 'iu':
      raise ValueError(f'token_B must be integer ids of shape ({self.batch_size},), got '
                       f'{token_B.dtype}{list(token_B.shape)}')
    hits = _slab_kernel(token_B, *self._fused_args, slab_BxE.view(self._raw_dtype),
                        self._raw_one)
    if hits < 0:
      raise ValueError(f'token ids must be in [0, 2**31); got {token_B[-1 - hits]}')
    self.store.stats.add(self.batch_size, hits, self.batch_size * self._row_width *
                         self._slab_dtype.itemsize, time.perf_counter() - start)
    # Handed to the jitted step as numpy: its dispatch copies the small slab on the fast
    # path, whereas a separate jax.device_put first costs ~45 us more per step (CPU).
    return slab_BxE

  # -- generation ----------------------------------------------------------------------

  def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0,
               eos_id: int | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt (token ids, no BOS).

    Rows stop at `eos_id` (kept in the output); the batch stops when all rows have.
    """
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
    tokens_BxT, lengths_B = self._prompt_batch(prompts, max_new_tokens)
    key = jax.random.key(seed)
    if self.loop == 'device':
      return self._generate_device(len(prompts), tokens_BxT, lengths_B, max_new_tokens,
                                   sampling, key, eos_id)
    start = time.perf_counter()
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    _, next_B, cache = self._prefill(self.graphdef, sampling, False, self.state, tokens_BxT,
                                     slab_BxTxE, lengths_B, self._init_cache(),
                                     jax.random.fold_in(key, 0), combine=self._combine)
    out_BxN = np.zeros((self.batch_size, max_new_tokens), np.int32)
    # The sampled tokens stay on the device as the next step's input; the host copy
    # (token_B) only feeds the matcher and the output.
    token_B = np.asarray(next_B)
    prefill_seconds = time.perf_counter() - start
    done_B = np.zeros(self.batch_size, bool)
    lookup = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    steps = 0
    for n in range(max_new_tokens):
      if n + 1 < max_new_tokens and not done_B.all():
        t0 = time.perf_counter()
        slab_BxE = self.step_slab(token_B)
        lookup += time.perf_counter() - t0
        _, next_B, cache = self._decode(self.graphdef, sampling, self.state, next_B,
                                        slab_BxE, cache, key, np.int32(n + 1),
                                        combine=self._combine)
        steps += 1
      else:
        next_B = None
      # Bookkeeping for token n overlaps the device's work on token n + 1.
      out_BxN[:, n] = token_B
      if eos_id is not None:
        done_B |= token_B == eos_id
      if next_B is None:
        break
      token_B = np.asarray(next_B)
      if n == 0 and max_new_tokens > 2:
        # The first decode step may include its compilation: time the steady state.
        start, steps, lookup = time.perf_counter(), 0, 0.0
        cpu_start = time.process_time()
    decode_seconds = time.perf_counter() - start
    decode_cpu_seconds = time.process_time() - cpu_start
    return Generation(tokens=_cut_at_eos(out_BxN[:len(prompts), :n + 1], eos_id),
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                      decode_steps=steps, batch_size=self.batch_size, lookup_seconds=lookup,
                      decode_cpu_seconds=decode_cpu_seconds)

  def _chunk_program(self, sampling: Sampling):
    """The compiled device-loop chunk for `sampling`, bound to this decoder's weights,
    lookup and key; compiled before a generation is timed."""
    if sampling not in self._chunk_programs:
      static = (self.graphdef, sampling, self.lookup, self._target, self.chunk_steps,
                self._slab_dtype)
      cache = jax.eval_shape(self._init_cache)
      token_B = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
      if self.lookup == 'cache':  # The loop carries the matcher state too.
        token_B = (token_B, jax.ShapeDtypeStruct((self.batch_size, self.max_fgram_len - 1),
                                                 jnp.int32))
      scalar = jax.ShapeDtypeStruct((), jnp.int32)
      self._chunk_programs[sampling] = device_loop.DECODE_CHUNK.lower(
          *static, self.state, self._lookup_operand, token_B, cache,
          jax.ShapeDtypeStruct((self.batch_size,), bool), scalar, scalar, scalar,
          jax.random.key(0), combine=self._combine).compile()
    return self._chunk_programs[sampling]

  def _generate_device(self, num_prompts, tokens_BxT, lengths_B, max_new_tokens,
                       sampling, key, eos_id) -> Generation:
    program = self._chunk_program(sampling)
    start = time.perf_counter()
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    prompt_lookup = time.perf_counter() - start
    _, first_B, cache = self._prefill(self.graphdef, sampling, False, self.state, tokens_BxT,
                                      slab_BxTxE, lengths_B, self._init_cache(),
                                      jax.random.fold_in(key, 0), combine=self._combine)
    first_B.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    counters = None if self._native is None else self._native.counters.copy()
    token_state = None
    if self._cache is not None:
      # The prompt kernel left the host matcher primed: its state starts the device's.
      token_state = (first_B, jnp.asarray(self._matcher.kernel_args[0].astype(np.int32)))
      cache_counters = self._cache.counters.copy()
    start, cpu_start = time.perf_counter(), time.process_time()
    run = functools.partial(program, self.state, self._lookup_operand)
    tokens_BxN, steps = device_loop.ChunkRunner(
        lambda *a: run(*a, key), first_B, cache, eos_id, max_new_tokens,
        self.chunk_steps, token_state).run()
    decode_seconds = time.perf_counter() - start
    decode_cpu_seconds = time.process_time() - cpu_start
    if counters is not None:  # The native lookup counts in place of store.gather.
      hits, calls = self._native.counters - counters
      self.store.stats.add(int(calls) * self.batch_size, int(hits), int(calls) *
                           self.batch_size * self._row_width * self._slab_dtype.itemsize,
                           0.0)
    return Generation(tokens=_cut_at_eos(tokens_BxN[:num_prompts], eos_id),
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                      decode_steps=steps, batch_size=self.batch_size,
                      decode_cpu_seconds=decode_cpu_seconds,
                      prompt_lookup_seconds=prompt_lookup,
                      **self._cache_counts(cache_counters if self._cache else None))

  def _cache_counts(self, before) -> dict:
    """lookup='cache': the host's share of a generation, into Generation and store.stats."""
    if before is None:
      return {}
    rows, calls = (int(x) for x in self._cache.counters - before)
    if self._cache.target:  # The callback's store.gather counts itself.
      self.store.stats.add(rows, rows, rows * self.d_model * self._slab_dtype.itemsize, 0.0)
    return {'host_calls': calls, 'host_rows': rows}

  def teacher_forced_logits(self, prompts: Sequence[np.ndarray],
                            continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Float32 logits at every position of BOS+prompt+continuation via prefill + decode.

    The prompt goes through the prefill, each continuation token through one decode step
    (the serving path, store lookups included). Row i of the result has
    1 + len(prompt) + len(continuation) - 1 positions: the distribution after each input
    token except the last continuation token. Continuations must have equal lengths.
    """
    n = {len(c) for c in continuations}
    if len(n) != 1 or len(continuations) != len(prompts):
      raise ValueError('give one continuation per prompt, all of the same length')
    n = n.pop()
    tokens_BxT, lengths_B = self._prompt_batch(prompts, n)
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    greedy, key = Sampling(), jax.random.key(0)
    logits_BxTxV, _, cache = self._prefill(self.graphdef, greedy, True, self.state,
                                           tokens_BxT, slab_BxTxE, lengths_B,
                                           self._init_cache(), key, combine=self._combine)
    steps = []
    cont_BxN = np.zeros((self.batch_size, n), np.int32)
    for b, c in enumerate(continuations):
      cont_BxN[b] = c
    for i in range(max(n - 1, 0)):
      logits_BxV, _, cache = self._decode(self.graphdef, greedy, self.state, cont_BxN[:, i],
                                          self.step_slab(cont_BxN[:, i]), cache, key,
                                          np.int32(0), combine=self._combine)
      steps.append(np.asarray(logits_BxV))
    logits_BxTxV = np.asarray(logits_BxTxV)
    out = []
    for b in range(len(prompts)):
      rows = [logits_BxTxV[b, :lengths_B[b]]] + [s[b:b + 1] for s in steps]
      out.append(np.concatenate(rows, axis=0))
    return out

  def compiled_decode_step(self, sampling: Sampling = Sampling()):
    """The compiled decode step for this decoder's shapes (for XLA cost analysis)."""
    cache = jax.eval_shape(self._init_cache)
    token_B = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
    return self._decode.lower(self.graphdef, sampling, self.state, token_B,
                              self._no_match_BxE, cache, jax.random.key(0),
                              np.int32(0), combine=self._combine).compile()


def _cut_at_eos(tokens_BxN: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
  """Each row's tokens up to and including its first `eos_id`."""
  out = []
  for row in tokens_BxN:
    if eos_id is not None and (row == eos_id).any():
      row = row[:int(np.argmax(row == eos_id)) + 1]
    out.append(row)
  return out
