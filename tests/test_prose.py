"""scone_jax/corpus/prose.py: the natural-language study corpora's parsing and splits."""

import pytest

from scone_jax.corpus import CorpusError, prose


def test_split_is_seeded_disjoint_and_sized():
  docs = [f'document {i} ' + 'x' * (i % 50) for i in range(400)]
  a = prose.split(docs, heldout_bytes=2000, seed=0)
  assert a == prose.split(docs, heldout_bytes=2000, seed=0)
  assert a != prose.split(docs, heldout_bytes=2000, seed=1)
  assert sorted(a['train'] + a['valid'] + a['test']) == sorted(docs)
  for part in ('valid', 'test'):
    size = sum(len(d) + 1 for d in a[part])
    assert 2000 <= size < 2000 + 70  # whole documents: at most one past the target.
    assert a[part] == [d for d in docs if d in set(a[part])]  # original order kept.
  with pytest.raises(CorpusError, match='no training documents'):
    prose.split(docs[:3], heldout_bytes=10**6)


def test_fortune_records_one_per_document(tmp_path):
  (tmp_path / 'wisdom').write_text('A stitch in time.\n%\nTwo lines\n  of verse.\n%\n')
  (tmp_path / 'wisdom.dat').write_bytes(b'\x00\x01')
  (tmp_path / 'art').write_text('Art is long.\n%\n')
  assert prose.fortunes_documents(str(tmp_path)) == [
      'Art is long.', 'A stitch in time.', 'Two lines / of verse.']
  with pytest.raises(CorpusError, match='apt-get install fortunes'):
    prose.fortunes_documents(str(tmp_path / 'absent'))
