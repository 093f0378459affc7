"""mine_fgrams and FgramTable vs a plain-Python Counter reference."""

import collections
import concurrent.futures
import inspect
import os
import types
from unittest import mock

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax.fgrams import FgramTable, mine_fgrams, spill
from scone_jax.fgrams import keyhash
from scone_jax.fgrams.keyhash import count_distinct


def reference_mine(docs, max_len, size, min_count):
  """Every n-gram 2..K inside each doc, counted; no pruning (Apriori never drops a
  gram with count >= min_count); ranked (count desc, length asc, tokens asc)."""
  counter = collections.Counter()
  for doc in docs:
    doc = [int(t) for t in doc]
    for n in range(2, max_len + 1):
      for i in range(len(doc) - n + 1):
        counter[tuple(doc[i:i + n])] += 1
  kept = [(g, c) for g, c in counter.items() if c >= min_count]
  kept.sort(key=lambda gc: (-gc[1], len(gc[0]), gc[0]))
  return kept[:size]


def assert_matches_reference(table, docs, max_len, size, min_count):
  want = reference_mine(docs, max_len, size, min_count)
  assert table.grams() == [g for g, _ in want]
  assert table.counts.tolist() == [c for _, c in want]
  assert table.lengths.tolist() == [len(g) for g, _ in want]
  assert table.cutoff_count == want[-1][1]
  assert table.tokens_SxK.shape == (len(want), max_len)
  for row, (g, _) in zip(table.tokens_SxK.tolist(), want):
    assert row == list(g) + [0] * (max_len - len(g))


def text_corpus():
  """Fixed real text: the bytes of a stdlib module, one document per paragraph."""
  with open(inspect.getsourcefile(collections), 'rb') as f:
    text = f.read()[:60_000]
  return [np.frombuffer(p, np.uint8).astype(np.int32) for p in text.split(b'\n\n') if p]


@st.composite
def corpora(draw):
  vocab = draw(st.integers(2, 8))
  docs = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=25), min_size=1,
                       max_size=40))
  return [np.array(d, dtype=np.int64) for d in docs]


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(docs=corpora(), max_len=st.integers(2, 6), size=st.integers(1, 60),
                  min_count=st.integers(1, 4), chunk=st.sampled_from([None, 1, 7, 50]))
def test_random_corpora_match_reference(docs, max_len, size, min_count, chunk):
  want = reference_mine(docs, max_len, size, min_count)
  kwargs = dict(max_len=max_len, size=size, min_count=min_count, progress=False,
                chunk_tokens=chunk)
  if not want:
    with pytest.raises(ValueError, match='no n-gram'):
      mine_fgrams(docs, **kwargs)
    return
  assert_matches_reference(mine_fgrams(docs, **kwargs), docs, max_len, size, min_count)


def test_real_text_matches_reference():
  docs = text_corpus()
  table = mine_fgrams(docs, max_len=5, size=2000, min_count=3, progress=False)
  assert len(table) == 2000
  assert_matches_reference(table, docs, 5, 2000, 3)


def test_out_of_core_equals_in_memory(monkeypatch, tmp_path):
  docs = text_corpus()
  in_memory = mine_fgrams(docs, max_len=5, size=3000, min_count=2, progress=False)
  spills = []
  original = spill.RunMerger._spill
  monkeypatch.setattr(spill.RunMerger, '_spill',
                      lambda self: (spills.append(1), original(self))[1])
  # ~2 KB budget: the corpus, per-position ids and every count run go through tmp files.
  tiny = mine_fgrams(docs, max_len=5, size=3000, min_count=2, memory_budget_mb=0.002,
                     progress=False, chunk_tokens=4096, tmp_dir=str(tmp_path))
  assert len(spills) > 10
  assert tiny.fingerprint == in_memory.fingerprint
  assert tiny.grams() == in_memory.grams()
  assert os.listdir(tmp_path) == []  # Temp files are cleaned up.


def test_flat_corpus_and_workers_give_the_same_table(tmp_path):
  docs = text_corpus() + [np.zeros(0, np.int32)]
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
  path = tmp_path / 'tokens.bin'
  np.concatenate(docs).astype(np.uint16).tofile(path)
  shards = types.SimpleNamespace(tokens=np.memmap(path, np.uint16, mode='r'),
                                 offsets=offsets)
  want = mine_fgrams(docs, max_len=4, size=500, min_count=2, workers=1, progress=False)
  got = mine_fgrams(shards, max_len=4, size=500, min_count=2, workers=2,
                    chunk_tokens=1000, progress=False)
  assert got.grams() == want.grams() and np.array_equal(got.counts, want.counts)


def test_slice_equals_mining_smaller():
  docs = text_corpus()
  big = mine_fgrams(docs, max_len=5, size=1500, min_count=2, progress=False)
  for size in (1, 37, 700, 1500):
    small = mine_fgrams(docs, max_len=5, size=size, min_count=2, progress=False)
    assert big.slice(size).fingerprint == small.fingerprint
    assert big.slice(size).grams() == small.grams()
  with pytest.raises(ValueError, match='slice size'):
    big.slice(0)


def test_save_load_round_trip_and_errors(tmp_path):
  table = mine_fgrams(text_corpus(), max_len=4, size=300, min_count=2, progress=False)
  table.meta['tokenizer_fingerprint'] = 'tok123'
  table.meta['corpus_fingerprint'] = 'corp456'
  path = str(tmp_path / 'fgrams')
  table.save(path)
  loaded = FgramTable.load(path, expect_tokenizer='tok123')
  assert loaded.fingerprint == table.fingerprint
  assert loaded.grams() == table.grams() and np.array_equal(loaded.counts, table.counts)
  assert loaded.meta == table.meta
  assert (loaded.max_len, loaded.min_count, loaded.cutoff_count) == (4, 2, table.cutoff_count)
  manifest = artifacts.read_manifest(path, 'fgram_table')
  assert manifest['size'] == 300 and manifest['cutoff_count'] == table.cutoff_count
  with pytest.raises(artifacts.ArtifactError, match='tokenizer_fingerprint'):
    FgramTable.load(path, expect_tokenizer='other')
  counts_file = os.path.join(path, 'counts.npy')
  data = open(counts_file, 'rb').read()
  with open(counts_file, 'wb') as f:  # Flip one byte of a count.
    f.write(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(artifacts.ArtifactError, match='checksum'):
    FgramTable.load(path)
  with open(counts_file, 'wb') as f:
    f.write(data[:-8])
  with pytest.raises(artifacts.ArtifactError, match='truncated'):
    FgramTable.load(path)
  os.remove(os.path.join(path, 'manifest.json'))
  with pytest.raises(artifacts.ArtifactError, match='manifest'):
    FgramTable.load(path)


def test_fingerprint_depends_on_content():
  table = mine_fgrams(text_corpus(), max_len=4, size=300, min_count=2, progress=False)
  assert table.fingerprint != table.slice(299).fingerprint
  counts = table.counts.copy()
  counts[0] += 1
  other = FgramTable(table.tokens_SxK, counts, table.lengths, 4, 2)
  assert other.fingerprint != table.fingerprint


@pytest.mark.parametrize('kwargs, match', [
    (dict(size=0), 'size'),
    (dict(max_len=1), 'max_len'),
    (dict(min_count=0), 'min_count'),
    (dict(memory_budget_mb=0), 'memory_budget_mb'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mine_fgrams([np.arange(10)], progress=False, **kwargs)


@pytest.mark.parametrize('docs, match', [
    ([], 'no n-gram'),
    ([np.array([1]), np.array([], np.int64)], 'no n-gram'),
    ([np.array([1.0, 2.0])], 'integer'),
    ([np.array([1, -2, 3])], 'outside'),
    ([np.array([1, 2**31])], 'outside'),
    ([np.ones((2, 3), np.int64)], '1-D'),
    (np.arange(5), 'wrap a single document'),
])
def test_bad_corpora(docs, match):
  with pytest.raises(ValueError, match=match):
    mine_fgrams(docs, min_count=1, progress=False)


def test_no_gram_reaches_min_count():
  with pytest.raises(ValueError, match='lower min_count'):
    mine_fgrams([np.arange(10)], min_count=2, progress=False)


# PART_KEYS=2 splits anything over 8 keys into parts, as 1M+ keys are in real use.
@pytest.mark.parametrize('part_keys', [keyhash.PART_KEYS, 2])
@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(keys=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 20), max_size=300))
def test_count_distinct_equals_unique(part_keys, keys):
  keys = np.array(keys, np.uint64)
  want_keys, want_inverse, want_counts = np.unique(keys, return_inverse=True,
                                                  return_counts=True)
  with mock.patch.object(keyhash, 'PART_KEYS', part_keys):
    got_keys, got_counts = count_distinct(keys)
    np.testing.assert_array_equal(got_keys, want_keys)
    np.testing.assert_array_equal(got_counts, want_counts)
    got_keys, got_counts, got_inverse = count_distinct(keys, return_inverse=True)
    np.testing.assert_array_equal(got_keys, want_keys)
    np.testing.assert_array_equal(got_counts, want_counts)
    np.testing.assert_array_equal(got_inverse, want_inverse.reshape(-1))
    # Unsorted: the same (key, count) pairs, and the inverse points at each key.
    got_keys, got_counts, got_inverse = count_distinct(keys, return_inverse=True,
                                                       sort=False)
    order = np.argsort(got_keys)
    np.testing.assert_array_equal(got_keys[order], want_keys)
    np.testing.assert_array_equal(got_counts[order], want_counts)
    np.testing.assert_array_equal(got_keys[got_inverse], keys)
    # Weighted (merging runs), parts counted on a thread pool.
    weights = np.arange(keys.size, dtype=np.int64) % 7 + 1
    want_sums = np.bincount(want_inverse.reshape(-1), weights, want_keys.size).astype(np.int64)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      got_keys, got_sums = count_distinct(keys, weights_N=weights, pool=pool)
    np.testing.assert_array_equal(got_keys, want_keys)
    np.testing.assert_array_equal(got_sums, want_sums)


# In memory; spilling every run; one bucket or key ranges (an empty one among them).
@pytest.mark.parametrize('budget_bytes', [1 << 30, 200])
@pytest.mark.parametrize('bounds', [[], [90, 100, 101, 250], [0, 5, 399]])
def test_run_merger_kept_ids_equal_dict(tmp_path, budget_bytes, bounds):
  rng = np.random.default_rng(0)
  bounds = np.array(bounds, np.uint64)
  runs = []
  for size in (50, 0, 300, 120):  # Unsorted distinct keys per run, as a chunk gives.
    keys = rng.permutation(np.unique(rng.integers(0, 400, size)).astype(np.uint64))
    keys, counts, ends, _ = spill.partition_run(keys, rng.integers(1, 4, keys.size), bounds)
    runs.append((keys, counts, ends))
  merger = spill.RunMerger(budget_bytes, str(tmp_path), min_count=5, tag='t', keep_runs=True,
                           bounds=bounds)
  for run in runs:
    merger.add(*run)
  keys, counts = merger.finish()
  total = collections.Counter()
  for run_keys, run_counts, _ in runs:
    total.update(dict(zip(run_keys.tolist(), run_counts.tolist())))
  want = sorted((k, c) for k, c in total.items() if c >= 5)
  assert keys.tolist() == [k for k, _ in want] and counts.tolist() == [c for _, c in want]
  assert bool(os.listdir(tmp_path)) == (budget_bytes == 200)  # Spilled runs' keys.
  row = {k: i for i, (k, _) in enumerate(want)}
  for i, (run_keys, _, _) in enumerate(runs):
    assert merger.kept_ids(i).tolist() == [row.get(k, -1) for k in run_keys.tolist()]
  merger.close()
  assert os.listdir(tmp_path) == []


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(keys=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 30), max_size=200,
                                unique=True),
                  bounds=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 30), max_size=9,
                                  unique=True))
def test_scan_kernel_grouping_equals_numpy(keys, bounds):
  keys = np.array(keys, np.uint64)
  counts = np.arange(keys.size, dtype=np.int64) + 1
  bounds = np.sort(np.array(bounds, np.uint64))
  want = spill.partition_run(keys, counts, bounds)
  got = spill.group_by_bucket(keys, counts, bounds, np.zeros(0, np.int32))
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
  # Every key lies in its bucket's key range.
  starts = np.concatenate([[0], want[2][:-1]])
  for b, (lo, hi) in enumerate(zip(starts, want[2])):
    assert all((b == 0 or k >= bounds[b - 1]) and (b == bounds.size or k < bounds[b])
               for k in want[0][lo:hi])


@pytest.mark.parametrize('budget_mb', [1024, 0.002])  # In memory; spilling.
def test_many_key_range_buckets_give_the_same_table(tmp_path, budget_mb):
  """Hundreds of buckets (some empty, some one prefix) == one bucket == the reference."""
  from scone_jax.fgrams import mine  # pylint: disable=g-import-not-at-top
  docs = text_corpus()
  kwargs = dict(max_len=5, size=2500, min_count=2, progress=False, chunk_tokens=4096,
                memory_budget_mb=budget_mb, tmp_dir=str(tmp_path))
  with mock.patch.object(mine, '_bucket_bounds', lambda *_: np.zeros(0, np.uint64)):
    one = mine_fgrams(docs, **kwargs)
  seen = []
  original = mine._bucket_bounds

  def many(weights, num_buckets):
    seen.append(original(weights, num_buckets).size + 1)
    return original(weights, num_buckets)
  with mock.patch.object(mine, '_BUCKET_POSITIONS', 16 if budget_mb > 1 else 128), mock.patch.object(
      mine, '_bucket_bounds', many):
    got = mine_fgrams(docs, **kwargs)
  assert min(seen) > 20 and max(seen) > 200  # n=2: one bucket per byte value at most.
  assert got.fingerprint == one.fingerprint
  assert_matches_reference(got, docs, 5, 2500, 2)
  assert os.listdir(tmp_path) == []


def test_large_vocabulary_buckets_from_a_sample():
  """Token ids too large to count densely: scan 2's buckets come from sampled quantiles."""
  from scone_jax.fgrams import mine  # pylint: disable=g-import-not-at-top
  docs = [d.astype(np.int64) * 7_000_001 for d in text_corpus()]  # Ids up to ~1.8e9.
  sampled = []
  original = mine._sampled_bounds
  with mock.patch.object(mine, '_BUCKET_POSITIONS', 128), mock.patch.object(
      mine, '_sampled_bounds', lambda *a: sampled.append(original(*a)) or sampled[-1]):
    table = mine_fgrams(docs, max_len=4, size=1500, min_count=2, progress=False)
  assert len(sampled) == 1 and sampled[0].size > 20
  assert_matches_reference(table, docs, 4, 1500, 2)


def test_bucket_bounds_split_the_weight():
  from scone_jax.fgrams import mine  # pylint: disable=g-import-not-at-top
  weights = np.array([0, 5, 1, 1, 1, 1, 0, 1, 100, 0])
  bounds = mine._bucket_bounds(weights, 4)
  np.testing.assert_array_equal(bounds >> np.uint64(31), [8])  # 10 vs 100: one cut.
  np.testing.assert_array_equal(mine._bucket_bounds(np.ones(8, np.int64), 4) >> np.uint64(31),
                                [2, 4, 6])
  assert mine._bucket_bounds(np.zeros(5, np.int64), 4).size == 0
  assert mine._bucket_bounds(np.ones(8, np.int64), 1).size == 0


def test_partitioned_counting_gives_the_same_table():
  docs = text_corpus()
  want = mine_fgrams(docs, max_len=4, size=800, min_count=2, progress=False)
  with mock.patch.object(keyhash, 'PART_KEYS', 64):  # Chunk counts and merges split.
    got = mine_fgrams(docs, max_len=4, size=800, min_count=2, progress=False)
  assert got.fingerprint == want.fingerprint


def test_positions_beyond_2_to_the_32(tmp_path):
  """A corpus over 2**32 tokens (a sparse memmap: nothing stored but the last text):
  scans address positions past 2**32 exactly; the per-position id store holds them."""
  from scone_jax.fgrams import mine  # pylint: disable=g-import-not-at-top
  text = np.concatenate(text_corpus())
  num = (1 << 32) + (1 << 16)
  tail = num - text.size
  path = tmp_path / 'big.i32'
  with open(path, 'wb') as f:
    f.truncate(num * 4)  # Sparse: zeros (token 0) everywhere but the text at the end.
  tokens = np.memmap(path, np.int32, 'r+', shape=(num,))
  tokens[tail:] = text
  doc_start = tail + 1000  # A document boundary inside the scanned span.
  corpus = mine._as_corpus(types.SimpleNamespace(tokens=tokens, offsets=np.array(
      [0, doc_start, num], np.int64)), str(tmp_path), 1 << 20)
  a, b = tail, tail + 4000
  index_P, (keys_U, counts_U, _) = mine._scan_chunk(corpus, 2, None, None, True,
                                                   np.zeros(0, np.uint64), (a, b))
  want = collections.Counter(
      (int(x), int(y)) for p, (x, y) in enumerate(zip(tokens[a:b], tokens[a + 1:b + 1]),
                                                  start=a) if p + 1 != doc_start)
  got = {(int(k >> 31), int(k & (2**31 - 1))): int(c) for k, c in zip(keys_U, counts_U)}
  assert got == dict(want)
  assert index_P[doc_start - 1 - a] == -1 and (np.delete(index_P, doc_start - 1 - a) >= 0).all()
  ids = mine._IdStore(num, in_memory=False, path=str(tmp_path / 'ids.bin'))
  assert ids._dtype == np.int64  # pylint: disable=protected-access
  ids.write(num - 5, np.array([7, 2**40, -1, 3, 9]))
  np.testing.assert_array_equal(ids.read(num - 6, num + 2), [0, 7, 2**40, -1, 3, 9, -1, -1])
  ids.close()
  # The entry point no longer refuses such a corpus (it starts validating its tokens).
  with pytest.raises(ValueError, match=r'docs tokens \[0:'):
    bad = np.memmap(path, np.int32, 'r+', shape=(num,))
    bad[5] = -1
    mine_fgrams(types.SimpleNamespace(tokens=bad, offsets=np.array([0, num], np.int64)),
                progress=False)
