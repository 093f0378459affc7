"""Every stage's I/O with gs:// locations, against a local GCS emulator (tests/gcs_emulator.py).

Small and fast: byte-range token reads, artifact publish/verify, prepare (corpus globs,
tokenizer, shards, f-gram table all in the bucket), metrics, the export store, and a
training run reopened from the bucket (orbax checkpoints, run.json, evaluate). The whole
pipeline through the CLIs, with a kill -9, is the slow test in test_gcs_pipeline.py.
"""

import json
import os

import numpy as np
import pytest

import train_helpers as th
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from scone_jax import artifacts, paths
from scone_jax.artifacts import ArtifactError

compile_cache = th.compile_cache


def _upload_tree(local: str, remote: str) -> None:
  for name in paths.walk_files(local):
    with open(os.path.join(local, name), 'rb') as f:
      paths.write_bytes(paths.join(remote, name), f.read())


def test_paths_keep_urls_and_resolve_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve('gs://b/runs/x') == 'gs://b/runs/x'
  assert paths.resolve('runs/x') == str(tmp_path / 'runs' / 'x')
  assert paths.join('gs://b/runs', 'x', 'config.json') == 'gs://b/runs/x/config.json'
  assert paths.is_remote('gs://b') and not paths.is_remote('/a/gs://b')
  assert paths.kvstore('gs://b/e') == 'gs://b/e/'


def test_range_array_matches_numpy(gcs):
  rng = np.random.default_rng(0)
  want = rng.integers(0, 60000, size=10_007).astype(np.uint16)
  url = f'{gcs}/range/tokens.bin'
  paths.write_bytes(url, want.tobytes())
  got = paths.RangeArray(url, np.uint16, want.size, block_bytes=1000, cache_blocks=3)
  assert len(got) == want.size and got.dtype == want.dtype
  for a, b in ((0, 1), (0, 10_007), (499, 501), (9_990, 20_000), (7, 7)):
    np.testing.assert_array_equal(got[a:b], want[a:b])
  idx = rng.integers(0, want.size, size=(13, 17))
  np.testing.assert_array_equal(got[idx], want[idx])
  np.testing.assert_array_equal(got[np.array([-1, 0])], want[np.array([-1, 0])])
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(IndexError, match='out of range'):
    got[np.array([want.size])]


def test_artifact_is_published_with_its_manifest_last(gcs, tmp_path):
  final = f'{gcs}/artifacts/thing'
  with artifacts.atomic_dir(final) as tmp:
    with open(os.path.join(tmp, 'a.bin'), 'wb') as f:
      f.write(b'x' * 100)
    os.makedirs(os.path.join(tmp, 'sub'))
    with open(os.path.join(tmp, 'sub', 'b.txt'), 'w') as f:
      f.write('hello')
    artifacts.write_manifest(tmp, 'thing', {'v': 1}, files=['a.bin', 'sub/b.txt'])
  assert artifacts.read_manifest(final, 'thing', verify='full', expect={'v': 1})['v'] == 1
  # A failed rebuild leaves the published artifact as it was.
  with pytest.raises(RuntimeError):
    with artifacts.atomic_dir(final) as tmp:
      raise RuntimeError('boom')
  assert artifacts.read_manifest(final, 'thing')['v'] == 1
  # Same size, other bytes: the checksum catches it; a shorter file: the size does.
  paths.write_bytes(f'{final}/a.bin', b'y' * 100)
  with pytest.raises(ArtifactError, match='sha256'):
    artifacts.read_manifest(final, 'thing', verify=True)
  paths.write_bytes(f'{final}/a.bin', b'y' * 10)
  with pytest.raises(ArtifactError, match='truncated'):
    artifacts.read_manifest(final, 'thing', verify=False)
  # Without its manifest (an upload in progress or killed) it is incomplete, not stale.
  paths.remove(f'{final}/manifest.json')
  with pytest.raises(ArtifactError, match='incomplete'):
    artifacts.read_manifest(final, 'thing')
  with pytest.raises(ArtifactError, match='does not exist'):
    artifacts.read_manifest(f'{gcs}/artifacts/nothing', 'thing')


def test_prepare_in_a_bucket_equals_prepare_on_disk(gcs, tmp_path, tmp_path_factory):
  from scone_jax import prepare
  corpus, _ = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  remote_corpus = f'{gcs}/prepare/corpus'
  _upload_tree(corpus, remote_corpus)
  local = prepare.prepare(th.micro_config(corpus, str(tmp_path / 'art')), str(tmp_path))
  cfg = th.micro_config(remote_corpus, f'{gcs}/prepare/art', **{
      'data.train_files': f'{remote_corpus}/tr*.txt'})
  remote = prepare.prepare(cfg, f'{gcs}/prepare/run')
  assert remote.artifacts_dir == f'{gcs}/prepare/art'
  assert remote.tokenizer_fingerprint == local.tokenizer_fingerprint
  assert remote.fgram_fingerprint == local.fgram_fingerprint
  assert isinstance(remote.train_shards.tokens, paths.RangeArray)
  for name in ('train', 'heldout'):
    want = local.train_shards if name == 'train' else local.eval_shards[name]
    got = remote.train_shards if name == 'train' else remote.eval_shards[name]
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(got.offsets, want.offsets)
  # A rerun finds every stage current in the bucket.
  again = prepare.prepare(cfg, f'{gcs}/prepare/run')
  assert set(again.skipped) == {'tokenizer', 'tokens/train', 'tokens/heldout', 'fgrams'}
  assert not os.path.exists('gs:')  # Nothing went to ./gs:/... on local disk.
  # tokenizer.model_file in the bucket: installed as is (same fingerprint).
  with_model = th.micro_config(remote_corpus, f'{gcs}/prepare/art2', **{
      'tokenizer.model_file': f'{gcs}/prepare/art/tokenizer/spm.model'})
  assert prepare.prepare(with_model, f'{gcs}/prepare/run2').tokenizer_fingerprint == (
      local.tokenizer_fingerprint)


def test_metrics_are_mirrored_to_the_bucket(gcs):
  from scone_jax.train import metrics as metrics_lib
  workdir = f'{gcs}/metrics/run'
  writer = metrics_lib.MetricsWriter(workdir, enabled=True, upload_seconds=1e9)
  writer.write(1, {'loss': 2.0})
  writer.flush()
  assert metrics_lib.read_metrics(workdir) == [{'step': 1, 'loss': 2.0}]
  writer.write(2, {'loss': 1.5})
  writer.close()
  # A resumed run continues the same file.
  writer = metrics_lib.MetricsWriter(workdir, enabled=True)
  writer.write(3, {'loss': 1.0})
  writer.close()
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]
  assert any(n.startswith('tb/') for n in paths.walk_files(workdir))


@pytest.mark.parametrize('tier', ['ram', 'disk'])
def test_export_store_in_a_bucket(gcs, tier):
  from scone_jax.export.writer import write_store
  from scone_jax.serve import EmbeddingStore
  rng = np.random.default_rng(1)
  rows_SxD = rng.normal(size=(23, 8)).astype(np.float32)
  out = f'{gcs}/export/{tier}'
  neighbour = f'{gcs}/export/{tier}-config.json'  # Next to the store: must survive it.
  paths.write_bytes(neighbour, b'{}')
  write_store(out, 23, 8, 'float32', 10, lambda a, b: rows_SxD[a:b], {'checkpoint_step': 3},
              progress=False)
  assert not paths.exists(f'{out}.partial.done') and paths.exists(neighbour)
  store = EmbeddingStore.open(out, tier, expect={'checkpoint_step': 3}, verify=True)
  ids = np.array([0, 22, -1, 5, 5, 13])
  want = np.where((ids >= 0)[:, None], rows_SxD[ids], 0)
  np.testing.assert_array_equal(store.gather(ids), want)
  with pytest.raises(ArtifactError, match='object store'):
    EmbeddingStore.open(out, 'disk', disk_reader='memmap')


def test_a_run_copied_to_a_bucket_evaluates_the_same(gcs, tmp_path, tmp_path_factory):
  """Orbax checkpoints, run.json and the recorded artifacts read from gs:// (weights only)."""
  import shutil
  from scone_jax import evaluate as evaluate_lib
  _, workdir = th.reference_run(str(tmp_path_factory.getbasetemp()))
  local = str(tmp_path / 'run')
  shutil.copytree(workdir, local)
  want = evaluate_lib.evaluate(local)
  remote = f'{gcs}/copied/run'
  _upload_tree(local, remote)
  # On GCS orbax marks a finished step with commit_success.txt (on disk: an atomic
  # rename); a step copied from disk gets the marker, as orbax would have written it.
  for step in os.listdir(os.path.join(local, 'checkpoints')):
    paths.write_bytes(f'{remote}/checkpoints/{step}/commit_success.txt', b'copied')
  paths.remove(f'{remote}/eval.json')
  got = evaluate_lib.evaluate(remote)
  assert got == want
  assert json.loads(paths.read_text(f'{remote}/eval.json')) == want


def test_listings_see_what_another_process_wrote(gcs):
  """No per-process listing cache: a reader polling a run sees new steps and files."""
  import subprocess
  import sys
  paths.write_bytes(f'{gcs}/listing/2/x', b'1')
  assert sorted(paths.walk_files(f'{gcs}/listing')) == ['2/x']
  assert not paths.exists(f'{gcs}/listing/8/x')
  subprocess.run([sys.executable, '-c', 'from scone_jax import paths; '
                  f'paths.write_bytes("{gcs}/listing/8/x", b"1")'],
                 env=th.subprocess_env(1), check=True)
  assert sorted(paths.walk_files(f'{gcs}/listing')) == ['2/x', '8/x']
  assert paths.exists(f'{gcs}/listing/8/x')
