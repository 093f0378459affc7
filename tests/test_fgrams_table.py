"""The memory-mapped table layout: round trip, exact matching after load, O(1) open."""

import os

import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax.fgrams import FgramTable, IncrementalMatcher, mine_fgrams
from scone_jax.fgrams import index as index_lib
from tests.test_fgrams_match import random_batch, random_table, reference_match


def text_table(size=3000, max_len=5):
  text = open(np.__file__, 'rb').read() + open(os.__file__, 'rb').read()
  docs = [np.frombuffer(p, np.uint8).astype(np.int32) * 7 + 100_000  # ids up to 2**17
          for p in text.split(b'\n\n') if p]
  return mine_fgrams(docs, max_len=max_len, size=size, min_count=2, progress=False)


def test_save_load_round_trip_is_mapped_and_exact(tmp_path, monkeypatch):
  table = text_table()
  table.save(str(tmp_path / 't'))

  def no_rebuild(*args):
    raise AssertionError('load must map the saved index, not rebuild it')
  monkeypatch.setattr(index_lib, 'build_kernel', no_rebuild)
  monkeypatch.setattr(index_lib, 'index_kernel', no_rebuild)
  loaded = FgramTable.load(str(tmp_path / 't'), verify=False)
  assert isinstance(loaded.counts.base, np.memmap)  # Mapped, not read.
  assert loaded.fingerprint == table.fingerprint and len(loaded) == len(table)
  assert loaded.grams() == table.grams()
  np.testing.assert_array_equal(loaded.tokens_SxK, table.tokens_SxK)
  np.testing.assert_array_equal(loaded.counts, table.counts)
  rows = np.array([0, 5, len(table) - 1, 17])
  np.testing.assert_array_equal(loaded.tokens_of(rows), table.tokens_SxK[rows])
  # Bytes per f-gram of the saved layout, index included (target <= 40 for K=5).
  on_disk = sum(os.path.getsize(tmp_path / 't' / f) for f in os.listdir(tmp_path / 't')
                if f.endswith('.npy'))
  assert on_disk / len(table) < 40 and loaded.nbytes / len(table) < 40
  rng = np.random.default_rng(1)
  docs_tokens = loaded.tokens_SxK[rng.integers(0, len(loaded), 64)]
  tokens = np.concatenate([docs_tokens, rng.integers(100_000, 100_000 + 7 * 256, (64, 9))],
                          axis=1).reshape(16, -1)
  segments = np.cumsum(rng.random(tokens.shape) < 0.1, axis=1) + 1
  want = reference_match(table, tokens, segments)
  for t in (table, loaded):
    ids, lens = t.match(tokens, segments)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(lens, want[1])
  assert (want[1] == 5).any()


@pytest.mark.parametrize('seed', range(4))
def test_slices_of_loaded_tables_match_exactly(tmp_path, seed):
  rng = np.random.default_rng(seed)
  table = random_table(rng, 4, 4, 60)
  table.save(str(tmp_path / 'full'))
  loaded = FgramTable.load(str(tmp_path / 'full'))
  tokens, segments = random_batch(rng, 4, 3, 25)
  for size in (1, len(table) // 3, len(table) - 1):
    sliced = loaded.slice(size)  # Shares the index: probes skip rows >= size.
    want = reference_match(table.slice(size), tokens, segments)
    ids, lens = sliced.match(tokens, segments)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(lens, want[1])
    assert sliced.fingerprint == table.slice(size).fingerprint
    docs = np.cumsum(rng.random(tokens.shape) < 0.1, axis=1) + 1  # No padding.
    matcher = IncrementalMatcher(sliced, 3)
    got = []
    for i in range(tokens.shape[1]):
      for b in range(3):
        if i == 0 or docs[b, i] != docs[b, i - 1]:
          matcher.reset(b)
      got.append(matcher.push(tokens[:, i])[0])
    np.testing.assert_array_equal(np.stack(got, 1),
                                  reference_match(table.slice(size), tokens, docs)[0])
    sliced.save(str(tmp_path / f's{size}'))  # Its own, smaller index.
    again = FgramTable.load(str(tmp_path / f's{size}'))
    assert again.fingerprint == sliced.fingerprint and again.grams() == sliced.grams()
    assert again.index[0].shape[0] == index_lib.capacity(size)


def test_old_layout_still_loads(tmp_path):
  table = text_table(300, 3)
  path = tmp_path / 'old'
  os.makedirs(path)
  for name, array in (('tokens.npy', table.tokens_SxK), ('counts.npy', table.counts),
                      ('lengths.npy', table.lengths.astype(np.int32))):
    np.save(path / name, array)
  artifacts.write_manifest(str(path), 'fgram_table', {'max_len': 3, 'size': len(table),
                                                      'min_count': 2})
  old = FgramTable.load(str(path))
  assert old.fingerprint == table.fingerprint


def test_load_rejects_wrong_arrays(tmp_path):
  table = text_table(300, 3)
  table.save(str(tmp_path / 't'))
  np.save(tmp_path / 't' / 'lengths.npy', np.asarray(table.lengths, np.int32))
  with pytest.raises(artifacts.ArtifactError, match='unreadable|truncated'):
    FgramTable.load(str(tmp_path / 't'), verify=False)


def test_tagging_reads_only_matched_rows_of_a_loaded_table(tmp_path):
  """tag_fgrams on a mapped table reads rows by `tokens_of`: S x K is never built, and
  the packed rows equal those of the table with its token matrix in memory."""
  from scone_jax.batches.tagging import tag_fgrams  # pylint: disable=g-import-not-at-top
  table = text_table()
  table.save(str(tmp_path / 't'))
  loaded = FgramTable.load(str(tmp_path / 't'), verify=False)
  text = np.frombuffer(open(os.__file__, 'rb').read()[:4096], np.uint8)
  tokens_BxT = (text.astype(np.int32) * 7 + 100_000).reshape(4, 1024)
  batch = dict(inputs_BxT=tokens_BxT, segment_ids_BxT=np.ones((4, 1024), np.int32))
  want = tag_fgrams(batch, table)
  assert table._tokens is not None  # pylint: disable=protected-access
  got = tag_fgrams(batch, loaded)
  assert loaded._tokens is None  # pylint: disable=protected-access
  assert want['stats/fgram_unique'] > 10
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value)
