"""Host-side lookup of hashed n-gram embeddings (fgram_model.kind='hashed') for decoding.

Dimension letters: B batch, T prompt length, O = hash_max_n - 1 orders, D d_model,
E = D + 1 (a slab row: the summed n-gram vector, then the flag "some order is valid").

The exported store holds s * E_n for every order (export.export_hashed): [O * M, D]. Like
SCONE's f-gram store it stays on the host, so the accelerator holds only the backbone (equal
accelerator memory). Per decoded token the host hashes the n-grams ending at the token from
each row's last hash_max_n tokens (`model.hashed.history_rows_np`, the same hash as
training), gathers the O rows in one `EmbeddingStore.gather`, sums them in float32 in order
n = 2, 3, ... (as the training forward does) and hands the decode step one [B, E] slab in
the model's compute dtype. The step adds it: x = T(x_i) + slab where the flag is set
(serve/steps.py `inputs` with rule 'add'): D adds per token over the baseline's step. The
prompt goes through the same path in one batched host call (`prompt_slab`); the device loop
reaches `step_slab` through the host callback (serve/lookup.py).
"""

from __future__ import annotations

import numpy as np

from scone_jax.model.hashed import hash_fingerprint, history_rows_np, prompt_rows_np
from scone_jax.serve import lookup as lookup_lib
from scone_jax.serve.store import EmbeddingStore


def is_hashed_store(store: EmbeddingStore) -> bool:
  """Whether `store` holds hashed n-gram tables (export_hashed) rather than f-gram rows."""
  return 'hash_max_n' in store.manifest


class HashedLookup(lookup_lib.CallbackLookup):
  """Per-row token history + the store: `prompt_slab` primes it, `step_slab` advances it.

  Args:
    store: the exported hashed store (its manifest records hash_max_n and hash_buckets).
    batch_size: B.
    slab_dtype: the dtype the decode step adds (the model's compute dtype).
  """

  name = 'callback'

  def __init__(self, store: EmbeddingStore, batch_size: int, slab_dtype):
    manifest = store.manifest
    if 'hash_max_n' not in manifest or 'hash_buckets' not in manifest:
      raise ValueError(f'{store.path} is not a hashed n-gram store (its manifest has no '
                       "hash_max_n/hash_buckets): export a run with fgram_model.kind='hashed'")
    self.max_n, self.buckets = int(manifest['hash_max_n']), int(manifest['hash_buckets'])
    if store.num_rows != (self.max_n - 1) * self.buckets:
      raise ValueError(f'{store.path} has {store.num_rows} rows, expected (hash_max_n - 1) '
                       f'* hash_buckets = {(self.max_n - 1) * self.buckets}')
    if manifest.get('table_fingerprint') != hash_fingerprint(self.max_n, self.buckets):
      raise ValueError(f'{store.path} was hashed with another function (table_fingerprint '
                       f"{manifest.get('table_fingerprint')!r}); re-export it with this "
                       'version of scone_jax')
    # Over-Encoding adds the summed rows to T(x_i): the rule 'add' (model/combine.py).
    super().__init__(store, batch_size, store.d_model, slab_dtype, 'add')
    self.d_model = store.d_model
    self._history_BxH = np.zeros((batch_size, self.max_n), np.int64)
    self._count_B = np.zeros(batch_size, np.int64)

  def _sum(self, rows_NxO: np.ndarray, out_NxE: np.ndarray) -> None:
    """Gathers every row in one call and writes the float32 sums and flags into out."""
    n, o = rows_NxO.shape
    gathered_NxOxD = self.store.gather(rows_NxO.reshape(-1)).reshape(n, o, self.d_model)
    acc_NxD = np.zeros((n, self.d_model), np.float32)
    for j in range(o):  # The training forward's order; invalid orders gathered zeros.
      acc_NxD = acc_NxD + gathered_NxOxD[:, j].astype(np.float32)
    out_NxE[:, :-1] = acc_NxD
    out_NxE[:, -1] = (rows_NxO >= 0).any(axis=1)

  def prompt_slab(self, tokens_BxT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    """slab_BxTxE for the prompts (BOS first, positions >= lengths_B get zeros), and the
    history primed with each row's last tokens."""
    b, t = tokens_BxT.shape
    rows_BxTxO = prompt_rows_np(tokens_BxT, lengths_B, self.max_n, self.buckets)
    slab_BxTxE = np.empty((b, t, self.d_model + 1), self.slab_dtype)
    self._sum(rows_BxTxO.reshape(b * t, -1), slab_BxTxE.reshape(b * t, -1))
    self._history_BxH[:] = 0
    for r in range(b):
      last = tokens_BxT[r, max(0, lengths_B[r] - self.max_n):lengths_B[r]]
      self._history_BxH[r, self.max_n - last.size:] = last
    self._count_B[:] = lengths_B
    return slab_BxTxE

  def step_slab(self, token_B: np.ndarray) -> np.ndarray:
    """Appends one token per row; slab_BxE of the n-grams ending at it."""
    token_B = np.asarray(token_B)
    if token_B.shape != (self.batch_size,) or token_B.dtype.kind not in 'iu':
      raise ValueError(f'token_B must be integer ids of shape ({self.batch_size},), got '
                       f'{token_B.dtype}{list(token_B.shape)}')
    self._history_BxH[:, :-1] = self._history_BxH[:, 1:]
    self._history_BxH[:, -1] = token_B
    self._count_B += 1
    rows_BxO = history_rows_np(self._history_BxH, self._count_B, self.max_n, self.buckets)
    slab_BxE = np.empty((self.batch_size, self.d_model + 1), self.slab_dtype)
    self._sum(rows_BxO, slab_BxE)
    return slab_BxE
