"""lookup='cache' and 'device': the f-gram match on the device, the hottest rows resident
there, the host asked only for the rows the cache misses (by a compiled FFI gather, no
Python), and not at all on a step where every row hits.

Dimension letters: B batch, L = K - 1 matcher levels, S table rows, C cached rows,
W the stored row width (D, or D + 4 quantised), E = W + 1 (slab row: f-gram row, then the
match flag).

The per-step lookup of the other modes (serve/lookup.py) is a host call on every
step, on the critical path between two device steps. Here the device does what it can:
  * Match. The table's match index (fgrams/index.py: an f-gram of n tokens is the pair
    (row of its (n-1)-token prefix, its last token), n = 2: (first token, last token))
    goes to the device as three int32 arrays sorted by that pair (`MatchIndex`: 12 bytes
    per row), and the loop carries the matcher's state (`IncrementalMatcher`: the rows of
    the 1..K-1-grams ending at the previous token, level 0 the token itself). A step runs
    the host matcher's chain (level n: the pair (level n-2 state, new token); the first
    miss ends it) as L binary searches over the sorted pairs, all levels at once. Same
    pairs, same chain: the same row as the host matcher, bit for bit.
  * Cache. Table rows are in rank order (count desc), so the C most frequent f-grams are
    rows [0, C): they sit on the device as rows_CxW in the store's dtype (C x W x itemsize
    bytes of accelerator memory) and are gathered there.
  * Misses. A row >= C comes from the host store through one call for the batch (ids of
    the other rows -1): the XLA FFI gather of serve/ffi_gather.py (C++, built for the CPU
    backend or for CUDA; the 'ram' tier or the memmapped 'disk' tier), else (lookup='cache'
    only) a host callback. Either way the rows cross as the raw bits of the store's dtype
    and are bitcast on the device. The call sits inside `lax.cond`, so a step whose rows
    all hit the cache (or match nothing) makes no host call at all.
lookup='device' is this with the FFI gather required and C = serve.cache_rows (default 0);
on a CUDA GPU, lookup='auto' picks it (serve/factory.py).
The host matcher is not advanced during the loop (the next generation primes it again).
Accelerator memory: 12 S bytes for the match index plus C W itemsize for the rows
(`DeviceCacheLookup.device_bytes`); the FLOPs of a step stay the backbone's (comparisons of
L log2 S binary-search steps per row; tests compare XLA's counts with the baseline's).
Measured (BENCHMARKS.md): on the CPU backend it is slower than lookup='native', whose host
call costs ~2 us, while the binary searches run as a loop of small XLA:CPU ops; and on text
a top-C cache misses on almost every step at B >= 16 (long-tailed f-grams), so it saves
host rows and transfer, not the per-step host sync. It is meant for accelerators.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scone_jax.fgrams import index as index_lib
from scone_jax.serve import ffi_gather
from scone_jax.serve import lookup as lookup_lib
from scone_jax.serve.host_lookup import HostLookup


class MatchIndex:
  """The table's match pairs for the device: a_S (prefix row, or -1 - first token for a
  bigram), b_S (last token) and row_S, sorted by (a, b); only rows < the table's limit."""

  def __init__(self, table):
    _, limit = table.index
    keys = np.asarray(table.keys)[:limit]
    if limit >= 1 << 31:
      raise ValueError(f'the device match index holds rows < 2**31; this table has {limit}')
    code = (keys >> np.uint64(index_lib.TOKEN_BITS)).astype(np.int64)
    b = (keys & np.uint64((1 << index_lib.TOKEN_BITS) - 1)).astype(np.int64)
    # Bigram codes are TOKEN_CODE + first token: stored as -1 - token, below every row.
    a = np.where(code >= index_lib.TOKEN_CODE, -1 - (code - index_lib.TOKEN_CODE), code)
    order = np.lexsort((b, a))
    self.a_S = a[order].astype(np.int32)
    self.b_S = b[order].astype(np.int32)
    self.row_S = order.astype(np.int32)  # keys_S is in row order: position = row.
    self.levels = table.max_len - 1

  @property
  def nbytes(self) -> int:
    return self.a_S.nbytes + self.b_S.nbytes + self.row_S.nbytes


def find(a_S, b_S, row_S, qa_N, qb_N):
  """Inside jit: the row of each query pair (qa_N, qb_N) in the sorted pairs, -1 if
  absent (a lower-bound binary search, ceil(log2(S + 1)) steps)."""
  s = a_S.shape[0]
  if s == 0:
    return jnp.full(qa_N.shape, -1, jnp.int32)
  lo = jnp.zeros(qa_N.shape, jnp.int32)
  hi = jnp.full(qa_N.shape, s, jnp.int32)

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    am, bm = a_S[mid], b_S[mid]
    less = (am < qa_N) | ((am == qa_N) & (bm < qb_N))
    open_ = lo < hi
    return jnp.where(open_ & less, mid + 1, lo), jnp.where(open_ & ~less, mid, hi)

  lo, _ = jax.lax.fori_loop(0, int(s).bit_length(), body, (lo, hi))
  at = jnp.minimum(lo, s - 1)
  found = (lo < s) & (a_S[at] == qa_N) & (b_S[at] == qb_N)
  return jnp.where(found, row_S[at], -1)


def push(a_S, b_S, row_S, codes_BxL, token_B):
  """Inside jit: `IncrementalMatcher.push` on the device. codes_BxL: the rows of the
  1..K-1-grams ending at the previous token (level 0 the token), -1 none. Returns
  (row_B of the longest f-gram ending at token_B, -1 none; codes_BxL after the push)."""
  b, levels = codes_BxL.shape
  # Level n - 2 of the state with the new token is the key of the n-gram (n = 2..K).
  qa_BxL = jnp.where(jnp.arange(levels) == 0, -1 - codes_BxL, codes_BxL)
  qb_BxL = jnp.broadcast_to(token_B[:, None], (b, levels))
  rows_BxL = find(a_S, b_S, row_S, qa_BxL.reshape(-1), qb_BxL.reshape(-1)).reshape(b, levels)
  # The host chain stops at the first level whose state is -1 or whose key is absent.
  alive_BxL = jnp.cumprod(((codes_BxL >= 0) & (rows_BxL >= 0)).astype(jnp.int32),
                         axis=1).astype(bool)
  rows_BxL = jnp.where(alive_BxL, rows_BxL, -1)
  longest = jnp.sum(alive_BxL, axis=1)  # Levels matched: the f-gram has longest + 1 tokens.
  row_B = jnp.where(longest > 0,
                    jnp.take_along_axis(rows_BxL, jnp.maximum(longest - 1, 0)[:, None],
                                        axis=1)[:, 0], -1)
  codes_BxL = jnp.concatenate([token_B[:, None].astype(jnp.int32), rows_BxL[:, :-1]], axis=1)
  return row_B, codes_BxL


@dataclasses.dataclass(frozen=True)
class CacheStep:
  """`loop_step` of lookup='cache' and 'device': (operand, token_B, codes_BxL) -> (slab_BxE
  for token_B, codes_BxL after the push). target: the miss gather's FFI target
  (serve/ffi_gather.py; '' = host callback). The rows cross as raw bits, bitcast here."""
  target: str
  row_width: int
  dtype: np.dtype

  def __call__(self, operand, token_B, codes_BxL):
    row_B, codes_BxL = push(operand['a'], operand['b'], operand['row'], codes_BxL, token_B)
    rows_CxW = operand['rows']  # Raw bits of the store's dtype.
    c = rows_CxW.shape[0]
    miss_B = row_B >= c
    shape = jax.ShapeDtypeStruct((token_B.shape[0], self.row_width), rows_CxW.dtype)

    def from_host(ids_B):
      if self.target:
        return ffi_gather.gather_call(self.target, ids_B, operand['host'], shape)
      return lookup_lib.call_host(operand['host'], ids_B, shape)

    host_BxW = jax.lax.cond(jnp.any(miss_B), from_host,
                            lambda ids_B: jnp.zeros(shape.shape, shape.dtype),
                            jnp.where(miss_B, row_B, -1))
    if c:
      cached_BxW = jnp.where((row_B >= 0)[:, None], rows_CxW[jnp.clip(row_B, 0, c - 1)], 0)
      rows_BxW = jnp.where(miss_B[:, None], host_BxW, cached_BxW)  # No match: zeros.
    else:
      rows_BxW = host_BxW
    flag_Bx1 = (row_B >= 0)[:, None].astype(self.dtype)
    rows_BxW = jax.lax.bitcast_convert_type(rows_BxW, jnp.dtype(self.dtype))
    return jnp.concatenate([rows_BxW, flag_Bx1], axis=1), codes_BxL


class DeviceCacheLookup(HostLookup):
  """lookup='cache' and 'device': one decoder's device match index, cached rows and miss
  path. The prompt and the host steps (host loop, teacher forcing) are `HostLookup`'s; the
  device loop starts from the matcher state the prompt left.

  Args:
    store, table, batch_size, rule: as `HostLookup`'s (rows of the store = rows of the
      table).
    rows: C, the most frequent f-grams kept on the device (capped at the table's size).
    shards: `native_lookup.store_shards(store)` and target: the FFI gather's target
      (`ffi_gather.target`) for the misses; target '' (shards unused): a host callback.
    name: 'cache' (the callback where the FFI gather is unavailable) or 'device' (the
      factory's FFI-only mode; its default C is 0: every matched row from the host).
  Attributes: `rows` (C), `native` (misses through the FFI gather), `device_bytes`;
  `counters()`: (rows served by the host, host calls), counted by the FFI gather and the
  callback alike.
  """

  def __init__(self, store, table, batch_size: int, rule: str, rows: int,
               shards: tuple[list[np.ndarray], int] | None, target: str, name: str = 'cache'):
    if rows < 0:
      raise ValueError(f'cache rows={rows} must be >= 0 (config.serve.cache_rows)')
    super().__init__(store, table, batch_size, rule)
    self.name = name
    self.index = MatchIndex(table)
    self.rows = min(rows, self.index.row_S.size)
    self.native = bool(target)
    self._target = target
    # Raw bits (uint16 for bf16/fp16, uint8 for int8/fp8): XLA:CPU would convert a bf16
    # operand of the gather to f32 as a whole, C x W work on every step; integers gather
    # as they are, and no float8 crosses a host boundary.
    self.raw = lookup_lib.raw_dtype(store.dtype)
    rows_CxW = store.gather(np.arange(self.rows, dtype=np.int64)).view(self.raw)
    if target:
      self._gather = ffi_gather.GatherContext(*shards, batch_size)
      self._host_counts = self._gather.counters
      host = self._gather.operand
    else:
      self._host_counts = np.zeros(2, np.int64)
      host = jnp.int32(lookup_lib.register_callback(self.host_rows))
    self._operand = {'a': jnp.asarray(self.index.a_S), 'b': jnp.asarray(self.index.b_S),
                     'row': jnp.asarray(self.index.row_S), 'rows': jnp.asarray(rows_CxW),
                     'host': host}

  @property
  def device_bytes(self) -> int:
    """Accelerator memory: the match index plus the cached rows."""
    return self.index.nbytes + self.rows * self.row_width * self.store.dtype.itemsize

  def host_rows(self, ids_B: np.ndarray) -> np.ndarray:
    """The callback miss path: rows_BxW of the store for ids_B >= 0, zeros elsewhere."""
    ids_B = np.asarray(ids_B, np.int64)
    self._host_counts += (int((ids_B >= 0).sum()), 1)
    return self.store.gather(ids_B).view(self.raw)  # -1: a zero row.

  @property
  def loop_step(self):
    return CacheStep(self._target, self.row_width, self.slab_dtype)

  @property
  def loop_operand(self):
    return self._operand

  def loop_state(self, first_B):
    # The prompt kernel left the host matcher primed: its state starts the device's.
    return jnp.asarray(self.matcher.kernel_args[0].astype(np.int32))

  def counters(self) -> np.ndarray:
    return self._host_counts.copy()

  def settle(self, before: np.ndarray) -> dict[str, int]:
    rows, calls = (int(x) for x in self._host_counts - before)
    if self._target:  # The callback's store.gather counts itself.
      self.store.stats.add(rows, rows, rows * self.row_width * self.slab_dtype.itemsize,
                           0.0)
    return {'host_calls': calls, 'host_rows': rows}

  def stats(self) -> dict:
    return {**super().stats(), 'cache_rows': self.rows, 'native_misses': self.native,
            'device_bytes': self.device_bytes}
