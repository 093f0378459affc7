"""lookup='callback': the f-gram match and the store gather on the host.

Dimension letters: B batch, T padded prompt length, L = K - 1 matcher levels, W the stored
row width, E = W + 1 (a slab row: the f-gram row, then the match flag), R store rows.

Per decode step the host (1) pushes each sequence's new token into an
`IncrementalMatcher`, which returns the longest f-gram ending there, (2) gathers those
rows from the `EmbeddingStore` into one [B, E] slab whose last column is the match flag,
and (3) hands the slab to the jitted step (one small transfer per step). For the 'ram'
tier (1)-(2) are one compiled call (`_slab_kernel`) on the rows' raw bits. Steps (1)-(3)
need token t, so they sit between two device steps: they are SCONE's whole per-step cost
over the baseline (benchmarks/bench_decode.py prints it: ~2 us isolated, ~10-20 us inside
the CPU decode loop, whose device step has just evicted the host's caches). The store is
never indexed inside jit (docs/METHOD.md, section 4: a pinned_host table indexed in jit
fails or runs slow host compute). The device loop reaches `step_slab` through
`io_callback` (serve/lookup.py); serve/native_lookup.py and serve/device_cache.py reuse
this class's prompt path and host step.
"""

from __future__ import annotations

import time
from typing import Any

import numba
import numpy as np

from scone_jax.fgrams import IncrementalMatcher
from scone_jax.fgrams.match import push_kernel
from scone_jax.serve import lookup as lookup_lib
from scone_jax.serve.store import EmbeddingStore, gather_kernel


@numba.njit(nogil=True, cache=True)
def _slab_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B, rows_RxW, num_rows,
                 slab_BxE, one):
  """IncrementalMatcher.push + EmbeddingStore.gather + the match flag, on raw bits; returns
  the number of matched rows, or -1 - b for the first row b with an invalid token."""
  bad = push_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B)
  if bad >= 0:
    return -1 - bad
  hits = gather_kernel(rows_RxW, ids_B, num_rows, slab_BxE[:, :-1])
  for b in range(ids_B.size):
    slab_BxE[b, -1] = one if lens_B[b] > 1 else 0
  return hits


@numba.njit(nogil=True, cache=True)
def _prompt_kernel(tokens_BxT, lengths_B, codes_BxL, index, limit, ids_BxT, rows_RxW,
                   num_rows, slab_NxE, one):
  """Matches every prompt row (positions < lengths_B[b]; later ones get -1) by pushing its
  tokens into a fresh incremental matcher, which ends primed with the row's last K-1
  tokens. With `rows_RxW` (raw bits) also fills slab_NxE (N = B*T positions): the
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
      if rows_RxW is not None:
        row = ids_BxT[r, j] if ids_BxT[r, j] >= 0 else num_rows
        slab_NxE[r * t + j, :-1] = rows_RxW[row, :]
        slab_NxE[r * t + j, -1] = one if ids_BxT[r, j] >= 0 else 0
  return hits


class HostLookup(lookup_lib.CallbackLookup):
  """The f-gram store's rows by a host match + gather.

  Args:
    store: the exported store (rows of the table, in the table's order).
    table: the f-gram table it was exported from (`IncrementalMatcher(table, B)`).
    batch_size: B.
    rule: the steps' combine rule for the store's rows.
  """

  name = 'callback'

  def __init__(self, store: EmbeddingStore, table: Any, batch_size: int, rule: str):
    super().__init__(store, batch_size, store.row_width, store.dtype, rule)
    self.matcher = IncrementalMatcher(table, batch_size)
    self.max_fgram_len = int(table.max_len)
    self._fused_args = None
    if store.raw_rows is not None:
      # Tier 'ram': one compiled call per step (_slab_kernel) on the raw bits; the ids
      # and lengths buffers are its scratch space.
      self._raw_dtype = store.raw_rows.dtype
      self._fused_args = (*self.matcher.kernel_args, np.empty(batch_size, np.int32),
                          np.empty(batch_size, np.int32), store.raw_rows, store.num_rows)
      self._raw_one = np.array(1, self.slab_dtype).view(self._raw_dtype)[()]

  def prompt_slab(self, tokens_BxT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    """One compiled call matches every prompt position (`_prompt_kernel`: the incremental
    matcher run along each row from an empty history, equal to `table.match` with one
    segment per row) and, for the 'ram' tier, gathers the rows and match flags into the
    slab; the 'disk' tier gathers with one `store.gather`."""
    b, t = tokens_BxT.shape
    start = time.perf_counter()
    ids_BxT = np.empty((b, t), np.int32)
    slab_BxTxE = np.empty((b, t, self.row_width + 1), self.slab_dtype)
    codes_BxL, index, limit = self.matcher.kernel_args
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
    return slab_BxTxE

  def step_slab(self, token_B: np.ndarray) -> np.ndarray:
    """Pushes one new token per row into the matcher and gathers the f-gram rows."""
    slab_BxE = np.empty((self.batch_size, self.row_width + 1), self.slab_dtype)
    if self._fused_args is None:
      ids_B, lens_B = self.matcher.push(token_B)
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
    self.store.stats.add(self.batch_size, hits, self.batch_size * self.row_width *
                         self.slab_dtype.itemsize, time.perf_counter() - start)
    # Handed to the jitted step as numpy: its dispatch copies the small slab on the fast
    # path, whereas a separate jax.device_put first costs ~45 us more per step (CPU).
    return slab_BxE
