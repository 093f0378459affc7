"""Matching vs a nested-loop reference; IncrementalMatcher vs match; KeyHash vs a dict."""


import hypothesis
import numba
import hypothesis.strategies as st
import numpy as np
import pytest

from scone_jax.fgrams import FgramTable, IncrementalMatcher, mine_fgrams
from scone_jax.fgrams import keyhash
from scone_jax.fgrams.keyhash import KeyHash


def reference_match(table, tokens_BxT, segment_ids_BxT):
  """For each position: (row, length) of the longest f-gram ending there, by brute force."""
  row_of = {g: r for r, g in enumerate(table.grams())}
  b, t = tokens_BxT.shape
  ids = np.full((b, t), -1)
  lens = np.ones((b, t))
  for bi in range(b):
    for i in range(t):
      for n in range(2, table.max_len + 1):
        j = i - n + 1
        seg = segment_ids_BxT[bi, j:i + 1]
        if j < 0 or seg[-1] == 0 or np.any(seg != seg[-1]):
          continue
        row = row_of.get(tuple(tokens_BxT[bi, j:i + 1].tolist()))
        if row is not None:
          ids[bi, i], lens[bi, i] = row, n
  return ids, lens


def random_table(rng, vocab, max_len, size, min_count=2):
  docs = [rng.integers(0, vocab, rng.integers(0, 40)) for _ in range(200)]
  return mine_fgrams(docs, max_len=max_len, size=size, min_count=min_count, progress=False)


def random_batch(rng, vocab, b, t):
  tokens = rng.integers(0, vocab, (b, t))
  # Packed rows: segments 1, 2, ... then padding (0) at the end of some rows.
  segments = np.cumsum(rng.random((b, t)) < 0.15, axis=1) + 1
  segments[np.arange(t)[None, :] >= rng.integers(t // 2, t + 1, (b, 1))] = 0
  return tokens, segments


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31), vocab=st.integers(2, 6),
                  max_len=st.integers(2, 6), size=st.integers(1, 80),
                  shape=st.tuples(st.integers(1, 5), st.integers(1, 30)))
def test_match_equals_reference(seed, vocab, max_len, size, shape):
  rng = np.random.default_rng(seed)
  table = random_table(rng, vocab, max_len, size)
  tokens, segments = random_batch(rng, vocab, *shape)
  ids, lens = table.match(tokens, segments)
  want_ids, want_lens = reference_match(table, tokens, segments)
  assert ids.dtype == np.int32 and lens.dtype == np.int32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(lens, want_lens)
  ids, lens = table.match(tokens)  # No segment ids: each row is one document.
  want_ids, want_lens = reference_match(table, tokens, np.ones_like(tokens))
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(lens, want_lens)


def test_match_on_real_text_finds_long_grams():
  rng = np.random.default_rng(0)
  text = open(np.__file__, 'rb').read()
  docs = [np.frombuffer(p, np.uint8) for p in text.split(b'\n\n') if p]
  table = mine_fgrams(docs, max_len=5, size=1000, min_count=2, progress=False)
  tokens = np.stack([np.frombuffer(text[i:i + 64], np.uint8) for i in
                     rng.integers(0, len(text) - 64, 4)])
  ids, lens = table.match(tokens)
  want_ids, want_lens = reference_match(table, tokens, np.ones_like(tokens))
  np.testing.assert_array_equal(ids, want_ids)
  assert (lens == 5).any()


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31), max_len=st.integers(2, 6),
                  b=st.sampled_from([1, 5]))
def test_incremental_equals_match(seed, max_len, b):
  rng = np.random.default_rng(seed)
  vocab, t = 4, 40
  table = random_table(rng, vocab, max_len, 60)
  tokens = rng.integers(0, vocab, (b, t))
  segments = np.cumsum(rng.random((b, t)) < 0.1, axis=1) + 1
  want_ids, want_lens = table.match(tokens, segments)
  matcher = IncrementalMatcher(table, b)
  for i in range(t):
    for bi in range(b):
      if i == 0 or segments[bi, i] != segments[bi, i - 1]:
        matcher.reset(bi)  # A new document starts in this row.
    ids, lens = matcher.push(tokens[:, i])
    assert ids.dtype == np.int32 and lens.dtype == np.int32
    np.testing.assert_array_equal(ids, want_ids[:, i])
    np.testing.assert_array_equal(lens, want_lens[:, i])
  matcher.reset()
  ids, _ = matcher.push(tokens[:, 0])
  assert (ids == -1).all()  # After a full reset nothing precedes the token.


def test_table_validation():
  tokens = np.array([[1, 2, 3], [1, 2, 0]])
  with pytest.raises(ValueError, match='prefix-closed'):
    FgramTable(tokens[[0]], np.array([5]), np.array([3]), 3, 1).matcher
  with pytest.raises(ValueError, match='suffix-closed'):
    FgramTable(tokens, np.array([5, 5]), np.array([3, 2]), 3, 1).matcher
  with pytest.raises(ValueError, match='distinct'):
    FgramTable(tokens[[1, 1]], np.array([5, 5]), np.array([2, 2]), 3, 1).matcher
  with pytest.raises(ValueError, match='rank order'):
    FgramTable(tokens[[1, 1]], np.array([4, 5]), np.array([2, 2]), 3, 1)
  with pytest.raises(ValueError, match='0-padded'):
    FgramTable(tokens[[0]], np.array([5]), np.array([2]), 3, 1)


def test_match_bad_inputs():
  table = random_table(np.random.default_rng(0), 4, 3, 20)
  with pytest.raises(ValueError, match='2-D'):
    table.match(np.arange(5))
  with pytest.raises(ValueError, match='integer'):
    table.match(np.ones((2, 3)))
  with pytest.raises(ValueError, match='outside'):
    table.match(-np.ones((2, 3), np.int64))
  with pytest.raises(ValueError, match='shape of tokens'):
    table.match(np.ones((2, 3), np.int64), np.ones((2, 4), np.int64))
  matcher = IncrementalMatcher(table, 2)
  with pytest.raises(ValueError, match='tokens_B must have shape'):
    matcher.push(np.ones(3, np.int64))
  with pytest.raises(ValueError, match='integer'):
    matcher.push(np.ones(2))
  with pytest.raises(ValueError, match='outside'):
    matcher.push(np.array([1, 2**31]))
  with pytest.raises(ValueError, match='outside'):
    matcher.push(np.array([-1, 2]))


def test_keyhash_equals_dict():
  rng = np.random.default_rng(0)
  keys = np.unique(rng.integers(0, 2**62, 5000, dtype=np.int64)).astype(np.uint64)
  keys = np.concatenate([keys, np.arange(100, dtype=np.uint64)])  # Dense keys collide more.
  values = rng.permutation(keys.size)
  table = KeyHash(keys, values)
  queries = np.concatenate([keys, rng.integers(0, 2**62, 5000).astype(np.uint64)])
  want = dict(zip(keys.tolist(), values.tolist()))
  want_values = [want.get(q, -1) for q in queries.tolist()]
  np.testing.assert_array_equal(table.lookup(queries), want_values)
  probe_all = numba.njit(lambda slots, shift, q: [keyhash.probe(slots, shift, k) for k in q])
  assert probe_all(table.slots_Cx2, table.shift, queries) == want_values
  with pytest.raises(ValueError, match='unique'):
    KeyHash(np.array([3, 3], np.uint64), np.array([0, 1]))
