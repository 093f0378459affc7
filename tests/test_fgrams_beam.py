"""The Beam miner (DirectRunner, in-process and multi-process) equals the local miner."""

import json

import numpy as np
import pytest

pytest.importorskip('apache_beam')

from scone_jax.fgrams import beam as beam_lib  # noqa: E402
from scone_jax.fgrams import FgramTable  # noqa: E402
from scone_jax.fgrams import index as index_lib  # noqa: E402
from scone_jax.fgrams import mine_fgrams  # noqa: E402
from scone_jax.fgrams.beam import mine_fgrams_beam  # noqa: E402


def small_corpus():
  rng = np.random.default_rng(0)
  text = open(np.__file__, 'rb').read()[:3000]
  docs = [np.frombuffer(p, np.uint8).astype(np.int64) for p in text.split(b'\n') if p]
  return docs + [rng.integers(0, 4, rng.integers(0, 20)) for _ in range(30)]


def _assert_same_matches(table, reference, docs):
  """Every row found at its own key, and the same longest matches on the corpus (so
  misses agree too)."""
  slots, limit = table.index
  found = [index_lib.find(slots, limit, key) for key in table.keys]
  assert found == list(range(len(table)))
  tokens = np.concatenate(docs)[:4000].reshape(1, -1)
  got, want = table.match(tokens), reference.match(tokens)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_beam_equals_local(tmp_path, monkeypatch):
  """Equal tables, the cut at row S splitting a (count, length, first token) group; the
  workers write shards, the manifest comes last: without it (or with a shard changed) the
  sharded table is refused."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  docs = small_corpus()
  monkeypatch.setattr(beam_lib, '_ROWS_PER_SHARD', 16)
  monkeypatch.setattr(beam_lib, '_INDEX_RANGE_SLOTS', 8)  # 224 slots: 28 ranges, spills.
  local = mine_fgrams(docs, max_len=4, size=145, min_count=2, progress=False)
  more = mine_fgrams(docs, max_len=4, size=146, min_count=2, progress=False)
  assert (more.counts[144], more.lengths[144], more.tokens_SxK[144, 0]) == (
      more.counts[145], more.lengths[145], more.tokens_SxK[145, 0])
  from_docs = mine_fgrams_beam(docs, max_len=4, size=145, min_count=2,
                               output_dir=str(tmp_path / 'out'))
  assert from_docs.grams() == local.grams()
  assert from_docs.fingerprint == local.fingerprint
  assert from_docs.meta['beam_worker_peak_rss_mb'] > 0
  table_dir = tmp_path / 'out' / 'table'
  assert len(list(table_dir.glob('keys-*.npy'))) == 10  # 145 rows, 16 a shard.
  assert beam_lib.load_table_shards(str(table_dir)).fingerprint == local.fingerprint
  # The workers built the match index by slot range; this host only placed the spills.
  manifest = json.loads((table_dir / 'manifest.json').read_text())
  assert len(manifest['index_ranges']) > 10 and manifest['index_spills']
  assert isinstance(from_docs.index[0].base, np.memmap)  # Mapped, not rebuilt.
  _assert_same_matches(from_docs, local, docs)
  out_dir = tmp_path / 'assembled'
  assert beam_lib.load_table_shards(str(table_dir), out_dir=str(out_dir)).fingerprint == (
      local.fingerprint)
  assert FgramTable.load(str(out_dir), verify='full').fingerprint == local.fingerprint
  # A manifest that lies about the spills: the launcher's count of placed rows refuses it.
  lying = dict(manifest, index_spills=manifest['index_spills'][1:])
  (table_dir / 'manifest.json').write_text(json.dumps(lying))
  with pytest.raises(artifacts.ArtifactError, match='each of the 145 rows once'):
    beam_lib.load_table_shards(str(table_dir), verify=False)
  (table_dir / 'manifest.json').write_text(json.dumps(manifest))
  index_part = table_dir / f'index-{manifest["index_ranges"][0]:05d}.npy'
  index_part.write_bytes(index_part.read_bytes()[:-4] + b'\0' * 4)
  with pytest.raises(artifacts.ArtifactError, match=index_part.name):
    beam_lib.load_table_shards(str(table_dir), verify='full')
  shard = table_dir / 'counts-00001.npy'
  shard.write_bytes(shard.read_bytes()[:-8] + b'\0' * 8)
  with pytest.raises(artifacts.ArtifactError, match='counts-00001'):
    beam_lib.load_table_shards(str(table_dir), verify='full')
  (table_dir / 'manifest.json').unlink()
  with pytest.raises(artifacts.ArtifactError, match='incomplete'):
    beam_lib.load_table_shards(str(table_dir))
  path = tmp_path / 'docs.txt'
  path.write_text(''.join(' '.join(map(str, d.tolist())) + '\n' for d in docs))
  from_files = mine_fgrams_beam(str(path), max_len=4, size=145, min_count=2)
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


def test_every_kept_gram_equals_local():
  """S above the number of kept grams: cutoff 0, every gram is a row."""
  docs = small_corpus()
  local = mine_fgrams(docs, max_len=4, size=10**6, min_count=2, progress=False)
  assert len(local) < 10**6
  got = mine_fgrams_beam(docs, max_len=4, size=10**6, min_count=2)
  assert got.fingerprint == local.fingerprint


def test_group_starts_and_plan():
  plan = beam_lib._plan({9: 2, 7: 3, 5: 10}, 8, 4, 64)
  assert plan == dict(cutoff=5, rows=8, first_row={9: 0, 7: 2, 5: 5}, rows_per_shard=4,
                      index_slots=index_lib.capacity(8), range_slots=64)
  starts = dict(beam_lib._group_starts((5, {(3, 1): 2, (2, 9): 1, (2, 4): 2}), plan))
  assert starts == {(5, 2, 4): 5, (5, 2, 9): 7}  # (3, 1) would start at row 8 >= S.


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
