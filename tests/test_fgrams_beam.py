"""The Beam miner (DirectRunner, in-process and multi-process) equals the local miner."""

import numpy as np
import pytest

pytest.importorskip('apache_beam')

from scone_jax.fgrams import beam as beam_lib  # noqa: E402
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


@pytest.mark.parametrize('mode', ['multi_threading', pytest.param(
    'multi_processing', marks=pytest.mark.slow)])  # ~50 s: worker processes start.
def test_token_shards_equal_local(tmp_path, monkeypatch, mode):
  """A real corpus slice as TokenShards, read by document ranges (on 2 worker processes
  in 'multi_processing' mode)."""
  from apache_beam.options.pipeline_options import PipelineOptions
  from scone_jax.tokenizer import shards as shards_lib  # pylint: disable=g-import-not-at-top
  text = open(np.__file__, 'rb').read() + open(pytest.__file__, 'rb').read()
  docs = [np.frombuffer(p, np.uint8).astype(np.uint16) for p in text.split(b'\n\n') if p]
  directory = tmp_path / 'shards'
  directory.mkdir()
  np.concatenate(docs).tofile(directory / shards_lib.TOKENS_FILE)
  np.save(directory / shards_lib.OFFSETS_FILE,
          np.cumsum([0] + [d.size for d in docs]).astype(np.int64))
  shards = shards_lib.TokenShards(str(directory), {}, np.memmap(
      directory / shards_lib.TOKENS_FILE, np.uint16, 'r'), np.load(
          directory / shards_lib.OFFSETS_FILE))
  monkeypatch.setattr(beam_lib, '_DOCS_PER_RANGE', 7)  # Many ranges over few documents.
  local = mine_fgrams(shards, max_len=5, size=400, min_count=3, progress=False)
  options = PipelineOptions(['--direct_num_workers=2', f'--direct_running_mode={mode}'])
  got = mine_fgrams_beam(shards, max_len=5, size=400, min_count=3,
                         pipeline_options=options)
  assert got.fingerprint == local.fingerprint and len(got) == 400


def test_histogram_cutoff():
  hist = {9: 2, 7: 3, 5: 10}
  assert [beam_lib._cutoff(hist, s) for s in (1, 2, 3, 5, 6, 15, 16)] == [9, 9, 7, 7, 5, 5, 0]


def test_beam_errors():
  with pytest.raises(ValueError, match='no n-gram of 2'):
    mine_fgrams_beam([np.array([1]), np.array([], np.int64)], max_len=3, size=5, min_count=1)
  with pytest.raises(ValueError, match='lower min_count'):
    mine_fgrams_beam([np.arange(6)], max_len=3, size=5, min_count=2)
  with pytest.raises(ValueError, match='max_len'):
    mine_fgrams_beam([np.arange(6)], max_len=1, size=5, min_count=1)
