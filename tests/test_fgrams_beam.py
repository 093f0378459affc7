"""The Beam miner (DirectRunner) produces exactly the local miner's table."""

import numpy as np
import pytest

pytest.importorskip('apache_beam')

from scone_jax.fgrams import mine_fgrams  # noqa: E402
from scone_jax.fgrams.beam import mine_fgrams_beam  # noqa: E402


def small_corpus():
  rng = np.random.default_rng(0)
  text = open(np.__file__, 'rb').read()[:3000]
  docs = [np.frombuffer(p, np.uint8).astype(np.int64) for p in text.split(b'\n') if p]
  return docs + [rng.integers(0, 4, rng.integers(0, 20)) for _ in range(30)]


def test_beam_equals_local(tmp_path):
  docs = small_corpus()
  local = mine_fgrams(docs, max_len=4, size=150, min_count=2, progress=False)
  from_docs = mine_fgrams_beam(docs, max_len=4, size=150, min_count=2)
  assert from_docs.grams() == local.grams()
  assert from_docs.fingerprint == local.fingerprint
  path = tmp_path / 'docs.txt'
  path.write_text(''.join(' '.join(map(str, d.tolist())) + '\n' for d in docs))
  from_files = mine_fgrams_beam(str(path), max_len=4, size=150, min_count=2)
  assert from_files.fingerprint == local.fingerprint


def test_beam_errors():
  with pytest.raises(ValueError, match='no n-gram of 2'):
    mine_fgrams_beam([np.array([1]), np.array([], np.int64)], max_len=3, size=5, min_count=1)
  with pytest.raises(ValueError, match='lower min_count'):
    mine_fgrams_beam([np.arange(6)], max_len=3, size=5, min_count=2)
  with pytest.raises(ValueError, match='max_len'):
    mine_fgrams_beam([np.arange(6)], max_len=1, size=5, min_count=1)
