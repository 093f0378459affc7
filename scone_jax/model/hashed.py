"""Hashed n-gram input embeddings (fgram_model.kind='hashed'), in the style of Over-Encoding.

Dimension letters: B batch, T length, O = hash_max_n - 1 n-gram orders (n = 2..hash_max_n),
M = hash_buckets rows per order, D d_model, N n-grams.

At position i every n-gram ENDING at i, x_{i-n+1..i} for n = 2..hash_max_n, is hashed into
one of M buckets of its order's table E_n, and the input embedding is

  x_i = T(x_i) + sum over valid n of s * E_n[h_n(x_{i-n+1..i})],   s = 1 / sqrt(O).

An n-gram is valid only when it lies inside the position's own document (segment): with
`positions_BxT` restarting at 0 at every segment start (BOS, or a continuation chunk), order
n is valid iff position >= n - 1. BOS is a token like any other here (it marks "this n-gram
starts the document"); serving prepends it too. The O tables are one parameter
[O * M, D]: order n's rows are [(n - 2) * M, (n - 1) * M). They start at ZERO, so at step 0
the model computes exactly the baseline's function (the backbone is created first from the
same seed, and the zeros consume no randomness); Adam then moves every used row. s keeps
the sum's step-0 growth rate near one table's (O tables of independent updates).

The hash (`HASH_VERSION`), one function for the host (numpy) and one for the device (jnp,
uint32 arithmetic: JAX runs with x64 off), both wrapping modulo 2**32:
  h = (0x9E3779B9 * n) mod 2**32                      (order salt)
  for each token t of the n-gram, oldest first:  h = ((h XOR t) * 0x01000193) mod 2**32
  h = fmix32(h)   (MurmurHash3's finaliser: xor-shift 16, * 0x85EBCA6B, xor-shift 13,
                   * 0xC2B2AE35, xor-shift 16)
  bucket = h mod M
FNV-1a's step over whole 32-bit token ids is injective in the last token for a fixed
prefix; the finaliser spreads every input bit over the low bits that `mod M` keeps.

Over-Encoding indexes n-grams by their exact id modulo M and splits tables into slices;
docs/METHOD.md ("Hashed n-gram embeddings") says where this differs and why.
"""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scone_jax.config import FgramModelConfig, ModelConfig
from scone_jax.model.sharding import param

HASH_VERSION = 'scone_jax.hashed/v1 fnv1a32-words+fmix32'
_GOLDEN, _FNV_PRIME = 0x9E3779B9, 0x01000193
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_U32 = 0xFFFFFFFF


def order_scale(max_n: int) -> float:
  """s = 1 / sqrt(number of orders), the fixed factor on every n-gram row."""
  return 1.0 / math.sqrt(max_n - 1)


def hash_fingerprint(max_n: int, buckets: int) -> str:
  """Identifies the bucket function (version, orders, M): what a store's rows mean.

  Recorded as the exported store's `table_fingerprint` (the field SCONE fills with the
  f-gram table's), so a store is never served under another hash."""
  text = f'{HASH_VERSION} max_n={max_n} buckets={buckets}'
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_reference(ngram: tuple[int, ...] | list[int], buckets: int) -> int:
  """The bucket of one n-gram in plain Python integers (the spec the fast paths match)."""
  h = (_GOLDEN * len(ngram)) & _U32
  for t in ngram:
    h = ((h ^ int(t)) * _FNV_PRIME) & _U32
  h ^= h >> 16
  h = (h * _M1) & _U32
  h ^= h >> 13
  h = (h * _M2) & _U32
  h ^= h >> 16
  return h % buckets


def hash_ngrams_np(ngrams_NxN: np.ndarray, buckets: int) -> np.ndarray:
  """Buckets of N n-grams of one order ([N, n] int, tokens oldest first) -> int64 [N]."""
  ngrams_NxN = np.asarray(ngrams_NxN)
  if ngrams_NxN.ndim != 2 or ngrams_NxN.dtype.kind not in 'iu':
    raise ValueError(f'n-grams must be an integer [N, n] array, got '
                     f'{ngrams_NxN.dtype}{list(ngrams_NxN.shape)}')
  n = ngrams_NxN.shape[1]
  tok = ngrams_NxN.astype(np.uint32)
  # uint32 arrays wrap modulo 2**32 without warnings (numpy scalars would warn).
  h = np.full(tok.shape[0], (_GOLDEN * n) & _U32, np.uint32)
  for j in range(n):
    h = (h ^ tok[:, j]) * np.uint32(_FNV_PRIME)
  h ^= h >> np.uint32(16)
  h *= np.uint32(_M1)
  h ^= h >> np.uint32(13)
  h *= np.uint32(_M2)
  h ^= h >> np.uint32(16)
  return (h % np.uint32(buckets)).astype(np.int64)


def hash_ngrams_jnp(tokens_Nxn: list[jax.Array], buckets: int) -> jax.Array:
  """The same hash on the device: `tokens_Nxn` is a list of n same-shape int arrays
  (oldest token first); returns int32 buckets of that shape."""
  n = len(tokens_Nxn)
  h = jnp.full(tokens_Nxn[0].shape, (_GOLDEN * n) & _U32, jnp.uint32)
  for t in tokens_Nxn:
    h = (h ^ t.astype(jnp.uint32)) * jnp.uint32(_FNV_PRIME)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  h = h ^ (h >> 16)
  return (h % jnp.uint32(buckets)).astype(jnp.int32)


def bucket_rows_jnp(inputs_BxT: jax.Array, positions_BxT: jax.Array, max_n: int,
                    buckets: int) -> tuple[jax.Array, jax.Array]:
  """Table rows of every order at every position -> (rows_BxTxO int32, valid_BxTxO).

  rows already carry the order offset (n - 2) * M; invalid entries (position < n - 1, the
  n-gram would reach before its segment's start) point at row 0 and are masked by valid.
  """
  b, t = inputs_BxT.shape
  rows, valid = [], []
  for n in range(2, max_n + 1):
    # Token at i - j, for j = n-1 (oldest) .. 0; positions before the row start are padded
    # with 0 and are never valid (position < n - 1 there).
    shifted = [jnp.pad(inputs_BxT, ((0, 0), (j, 0)))[:, :t] for j in range(n - 1, -1, -1)]
    rows.append(hash_ngrams_jnp(shifted, buckets) + (n - 2) * buckets)
    valid.append(positions_BxT >= n - 1)
  return jnp.stack(rows, axis=-1), jnp.stack(valid, axis=-1)


def history_rows_np(history_BxH: np.ndarray, count_B: np.ndarray, max_n: int,
                    buckets: int) -> np.ndarray:
  """Host twin of `bucket_rows_jnp` for the LAST position of each row.

  `history_BxH` holds each row's last H = max_n tokens, newest last (older slots are
  don't-cares until filled); `count_B` how many tokens the row has seen since BOS, BOS
  included. Returns int64 rows_BxO with -1 (the store's zero row) where the order is not
  valid (count < n)."""
  b = history_BxH.shape[0]
  out = np.full((b, max_n - 1), -1, np.int64)
  for n in range(2, max_n + 1):
    ok = count_B >= n
    if ok.any():
      out[ok, n - 2] = hash_ngrams_np(history_BxH[ok, -n:], buckets) + (n - 2) * buckets
  return out


def prompt_rows_np(tokens_BxT: np.ndarray, lengths_B: np.ndarray, max_n: int,
                   buckets: int) -> np.ndarray:
  """Rows of every order at every prompt position (BOS at position 0) -> int64
  rows_BxTxO, -1 where the order is not valid or the position is past the prompt."""
  b, t = tokens_BxT.shape
  out = np.full((b, t, max_n - 1), -1, np.int64)
  pos_T = np.arange(t)
  for n in range(2, max_n + 1):
    if t < n:
      continue
    # [B, T - n + 1, n] windows ending at positions n - 1 .. T - 1.
    win = np.lib.stride_tricks.sliding_window_view(tokens_BxT, n, axis=1)
    rows = hash_ngrams_np(win.reshape(-1, n), buckets).reshape(b, t - n + 1)
    ok = pos_T[None, n - 1:] < lengths_B[:, None]
    out[:, n - 1:, n - 2] = np.where(ok, rows + (n - 2) * buckets, -1)
  return out


class HashedNgramEmbed(nnx.Module):
  """The O hashed n-gram tables as one [O * M, D] parameter (zero at init)."""

  def __init__(self, model_cfg: ModelConfig, fgram_model_cfg: FgramModelConfig):
    self.max_n = fgram_model_cfg.hash_max_n
    self.buckets = fgram_model_cfg.hash_buckets
    self.scale = order_scale(self.max_n)
    rows = (self.max_n - 1) * self.buckets
    self.table = param(jnp.zeros((rows, model_cfg.d_model),
                                 jnp.dtype(model_cfg.param_dtype)),
                       ('ngram_rows', 'embed'))

  def __call__(self, inputs_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """sum over valid orders of s * E_n[h_n] -> float32 e_BxTxD (zero where none is valid).

    Summed in float32 in order n = 2, 3, ...: the host store path (serve/hashed.py) adds
    the exported rows (already times s) in the same order, so fp32 serving matches.
    """
    rows_BxTxO, valid_BxTxO = bucket_rows_jnp(inputs_BxT, positions_BxT, self.max_n,
                                              self.buckets)
    table = self.table[...]
    e_BxTxD = jnp.zeros((*inputs_BxT.shape, table.shape[-1]), jnp.float32)
    for o in range(self.max_n - 1):
      r_BxTxD = jnp.take(table, rows_BxTxO[..., o], axis=0).astype(jnp.float32)
      e_BxTxD = e_BxTxD + jnp.where(valid_BxTxO[..., o, None], r_BxTxD * self.scale, 0.0)
    return e_BxTxD


def _ngram_keys(grams_NxN: np.ndarray) -> np.ndarray:
  """Exact keys for distinct-counting: packed into uint64 when the ids fit, else rows as
  opaque bytes."""
  n = grams_NxN.shape[1]
  bits = max(int(grams_NxN.max(initial=0)).bit_length(), 1)
  if bits * n <= 64:
    key = np.zeros(grams_NxN.shape[0], np.uint64)
    for j in range(n):
      key = (key << np.uint64(bits)) | grams_NxN[:, j].astype(np.uint64)
    return key
  rows = np.ascontiguousarray(grams_NxN.astype(np.int64))
  return rows.view(np.dtype((np.void, 8 * n))).reshape(-1)


def collision_stats(docs, max_n: int, buckets: int, bos_id: int,
                    max_tokens: int = 20_000_000) -> dict:
  """Per order n: distinct n-grams of the documents, buckets used, and the fraction of
  n-gram OCCURRENCES whose bucket also holds another distinct n-gram (a collision the
  model cannot tell apart).

  Documents are read as the batches read them, `[BOS] + doc`, and an n-gram never
  crosses a document boundary. Reading stops after the document that reaches
  `max_tokens` tokens (recorded as `tokens_counted`; 0 = no limit).
  """
  parts, pos_parts, tokens, num_docs = [], [], 0, 0
  for doc in docs:
    doc = np.asarray(doc)
    parts.append(np.concatenate([[bos_id], doc]).astype(np.int64))
    pos_parts.append(np.arange(doc.size + 1))
    tokens += doc.size + 1
    num_docs += 1
    if max_tokens and tokens >= max_tokens:
      break
  stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
  orders = {}
  for n in range(2, max_n + 1):
    ends = np.flatnonzero(pos >= n - 1)
    grams = np.stack([stream[ends - j] for j in range(n - 1, -1, -1)], axis=1) if (
        ends.size) else np.zeros((0, n), np.int64)
    keys, first, counts = np.unique(_ngram_keys(grams), return_index=True,
                                    return_counts=True)
    bucket_U = hash_ngrams_np(grams[first], buckets) if keys.size else np.zeros(0, np.int64)
    per_bucket = np.bincount(bucket_U, minlength=buckets) if keys.size else np.zeros(0)
    shared_U = per_bucket[bucket_U] >= 2 if keys.size else np.zeros(0, bool)
    occurrences = int(counts.sum())
    orders[str(n)] = {
        'distinct_ngrams': int(keys.size),
        'occurrences': occurrences,
        'buckets': buckets,
        'buckets_used': int(np.count_nonzero(per_bucket)),
        'distinct_in_shared_buckets': int(shared_U.sum()),
        'shared_occurrence_fraction': (float(counts[shared_U].sum() / occurrences)
                                       if occurrences else 0.0),
    }
  return {'hash': HASH_VERSION, 'max_n': max_n, 'buckets': buckets,
          'documents_counted': num_docs, 'tokens_counted': int(stream.size),
          'orders': orders}


def format_collision_stats(stats: dict) -> list[str]:
  """One line per order, for logs and the prepare report."""
  lines = [f"hashed n-grams (M={stats['buckets']:,} buckets per order, "
           f"{stats['tokens_counted']:,} tokens incl. BOS):"]
  for n, o in stats['orders'].items():
    lines.append(f"  n={n}: {o['distinct_ngrams']:,} distinct in {o['occurrences']:,} "
                 f"occurrences; {o['buckets_used']:,} buckets used; "
                 f"{100 * o['shared_occurrence_fraction']:.2f}% of occurrences share their "
                 'bucket with another n-gram')
  return lines
