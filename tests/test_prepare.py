"""The prepare stage end to end: artifacts, stage skipping, invalidation, load_prepared, CLI."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax import config as config_lib
from scone_jax import fgrams
from scone_jax import prepare as prepare_lib

_PHRASES = ['the model reads tokens', 'scaling embedding layers', 'frequent n grams',
            'a b c d', 'über naïve café', 'line two']


def _corpus(path, n, seed):
  rng = random.Random(seed)
  lines = [' '.join(rng.choice(_PHRASES) for _ in range(rng.randint(1, 6))) for _ in range(n)]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return lines


@pytest.fixture
def setup(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  train = _corpus(data / 'train.txt', 300, 0)
  held = _corpus(data / 'held.txt', 40, 1)
  cfg = config_lib.replace(
      config_lib.from_configdict(config_lib.base_config()), **{
          'data.source': 'files', 'data.train_files': str(data / 'train.txt'),
          'data.eval_files': f'held={data / "held.txt"}', 'tokenizer.vocab_size': 300,
          'fgram.max_len': 3, 'fgram.size': 50, 'fgram.min_count': 2})
  return cfg, str(tmp_path / 'run'), train, held


def _mtimes(art):
  return {os.path.relpath(os.path.join(d, f), art): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(art) for f in files}


def _reference_ngram_counts(docs, max_len):
  counts = {}
  for doc in docs:
    for n in range(2, max_len + 1):
      for i in range(len(doc) - n + 1):
        key = tuple(int(t) for t in doc[i:i + n])
        counts[key] = counts.get(key, 0) + 1
  return counts


def test_prepare_end_to_end(setup):
  cfg, workdir, train, held = setup
  p = prepare_lib.prepare(cfg, workdir)
  art = os.path.join(workdir, 'prepare')
  assert p.artifacts_dir == art and p.train_dir == os.path.join(art, 'tokens', 'train')
  assert p.eval_dirs == {'held': os.path.join(art, 'tokens', 'eval-held')}
  assert p.skipped == ()
  tok = p.tokenizer
  assert tok.vocab_size == 300 and p.tokenizer_fingerprint == tok.fingerprint
  assert [tok.decode(d) for d in p.train_shards] == train
  assert [tok.decode(d) for d in p.eval_shards['held']] == held
  assert p.train_shards.num_bytes == sum(len(t.encode()) for t in train)
  # The f-gram table is mined from the train shards: check counts against plain Python.
  counts = _reference_ngram_counts(list(p.train_shards), 3)
  table = fgrams.FgramTable.load(p.fgram_dir, expect_tokenizer=tok.fingerprint)
  assert table.fingerprint == p.fgram_fingerprint and 0 < len(table) <= 50
  assert [counts[g] for g in table.grams()] == list(table.counts)
  text = prepare_lib.summary(p)
  for needle in ('tokenizer: vocab 300', 'eval-held', 'f-grams:', 'cutoff count', 'seconds:'):
    assert needle in text


def test_rerun_skips_every_stage(setup):
  cfg, workdir, _, _ = setup
  prepare_lib.prepare(cfg, workdir)
  before = _mtimes(os.path.join(workdir, 'prepare'))
  again = prepare_lib.prepare(cfg, workdir)
  assert set(again.skipped) == {'tokenizer', 'tokens/train', 'tokens/held', 'fgrams'}
  assert _mtimes(os.path.join(workdir, 'prepare')) == before


def test_changed_tokenizer_invalidates_downstream(setup):
  cfg, workdir, _, _ = setup
  first = prepare_lib.prepare(cfg, workdir)
  changed = config_lib.replace(cfg, **{'tokenizer.vocab_size': 290})
  with pytest.raises(artifacts.ArtifactError, match='missing or stale.*scone_jax.prepare'):
    prepare_lib.load_prepared(changed, workdir)
  second = prepare_lib.prepare(changed, workdir)
  assert second.skipped == ()
  assert second.tokenizer_fingerprint != first.tokenizer_fingerprint
  assert second.train_shards.manifest['tokenizer_fingerprint'] == second.tokenizer_fingerprint
  assert second.table.meta['tokenizer_fingerprint'] == second.tokenizer_fingerprint
  assert prepare_lib.load_prepared(changed, workdir).fgram_fingerprint == \
      second.fgram_fingerprint


def test_changed_fgram_params_rebuild_only_the_table(setup):
  cfg, workdir, _, _ = setup
  prepare_lib.prepare(cfg, workdir)
  changed = config_lib.replace(cfg, **{'fgram.min_count': 3})
  p = prepare_lib.prepare(changed, workdir)
  assert set(p.skipped) == {'tokenizer', 'tokens/train', 'tokens/held'}
  assert p.table.min_count == 3 and int(p.table.counts.min()) >= 3


def test_changed_eval_file_rebuilds_only_its_shards(setup):
  cfg, workdir, _, _ = setup
  prepare_lib.prepare(cfg, workdir)
  held_path = cfg.data.eval_files.split('=', 1)[1]
  with open(held_path, 'a') as f:
    f.write('one more line\n')
  p = prepare_lib.prepare(cfg, workdir)
  assert set(p.skipped) == {'tokenizer', 'tokens/train', 'fgrams'}
  assert p.tokenizer.decode(p.eval_shards['held'].doc(-1 + len(p.eval_shards['held']))) == \
      'one more line'


def test_load_prepared(setup):
  cfg, workdir, _, _ = setup
  with pytest.raises(artifacts.ArtifactError, match='missing or stale'):
    prepare_lib.load_prepared(cfg, workdir)
  p = prepare_lib.prepare(cfg, workdir)
  q = prepare_lib.load_prepared(cfg, workdir)
  assert (q.tokenizer_fingerprint, q.train_fingerprint, q.fgram_fingerprint) == (
      p.tokenizer_fingerprint, p.train_fingerprint, p.fgram_fingerprint)
  assert np.array_equal(q.train_shards.tokens, p.train_shards.tokens)
  assert q.timings == {} and 'tokenizer=' not in repr(q)
  os.remove(os.path.join(q.fgram_dir, 'manifest.json'))
  with pytest.raises(artifacts.ArtifactError, match='fgram_table'):
    prepare_lib.load_prepared(cfg, workdir)


def test_shared_artifacts_dir_and_existing_model_file(setup, tmp_path):
  cfg, workdir, train, _ = setup
  first = prepare_lib.prepare(cfg, workdir)
  shared = config_lib.replace(cfg, **{
      'data.artifacts_dir': str(tmp_path / 'shared'),
      'tokenizer.model_file': os.path.join(first.artifacts_dir, 'tokenizer', 'spm.model')})
  p = prepare_lib.prepare(shared, str(tmp_path / 'other_run'))
  assert p.artifacts_dir == str(tmp_path / 'shared')
  assert p.tokenizer_fingerprint == first.tokenizer_fingerprint
  assert p.fgram_fingerprint == first.fgram_fingerprint
  bad = config_lib.replace(shared, **{'tokenizer.vocab_size': 512})
  with pytest.raises(ValueError, match='vocab_size=300'):
    prepare_lib.prepare(bad, str(tmp_path / 'other_run'))


def test_bad_input_fails_clearly(setup):
  cfg, workdir, _, _ = setup
  bad = config_lib.replace(cfg, **{'data.train_files': '/nonexistent/*.txt'})
  with pytest.raises(ValueError, match=r'data.train_files: glob .* matches no files'):
    prepare_lib.prepare(bad, workdir)
  bad = config_lib.replace(cfg, **{'data.eval_files': cfg.data.train_files})
  with pytest.raises(ValueError, match="cannot be named 'train'"):
    prepare_lib.prepare(bad, workdir)


def test_cli_prints_summary(setup):
  cfg, workdir, _, _ = setup
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'scone_jax.prepare', '--config=experiments/tiny.py',
       f'--workdir={workdir}', '--config.data.source=files',
       f'--config.data.train_files={cfg.data.train_files}',
       f'--config.data.eval_files={cfg.data.eval_files}', '--config.tokenizer.vocab_size=300',
       '--config.fgram.max_len=3', '--config.fgram.size=50', '--config.fgram.min_count=2'],
      cwd=root, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'f-grams:' in result.stdout and 'eval-held' in result.stdout
  assert prepare_lib.load_prepared(cfg, workdir).table is not None


def test_embedded_tiny_preset(tmp_path):
  cfg = config_lib.from_configdict(_tiny())
  p = prepare_lib.prepare(cfg, str(tmp_path))
  assert set(p.eval_dirs) == {'stdlib'} and p.train_shards.num_tokens > 100_000
  assert len(p.table) > 1000
  assert set(prepare_lib.prepare(cfg, str(tmp_path)).skipped) == {
      'tokenizer', 'tokens/train', 'tokens/stdlib', 'fgrams'}


def _tiny():
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments', 'tiny.py')
  spec = importlib.util.spec_from_file_location('tiny_experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_bad_utf8_is_counted_in_the_shards_manifest(setup):
  cfg, workdir, _, _ = setup
  path = cfg.data.train_files
  with open(path, 'ab') as f:
    f.write(b'bad \xff\xfe bytes\n')
  p = prepare_lib.prepare(cfg, workdir)
  assert p.train_shards.manifest['bad_utf8_chars'] == 2
  assert p.tokenizer.decode(p.train_shards.doc(len(p.train_shards) - 1)) == \
      'bad \ufffd\ufffd bytes'
  assert p.eval_shards['held'].manifest['bad_utf8_chars'] == 0
  strict = config_lib.replace(cfg, **{'data.on_bad_utf8': 'error'})
  with pytest.raises(ValueError, match=r'train.txt:301: invalid UTF-8'):
    prepare_lib.prepare(strict, workdir)


def test_beam_miner_gives_the_same_table(setup):
  pytest.importorskip('scone_jax.fgrams.beam')
  cfg, workdir, _, _ = setup
  local = prepare_lib.prepare(cfg, workdir)
  beam = prepare_lib.prepare(config_lib.replace(cfg, **{'fgram.miner': 'beam'}),
                             workdir + '_beam')
  assert beam.table.meta['miner'] == 'beam'
  assert beam.fgram_fingerprint == local.fgram_fingerprint


def test_verified_files_are_not_rehashed_until_they_change(tmp_path, monkeypatch):
  d = tmp_path / 'art'
  d.mkdir()
  (d / 'data.bin').write_bytes(b'x' * 1000)
  artifacts.write_manifest(str(d), 'thing', {})
  hashed = []
  real = artifacts.sha256_file
  monkeypatch.setattr(artifacts, 'sha256_file', lambda p: hashed.append(p) or real(p))
  artifacts.read_manifest(str(d), 'thing')
  # Modified just now: not cached yet (a same-size change could keep the mtime).
  assert len(hashed) == 1 and not (d / artifacts.VERIFIED).exists()
  old = os.stat(d / 'data.bin').st_mtime - 60
  os.utime(d / 'data.bin', (old, old))
  artifacts.read_manifest(str(d), 'thing')
  assert len(hashed) == 2 and (d / artifacts.VERIFIED).exists()
  artifacts.read_manifest(str(d), 'thing')  # Unchanged since it passed: skipped.
  assert len(hashed) == 2
  artifacts.read_manifest(str(d), 'thing', verify='full')
  assert len(hashed) == 3
  # Same size, new content: the mtime changed, so it is hashed again and fails.
  (d / 'data.bin').write_bytes(b'y' * 1000)
  with pytest.raises(artifacts.ArtifactError, match='sha256'):
    artifacts.read_manifest(str(d), 'thing')
  # A rewritten manifest (e.g. a rebuild) ignores the cache file.
  assert artifacts.write_manifest(str(d), 'thing', {})['files'].keys() == {'data.bin'}


# --- held-out sets must be held out, and the table must have the S asked for ----------


def test_eval_file_that_is_a_train_file_is_refused(setup, tmp_path):
  cfg, workdir, _, _ = setup
  train = cfg.data.train_files
  link = tmp_path / 'link.txt'
  os.symlink(train, link)
  for spec, key in ((f'held={train}', 'data.eval_files'),
                    (f'held={link}', 'data.eval_files'),  # Same file, another spelling.
                    (f'held={os.path.dirname(train)}/./train.txt', 'data.eval_files')):
    with pytest.raises(prepare_lib.CorpusError, match=rf'{key}: .*also a training file.*'
                       'not be held out'):
      prepare_lib.prepare(config_lib.replace(cfg, **{'data.eval_files': spec}), workdir)
  with pytest.raises(prepare_lib.CorpusError, match=r'data.valid_files: .*also a training'):
    prepare_lib.prepare(config_lib.replace(cfg, **{'data.valid_files': f'v={link}'}), workdir)
  assert not os.path.exists(workdir)  # Refused before anything was written.


def test_files_run_without_eval_files_needs_the_opt_out(setup):
  cfg, workdir, _, _ = setup
  no_eval = config_lib.replace(cfg, **{'data.eval_files': ''})
  with pytest.raises(prepare_lib.CorpusError,
                     match=r'data.eval_files is empty.*data.allow_no_eval=True'):
    prepare_lib.prepare(no_eval, workdir)
  assert not os.path.exists(workdir)
  p = prepare_lib.prepare(config_lib.replace(no_eval, **{'data.allow_no_eval': True}), workdir)
  assert p.eval_shards == {}


def test_table_shorter_than_the_requested_size_is_refused(setup):
  cfg, workdir, _, _ = setup
  mined = len(prepare_lib.prepare(cfg, workdir).table)
  big = config_lib.replace(cfg, **{'fgram.size': 5000, 'fgram_model.num_layers': 1})
  with pytest.raises(prepare_lib.ShortTableError) as e:
    prepare_lib.prepare(big, workdir)
  rows = len(fgrams.FgramTable.load(os.path.join(workdir, 'prepare', 'fgrams')))
  assert rows < 5000 and rows >= mined
  message = str(e.value)
  assert f'config.fgram.size=5,000 but the mined f-gram table has only {rows:,} rows' in message
  # min_count=2 cut it: every f-gram seen >= 2 times is in, so min_count 1 gives more.
  assert '--config.fgram.min_count=1 or lower would mine more' in message
  assert '--config.fgram.allow_short_table=True' in message
  # A sweep point slicing past the table fails the same way, naming its key.
  sliced = config_lib.replace(big, **{'fgram.use_size': rows + 1})
  with pytest.raises(prepare_lib.ShortTableError, match=rf'config.fgram.use_size={rows + 1:,}'):
    prepare_lib.prepare(sliced, workdir)
  prepare_lib.prepare(config_lib.replace(big, **{'fgram.use_size': rows}), workdir)  # Fits.
  allowed = prepare_lib.prepare(config_lib.replace(big, **{'fgram.allow_short_table': True}),
                                workdir)
  assert big.fgram.rows_used(len(allowed.table)) == rows
  # min_count=1 admits every n-gram: the message says no min_count helps.
  one = config_lib.replace(big, **{'fgram.min_count': 1, 'fgram.size': 10**6})
  with pytest.raises(prepare_lib.ShortTableError, match='no min_count gives more'):
    prepare_lib.prepare(one, workdir)
  # The baseline uses no table: its size is not a scaling point.
  prepare_lib.prepare(config_lib.replace(big, **{'fgram_model.num_layers': 0}), workdir)
