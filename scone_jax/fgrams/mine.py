"""Exact f-gram mining: K-1 linear scans with Apriori pruning, out of core, deterministic.

Definitions (docs/METHOD.md, section 1): an f-gram is a token n-gram with 2 <= n <= K
(`max_len`) that lies inside one document. Scan n counts the n-grams whose (n-1)-prefix
AND (n-1)-suffix were kept by scan n-1 and keeps those with count >= `min_count`. This pruning is exact: a
gram's prefix and suffix occur at least as often as the gram, so no n-gram with
count >= min_count is ever pruned. All kept lengths are pooled and ranked by raw count.

Ranking and tie-break (fixed, so a table is a pure function of corpus and parameters):
rows are ordered by
  1. count, descending;
  2. length, ascending (a shorter gram first: it is the more general one);
  3. token ids, ascending, compared lexicographically;
and the table is the first `size` rows. Since a gram's prefix and suffix count at least as
often and are shorter, they rank before it: every table (and every slice of one) is
closed under prefixes and suffixes, which the matcher relies on. A smaller table is the
prefix of a larger one, so `table.slice(S2)` equals mining again with size=S2.

Exact keys (hash tables here only choose where a full key is stored, never merge two):
scan n represents an n-gram as the uint64 `prefix_id * 2**31 + last_token`, where
prefix_id is the row of its (n-1)-prefix among the kept (n-1)-grams (for n = 2: the
first token). Kept n-grams get ids in ascending key order, which is also the
lexicographic order of their tokens (by induction over n), so ranking needs one stable
sort by count. Counting turns each chunk's keys into a (key, count) run (`_scan_kernel`:
one compiled pass with a keyhash counting table) and records, per start position, the
index of its key in the run. Runs come grouped into key-range buckets (prefix ranges of
about equal weight), each bucket counted on its own on all threads, so there is no serial
merge; beyond the budget each bucket's sums spill to disk (`spill.py`). Once
scan n's kept keys are known, each chunk's run entries are resolved to kept ids (by the
final merge's own inverse, or after spills by hash lookups of the run keys: far fewer
than positions), turning the per-position indices into ids of the kept n-gram starting
there. Scan n+1 reads those as its prefix ids (kept n-gram at p) and suffix test (kept
n-gram at p+1): no per-position hash lookup. The per-position array lives in RAM, or in
a temp file when the corpus exceeds the budget. Token ids must be in [0, 2**31). A
corpus may hold any number of tokens (positions are int64, per-position ids int64 from
2**31 tokens on); the kept grams of one length must number < 2**32, since their ids are
the high bits of the next scan's keys.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import tempfile
from typing import Any, Iterable

import numba
import numpy as np
import tqdm

from scone_jax.fgrams import spill
from scone_jax.fgrams.keyhash import new_count_table, place, table_bits
from scone_jax.fgrams.table import FgramTable

TOKEN_LIMIT = 1 << 31
_SHIFT = np.uint64(31)
_LOW_MASK = np.uint64(TOKEN_LIMIT - 1)
# Working bytes per corpus position in one chunk (tokens, ids, keys, masks, lookup and
# counting tables).
_CHUNK_BYTES_PER_TOKEN = 160
# Larger chunks are slower, not faster: their counting tables (10-20 bytes per position)
# leave the caches (1 MiB L2 per core here). 5M tokens of text, K=5, one core: 0.47 s at
# 2**17..2**18 positions per chunk, 0.8 s at 2**19, 1.2 s at 2**20..2**21.
_MAX_CHUNK_TOKENS = 1 << 18
# Key-range buckets per scan (spill.py). Every chunk's run carries one end offset per
# bucket, so this bounds that bookkeeping (4096 x 8 bytes a chunk).
_MAX_BUCKETS = 4096
_BUCKET_POSITIONS = 1 << 19  # Corpus positions per bucket (more buckets: below).


def check_args(max_len: int, size: int, min_count: int) -> None:
  for name, value, minimum in (('max_len', max_len, 2), ('size', size, 1),
                               ('min_count', min_count, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f'{name}={value!r} must be an integer >= {minimum}' +
                       (' (f-grams have 2..max_len tokens)' if name == 'max_len' else ''))


def check_tokens(tokens: np.ndarray, what: str) -> None:
  """Raises ValueError unless `tokens` are integers in [0, 2**31)."""
  if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{what} must hold integer token ids, got dtype {tokens.dtype}; '
                     'pass tokenized documents (1-D integer arrays)')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= TOKEN_LIMIT):
    raise ValueError(f'{what} holds token ids outside [0, 2**31) (min {tokens.min()}, max '
                     f'{tokens.max()}); token ids must be non-negative vocabulary indices')


class _Corpus:
  """The corpus as one flat token array plus document offsets (int64 [D+1])."""

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
    self.tokens, self.offsets = tokens, offsets
    self.num_tokens = int(offsets[-1])

  def breaks(self, a: int, length: int) -> np.ndarray:
    """bool [length]: position a+j (j >= 1) starts a document or lies past the corpus end.

    Index 0 is never set: a bigram starting at p lies inside one document iff no break
    is at p+1.
    """
    breaks = np.zeros(length, bool)
    lo, hi = np.searchsorted(self.offsets, [a + 1, a + length])
    breaks[self.offsets[lo:hi] - a] = True
    breaks[max(self.num_tokens - a, 0):] = True
    return breaks


def _as_corpus(docs: Any, tmp_dir: str, budget_bytes: int) -> _Corpus:
  """Flat view of `docs`: TokenShards-like objects directly, other iterables copied once."""
  if hasattr(docs, 'tokens') and hasattr(docs, 'offsets'):
    offsets = np.asarray(docs.offsets, dtype=np.int64)
    tokens = docs.tokens
    if (offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or
        offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0)):
      raise ValueError('docs.offsets must be non-decreasing int64 [D+1] from 0 to '
                       f'len(docs.tokens)={len(tokens)}')
    check_tokens(tokens[:0], 'docs.tokens')  # Values are checked chunk by chunk.
    return _Corpus(tokens, offsets)
  if isinstance(docs, np.ndarray) and docs.ndim == 1:
    raise ValueError('docs must be an iterable of documents (1-D integer arrays), got one '
                     '1-D array; wrap a single document as [doc]')
  lengths, buffer, buffered = [0], [], 0
  spill_file = None
  for i, doc in enumerate(docs):
    doc = np.asarray(doc)
    if doc.ndim != 1:
      raise ValueError(f'docs[{i}] has shape {doc.shape}; each document must be a 1-D '
                       'integer array')
    if doc.size == 0:
      lengths.append(0)
      continue
    check_tokens(doc, f'docs[{i}]')
    buffer.append(doc.astype(np.int32))
    lengths.append(doc.size)
    buffered += doc.size
    if buffered * 4 > budget_bytes // 4:
      # Large iterables go to a temp file read back as a memmap, not into RAM.
      if spill_file is None:
        spill_file = open(os.path.join(tmp_dir, 'corpus.i32'), 'wb')
      np.concatenate(buffer).tofile(spill_file)
      buffer, buffered = [], 0
  offsets = np.cumsum(np.asarray(lengths, dtype=np.int64))
  if spill_file is None:
    tokens = np.concatenate(buffer) if buffer else np.zeros(0, np.int32)
  else:
    if buffer:
      np.concatenate(buffer).tofile(spill_file)
    spill_file.close()
    tokens = np.memmap(spill_file.name, dtype=np.int32, mode='r')
  return _Corpus(tokens, offsets)


class _IdStore:
  """One int per corpus position (run indices, then kept ids): in RAM if small, else a file.

  Both are below num_tokens (a run or the kept set has at most one key per position).
  """

  def __init__(self, num_tokens: int, in_memory: bool, path: str):
    self._dtype = np.dtype(np.int32 if num_tokens < TOKEN_LIMIT else np.int64)
    self._array = np.empty(num_tokens, self._dtype) if in_memory else None
    self._path = path
    self._fd = None if in_memory else os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)

  def write(self, a: int, ids: np.ndarray) -> None:
    if self._array is not None:
      self._array[a:a + ids.size] = ids
    else:
      os.pwrite(self._fd, ids.astype(self._dtype).tobytes(), a * self._dtype.itemsize)

  def read(self, a: int, e: int) -> np.ndarray:
    """Values of positions a..e-1 (a view when in RAM: read it before writing there); -1
    past the corpus end."""
    if self._array is not None:
      got = self._array[a:e]
    else:
      size = self._dtype.itemsize
      got = np.frombuffer(os.pread(self._fd, (e - a) * size, a * size), self._dtype)
    return got if got.size == e - a else np.append(got, np.full(e - a - got.size, -1,
                                                                 self._dtype))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      os.remove(self._path)
    self._array = None


def _read_tokens(corpus: _Corpus, a: int, e: int) -> np.ndarray:
  """Tokens of positions a..e-1 in the corpus dtype (a view), 0 past the corpus end."""
  got = np.asarray(corpus.tokens[a:min(e, corpus.num_tokens)])
  return got if got.size == e - a else np.append(got, np.zeros(e - a - got.size, got.dtype))


def _scan_chunk(corpus: _Corpus, n: int, ids: _IdStore | None, frequent: np.ndarray | None,
                want_index: bool, bounds: np.ndarray, span: tuple[int, int]):
  """Counts the candidate n-grams starting at [a, b): returns (index_P or None, run).

  run = (keys, counts, bucket ends): the chunk's distinct keys grouped into the merger's
  key-range buckets (`bounds`, see spill.py), and index_P indexes that grouped order.

  P = positions a..b-1. Candidates have a kept (n-1)-prefix at p and (n-1)-suffix at p+1
  (Apriori), read from `ids` (kept (n-1)-gram ids, -1 where none); for n = 2 the kept
  1-grams are the tokens, those seen >= min_count times where `frequent` (bool [V]) is
  given, and the bigram must not cross a document start. Kept (n-1)-grams lie inside one
  document, and two overlapping ones span one document, so n >= 3 needs no break test.
  index_P: int [P], each position's index in the run's keys, -1 for non-candidates.
  """
  a, b = span
  # Arrays stay in their stored dtypes (views where possible); only the C candidates'
  # keys are widened to uint64.
  if n == 2:
    prev_Q = _read_tokens(corpus, a, b + 1)  # Q = positions a..b.
    # Kept 1-gram at q: a token (not past the end), frequent if that is known.
    kept_Q = np.ones(b + 1 - a, bool) if frequent is None else frequent[prev_Q]
    kept_Q[corpus.num_tokens - a:] = False
    cand_P = kept_Q[:-1] & kept_Q[1:] & ~corpus.breaks(a, b - a + 1)[1:]
    last_P = prev_Q[1:]
  else:
    prev_Q = ids.read(a, b + 1)
    cand_P = np.zeros(0, bool)  # Computed from prev_Q by the kernel.
    last_P = _read_tokens(corpus, a + n - 1, b + n - 1)
  index_dtype = np.int32 if b - a < 1 << 31 else np.int64
  keys_U, counts_U, ends, index_P = _scan_kernel(prev_Q, last_P, cand_P, table_bits(b - a),
                                                 want_index, np.zeros(0, index_dtype),
                                                 bounds)
  # Runs stay unsorted within a bucket: the merger sorts only the kept keys.
  return (index_P if want_index else None), (keys_U, counts_U, ends)


@numba.njit(nogil=True, cache=True)
def _scan_kernel(prev_Q, last_P, cand_P, bits, want_index, like, bounds):
  """One pass over a chunk's P positions: counts the keys prev_Q[p] * 2**31 + last_P[p] of
  the candidate positions -- cand_P[p], or where cand_P is empty, prev_Q[p] >= 0 and
  prev_Q[p + 1] >= 0 (kept prefix and suffix ids) -- and returns (keys_U grouped by
  bucket of `bounds`, first-seen order within one, counts_U, the buckets' ends, index_P:
  each position's index in keys_U, -1 for non-candidates; empty unless want_index). The
  keyhash counting table, without materialising the candidates."""
  num = last_P.size
  from_ids = cand_P.size == 0
  index_of_slot, keys_U, counts_U, shift = new_count_table(num, bits, like)
  index_P = np.empty(num if want_index else 0, like.dtype)
  u = 0
  for p in range(num):
    if (prev_Q[p] >= 0 and prev_Q[p + 1] >= 0) if from_ids else cand_P[p]:
      key = (np.uint64(prev_Q[p]) << np.uint64(31)) | np.uint64(last_P[p])
      j, u = place(index_of_slot, keys_U, u, key, shift)
      counts_U[j] += 1
    else:
      j = -1
    if want_index:
      index_P[p] = j
  if bounds.size == 0:
    return keys_U[:u].copy(), counts_U[:u].copy(), np.full(1, u, np.int64), index_P
  keys_U, counts_U, ends, new_of_old = spill.group_by_bucket(keys_U[:u], counts_U[:u],
                                                             bounds, like)
  for p in range(index_P.size):  # Grouping moved the entries: index the new order.
    if index_P[p] >= 0:
      index_P[p] = new_of_old[index_P[p]]
  return keys_U, counts_U, ends, index_P


def _resolve_chunk(ids: _IdStore, merger: spill.RunMerger,
                   item: tuple[int, tuple[int, int]]) -> None:
  """Turns chunk i's run indices in `ids` into ids of the kept grams (-1 if not kept)."""
  i, (a, b) = item
  # Index -1 (no candidate) reads the appended -1.
  id_of_index = np.append(merger.kept_ids(i), -1)
  ids.write(a, id_of_index[ids.read(a, b)])


def mine_fgrams(docs: Iterable[np.ndarray] | Any, max_len: int = 5, size: int = 100_000,
                min_count: int = 5, memory_budget_mb: float = 1024, workers: int = 2,
                progress: bool = True, *, chunk_tokens: int | None = None,
                tmp_dir: str | None = None) -> FgramTable:
  """Mines the top `size` f-grams of `docs` exactly (see the module docstring).

  Args:
    docs: an iterable of documents (1-D integer arrays), or an object with flat `.tokens`
      and `.offsets` (int64 [D+1]) such as TokenShards, used without copying.
    max_len: K, the longest f-gram (>= 2).
    size: S, the number of f-grams kept.
    min_count: the least count of a kept f-gram (>= 1).
    memory_budget_mb: approximate working memory (chunks and count runs; the corpus
      memmap and the output table come on top); beyond it runs spill to `tmp_dir`.
    workers: threads scanning chunks in parallel (numpy releases the GIL in its loops).
    progress: show a tqdm bar per scan.
    chunk_tokens: corpus positions per chunk; default from the budget.
    tmp_dir: parent of the temp dir for spills; default the system temp dir.

  Returns:
    The FgramTable (rows in rank order; fewer than `size` if fewer grams qualify).
  """
  check_args(max_len, size, min_count)
  if not memory_budget_mb > 0:
    raise ValueError(f'memory_budget_mb={memory_budget_mb!r} must be > 0')
  if workers < 1:
    raise ValueError(f'workers={workers!r} must be >= 1')
  budget = int(memory_budget_mb * (1 << 20))
  with tempfile.TemporaryDirectory(prefix='scone_fgrams_', dir=tmp_dir) as tmp:
    corpus = _as_corpus(docs, tmp, budget)
    if not np.any(np.diff(corpus.offsets) >= 2):
      raise ValueError('docs contain no n-gram of 2+ tokens (empty corpus, or only '
                       'documents of 0-1 tokens); pass tokenized documents')
    if chunk_tokens is None:
      chunk_tokens = budget // (4 * workers * _CHUNK_BYTES_PER_TOKEN)
      chunk_tokens = int(np.clip(chunk_tokens, 1 << 16, _MAX_CHUNK_TOKENS))
    levels = _mine_levels(corpus, max_len, min_count, budget, workers, progress,
                          chunk_tokens, tmp)
  total = sum(keys.size for keys, _ in levels)
  if total == 0:
    raise ValueError(f'no n-gram of 2..{max_len} tokens occurs min_count={min_count} times '
                     'in docs; lower min_count or mine a larger corpus')
  tokens_MxK, lengths_M, counts_M = _materialise(levels, max_len, size)
  # The candidates come by length, then in key order = token order (module docstring):
  # a stable sort by count alone gives the documented order, without a lexsort.
  top = np.argsort(-counts_M, kind='stable')[:size]
  return FgramTable(tokens_MxK[top], counts_M[top], lengths_M[top], max_len=max_len,
                    min_count=min_count)


def _ordered(pool: concurrent.futures.Executor, fn, items, workers: int):
  """pool.map with at most workers + 1 items in flight, so memory stays at a few chunks."""
  in_flight = collections.deque()
  for item in items:
    in_flight.append(pool.submit(fn, item))
    if len(in_flight) > workers:
      yield in_flight.popleft().result()
  while in_flight:
    yield in_flight.popleft().result()


def _check_and_count(corpus: _Corpus, limit: int,
                     span: tuple[int, int]) -> np.ndarray | None:
  a, b = span
  tokens = np.asarray(corpus.tokens[a:b])
  check_tokens(tokens, f'docs tokens [{a}:{b}]')
  return np.bincount(tokens) if tokens.size and tokens.max() < limit else None


def _frequent_tokens(corpus: _Corpus, spans, pool, workers: int, min_count: int,
                     budget: int) -> tuple[np.ndarray | None, np.ndarray]:
  """Validates every token; (bool [V] of tokens occurring >= min_count times, int64 [V]
  their counts).

  (None, empty) when the vocabulary is too large for a dense count within the budget
  (then scan 2 simply counts every bigram).
  """
  limit = max(budget // 256, 1 << 16)  # A few dense [V] int64 counts in flight.
  total = np.zeros(0, np.int64)
  dense = True
  count = functools.partial(_check_and_count, corpus, limit)
  for counts in _ordered(pool, count, spans, workers):
    if counts is None:
      dense = False
    elif dense:
      if counts.size > total.size:
        total = np.pad(total, (0, counts.size - total.size))
      total[:counts.size] += counts
  return (total >= min_count, total) if dense else (None, np.zeros(0, np.int64))


def _bucket_bounds(weights_V: np.ndarray, num_buckets: int) -> np.ndarray:
  """Key bounds (uint64, ascending) of up to num_buckets key ranges of about equal weight.

  weights_V[v] is how often prefix v starts a candidate (an upper bound on its run
  entries), so the buckets get about equal work; keys are prefix * 2**31 + last token,
  so a bound on prefixes is a bound on keys. A heavy prefix alone in its bucket is fine:
  there are many buckets per thread.
  """
  cum = np.cumsum(weights_V)
  if num_buckets < 2 or cum.size == 0 or cum[-1] == 0:
    return np.zeros(0, np.uint64)
  targets = cum[-1] * np.arange(1, num_buckets) // num_buckets
  prefixes = np.unique(np.searchsorted(cum, targets, 'right'))
  prefixes = prefixes[(prefixes > 0) & (prefixes < cum.size)]
  return prefixes.astype(np.uint64) << _SHIFT


def _sampled_bounds(corpus: _Corpus, num_buckets: int) -> np.ndarray:
  """_bucket_bounds for first tokens where the vocabulary is too large to count densely:
  quantiles of an even sample of ~2**20 corpus tokens."""
  step = max(corpus.num_tokens // (1 << 20), 1)
  sample = np.sort(np.asarray(corpus.tokens[::step]).astype(np.int64))
  prefixes = np.unique(sample[(np.arange(1, num_buckets) * sample.size) // num_buckets])
  return prefixes[prefixes > 0].astype(np.uint64) << _SHIFT


def _mine_levels(corpus: _Corpus, max_len: int, min_count: int, budget: int, workers: int,
                 progress: bool, chunk_tokens: int, tmp: str):
  """Runs scans n = 2..K; returns [(kept keys ascending, counts)] for n = 2..K."""
  num = corpus.num_tokens
  spans = [(a, min(a + chunk_tokens, num)) for a in range(0, num, chunk_tokens)]
  in_memory = num * (4 if num < TOKEN_LIMIT else 8) <= budget // 4  # _IdStore's dtype.
  levels = []
  ids = _IdStore(num, in_memory, os.path.join(tmp, 'ids.bin')) if max_len > 2 else None
  # Runs are grouped into key-range buckets counted in parallel (spill.py): many per
  # thread so the threads stay busy, each small enough (~_BUCKET_POSITIONS candidates)
  # that its counting table stays in cache.
  num_buckets = int(np.clip(num // _BUCKET_POSITIONS, 4 * workers, _MAX_BUCKETS))
  scratch = {}  # The mergers' buffers, reused scan after scan (spill.RunMerger).
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    frequent, token_counts = _frequent_tokens(corpus, spans, pool, workers, min_count,
                                              budget)
    for n in range(2, max_len + 1):
      want_index = n < max_len  # Scan n+1 reads the kept n-gram ids.
      if n == 2 and frequent is None:
        bounds = _sampled_bounds(corpus, num_buckets)
      else:  # Prefixes: the (frequent) first tokens, or the kept (n-1)-grams' ids.
        bounds = _bucket_bounds(token_counts * frequent if n == 2 else levels[-1][1],
                                num_buckets)
      merger = spill.RunMerger(budget // 2, tmp, min_count, tag=f'n{n}',
                               keep_runs=want_index, pool=pool, bounds=bounds,
                               scratch=scratch)
      bar = tqdm.tqdm(total=num, unit='tok', unit_scale=True, desc=f'f-grams n={n}',
                      disable=not progress, leave=False)
      scan = functools.partial(_scan_chunk, corpus, n, ids, frequent, want_index, bounds)
      # Results come in chunk order. Writing chunk i's indices over the (n-1)-gram ids is
      # safe: chunks up to i are done reading, later ones read from position b_i on.
      for (a, b), (index, run) in zip(spans, _ordered(pool, scan, spans, workers)):
        if want_index:
          ids.write(a, index)
        merger.add(*run)
        bar.update(b - a)
      bar.close()
      keys, counts = merger.finish()
      if keys.size >= 1 << 32:
        raise ValueError(f'{keys.size} {n}-grams occur >= min_count={min_count} times: ids '
                         'of one length must stay < 2**32; raise min_count')
      levels.append((keys, counts))
      if keys.size and want_index:
        resolve = functools.partial(_resolve_chunk, ids, merger)
        for _ in _ordered(pool, resolve, enumerate(spans), workers):
          pass
      merger.close()
      if keys.size == 0:
        break  # Apriori: no longer gram can be kept either.
  if ids is not None:
    ids.close()
  return levels


def _materialise(levels, max_len: int, size: int):
  """Tokens of the kept grams that can reach the top `size` (count >= the size-th count)."""
  all_counts = np.concatenate([counts for _, counts in levels])
  cutoff = (np.partition(all_counts, all_counts.size - size)[all_counts.size - size]
            if all_counts.size > size else 0)
  tokens, lengths, counts_out = [], [], []
  row_of_prev = None  # Level n-1 id -> row in the level n-1 token block.
  prev_tokens = None
  for n, (keys, counts) in enumerate(levels, start=2):
    sel = np.flatnonzero(counts >= cutoff)
    prefix = (keys[sel] >> _SHIFT).astype(np.int64)
    last = (keys[sel] & _LOW_MASK).astype(np.int64)
    # A selected gram's prefix counts at least as often, so it is selected too.
    head = prefix[:, None] if n == 2 else prev_tokens[row_of_prev[prefix]]
    block = np.concatenate([head, last[:, None]], axis=1)
    tokens.append(np.pad(block, ((0, 0), (0, max_len - n))).astype(np.int32))
    lengths.append(np.full(sel.size, n, np.int32))
    counts_out.append(counts[sel])
    row_of_prev = np.full(keys.size, -1, np.int64)
    row_of_prev[sel] = np.arange(sel.size)
    prev_tokens = block
  return np.concatenate(tokens), np.concatenate(lengths), np.concatenate(counts_out)
