"""Corruption acceptance tests (issue 22): flipped bytes in a checkpoint, the f-gram table,
the token shards or the export store (size, mtime and inode kept) are caught by the
command that would use them and by `python -m scone_jax.verify`; nothing non-finite is
written; a checkpoint saved before checksums existed still restores, with a warning.

One micro run (tests/train_helpers.py), made self-contained (its prepared artifacts
copied into W/prepare) and exported, is built per module; each destructive case copies it.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import artifacts, checkpoint_files, evaluate, verify
from scone_jax import mesh as mesh_lib
from scone_jax import run as run_lib
from scone_jax.errors import UserError
from scone_jax.export import export_store
from scone_jax.fgrams import FgramTable
from scone_jax.serve import EmbeddingStore
from scone_jax.tokenizer import TokenShards
from scone_jax.train import loop


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """(config, W): the reference micro run with its artifacts under W/prepare, exported."""
  cfg, ref = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path_factory.mktemp('integrity') / 'run')
  shutil.copytree(ref, workdir)
  shutil.copytree(cfg.data.artifacts_dir, os.path.join(workdir, 'prepare'))
  info_path = os.path.join(workdir, run_lib.RUN_FILE)
  info = json.load(open(info_path))
  prefix = cfg.data.artifacts_dir.rstrip('/') + '/'

  def relocate(ref):
    return ref and {**ref, 'location': 'prepare/' + ref['location'][len(prefix):]}
  for key in ('tokenizer', 'fgram_table', 'train_shards'):
    info[key] = relocate(info[key])
  info['eval_shards'] = {k: relocate(v) for k, v in info['eval_shards'].items()}
  artifacts.write_json_atomic(info_path, info)
  export_store(run_lib.RunDir(workdir).config(), workdir, progress=False)
  # Old enough for the open-time stat cache to record them ("racy" files are not).
  for root, _, files in os.walk(workdir):
    for name in files:
      os.utime(os.path.join(root, name), (1.6e9, 1.6e9))
  return cfg, workdir


def _copy(source, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(source[1], workdir)
  return workdir


def _flip(path: str, end: float = 1.0) -> None:
  """Inverts scattered bytes from a third of `path` to `end` of it, keeping its size,
  mtime and inode (bit rot, or a careless in-place edit that restores the timestamps)."""
  before = os.stat(path)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, int(len(data) * end), 97):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = os.stat(path)
  assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
      before.st_size, before.st_mtime_ns, before.st_ino)


def _largest_file(directory: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


def _checkpoints(workdir: str) -> str:
  return os.path.join(workdir, run_lib.CHECKPOINTS)


def _statuses(workdir: str) -> dict[str, str]:
  return {item.name: item.status for item in verify.verify_run(workdir)}


def test_saved_steps_carry_checksums_and_verify_passes(source):
  _, workdir = source
  assert checkpoint_files.committed_steps(_checkpoints(workdir)) == [2, 4]
  statuses = _statuses(workdir)
  assert statuses == {
      'config.json': 'intact', 'run.json': 'intact', 'checkpoint step 2': 'intact',
      'checkpoint step 4': 'intact', 'tokenizer': 'intact', 'f-gram table': 'intact',
      'train token shards': 'intact', "eval token shards 'heldout'": 'intact',
      'export store': 'intact'}


def test_committed_steps_skip_temporaries_and_moved_aside_steps(tmp_path):
  for name in ('2', '10', '12.orbax-checkpoint-tmp-1733', '8.corrupt-20261207T120000',
               'notes'):
    (tmp_path / name).mkdir()
  (tmp_path / '14').write_text('a file, not a step')
  assert checkpoint_files.committed_steps(str(tmp_path)) == [2, 10]
  assert checkpoint_files.committed_steps(str(tmp_path / 'none')) == []


def test_train_resumes_from_the_previous_step_past_flipped_bytes(source, tmp_path):
  cfg, workdir = source
  workdir = _copy(source, tmp_path)
  _flip(_largest_file(os.path.join(_checkpoints(workdir), '4')))
  assert checkpoint_files.check_step(_checkpoints(workdir), 4).status == 'corrupt'
  result = loop.train(cfg, workdir)
  assert (result.status, result.resumed_from, result.step) == ('completed', 2, 4)
  names = os.listdir(_checkpoints(workdir))
  assert any(n.startswith('4.corrupt-') for n in names), names
  # Steps 3 and 4 were trained again from step 2: the same state as the uninterrupted run.
  assert checkpoint_files.check_step(_checkpoints(workdir), 4).status == 'intact'
  got, want = th.checkpoint_arrays(workdir, 4), th.checkpoint_arrays(source[1], 4)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_evaluate_and_export_refuse_flipped_bytes_and_keep_eval_json(source, tmp_path,
                                                                     caplog):
  workdir = _copy(source, tmp_path)
  _flip(_largest_file(os.path.join(_checkpoints(workdir), '4')))
  eval_json = os.path.join(workdir, run_lib.EVAL_FILE)
  before = open(eval_json, 'rb').read()
  with pytest.raises(checkpoint_files.CheckpointCorruptError,
                     match=r'step 4 .*crc32c.*scone_jax\.verify.*step 2 is the newest intact'):
    evaluate.evaluate(workdir)
  assert open(eval_json, 'rb').read() == before
  with pytest.raises(checkpoint_files.CheckpointCorruptError, match='step 4'):
    export_store(run_lib.RunDir(workdir).config(), workdir, progress=False)
  statuses = _statuses(workdir)
  assert (statuses['checkpoint step 2'], statuses['checkpoint step 4']) == (
      'intact', 'corrupt')
  # An explicit older step is intact and evaluates, without orbax's read-only manager
  # line ("Given directory is read only") that every command used to print.
  with caplog.at_level(logging.WARNING):
    assert evaluate.evaluate(workdir, step=2)['step'] == 2
  assert 'read only' not in caplog.text


def test_non_finite_weights_are_refused_and_never_written(source, tmp_path):
  workdir = _copy(source, tmp_path)
  # A step whose weights are NaN but whose files are whole (saved before checksums
  # existed): only the finiteness check can refuse it.
  tree = ocp.StandardCheckpointer().restore(os.path.join(_checkpoints(workdir), '4', 'state'))
  nan_tree = jax.tree.map(
      lambda x: np.full_like(x, np.nan) if np.issubdtype(x.dtype, np.floating) else x, tree)
  os.makedirs(os.path.join(_checkpoints(workdir), '6'))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(_checkpoints(workdir), '6', 'state'), nan_tree)
  ckptr.wait_until_finished()
  ckptr.close()
  eval_json = os.path.join(workdir, run_lib.EVAL_FILE)
  before = open(eval_json, 'rb').read()
  with pytest.raises(checkpoint_files.CheckpointCorruptError,
                     match=r'step 6 .*not finite.*step 4 is the newest intact'):
    evaluate.evaluate(workdir)
  # The writer itself refuses a non-finite loss, whatever produced it.
  nan = evaluate.CorpusEval(loss=float('nan'), perplexity=float('nan'),
                            bits_per_byte=float('nan'), tokens=512.0, fraction_evaluated=0.1)
  with pytest.raises(evaluate.NonFiniteEvalError, match=r'step 6 .*not finite.*verify'):
    evaluate.write_eval(workdir, 6, {'heldout': nan})
  assert issubclass(evaluate.NonFiniteEvalError, UserError)
  assert open(eval_json, 'rb').read() == before


def test_checkpoint_without_checksums_restores_with_a_warning(source, tmp_path, caplog):
  cfg, _ = source
  workdir = _copy(source, tmp_path)
  for step in (2, 4):
    os.remove(os.path.join(_checkpoints(workdir), str(step), checkpoint_files.CHECKSUMS_FILE))
  run_dir = run_lib.RunDir(workdir)
  with caplog.at_level(logging.WARNING):
    _, step = run_dir.restore_model(cfg, mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size))
  assert step == 4
  assert 'step 4' in caplog.text and 'saved by an older version' in caplog.text
  assert _statuses(workdir)['checkpoint step 4'] == 'unverified'
  result = loop.train(cfg, workdir)  # At train.steps already: restores, evaluates.
  assert (result.status, result.resumed_from) == ('completed', 4)


def test_bit_rot_in_artifacts_is_caught_on_open_and_by_verify(source, tmp_path):
  workdir = _copy(source, tmp_path)
  info = run_lib.RunDir(workdir).info()
  table_dir = os.path.join(workdir, info['fgram_table']['location'])
  shards_dir = os.path.join(workdir, info['eval_shards']['heldout']['location'])
  store_dir = os.path.join(workdir, 'export')
  # Opened once intact: the stat cache records the files, as after any earlier run.
  FgramTable.load(table_dir)
  TokenShards.open(shards_dir)
  EmbeddingStore.open(store_dir, 'ram')
  assert os.path.exists(os.path.join(table_dir, artifacts.VERIFIED))
  _flip(os.path.join(table_dir, 'keys.npy'))
  _flip(os.path.join(shards_dir, 'tokens.bin'))
  # The rows (a shard file's first part; its index at the end is tensorstore's to check).
  _flip(_largest_file(os.path.join(store_dir, 'c')), end=0.5)
  with pytest.raises(artifacts.ArtifactError, match=r'keys\.npy fails its crc32c'):
    FgramTable.load(table_dir)
  with pytest.raises(artifacts.ArtifactError, match=r'tokens\.bin fails its crc32c'):
    TokenShards.open(shards_dir)
  with pytest.raises(artifacts.ArtifactError, match='checksum'):
    EmbeddingStore.open(store_dir, 'ram')
  done = subprocess.run([sys.executable, '-m', 'scone_jax.verify', f'--workdir={workdir}'],
                        env=th.subprocess_env(1), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  for name in ('f-gram table', "eval token shards 'heldout'", 'export store'):
    assert any(line.startswith(f'{name}: corrupt (') for line in lines), (name, lines)
  for name in ('checkpoint step 4', 'tokenizer', 'train token shards'):
    assert f'{name}: intact' in lines, (name, lines)


def test_open_time_crc32c_budget_and_manifests_without_crc32c(tmp_path, monkeypatch):
  d = tmp_path / 'art'
  d.mkdir()
  (d / 'a.bin').write_bytes(bytes(range(256)) * 64)
  manifest = artifacts.write_manifest(str(d), 'thing', {})
  assert manifest['files']['a.bin']['crc32c'] == artifacts.crc32c_file(str(d / 'a.bin'))
  os.utime(d / 'a.bin', (1.6e9, 1.6e9))
  artifacts.read_manifest(str(d), 'thing')  # Passes its sha256: cached.
  _flip(str(d / 'a.bin'))
  # Past the per-open budget only the stat cache is consulted; verify='full' reads all.
  monkeypatch.setattr(artifacts, 'OPEN_CRC32C_BYTES', 1000)
  artifacts.read_manifest(str(d), 'thing')
  with pytest.raises(artifacts.ArtifactError, match='crc32c'):
    artifacts.read_manifest(str(d), 'thing', verify='full')
  monkeypatch.undo()
  with pytest.raises(artifacts.ArtifactError, match='crc32c'):
    artifacts.read_manifest(str(d), 'thing')
  # A manifest written before crc32c was recorded loads as before (sha256 + stat cache).
  (d / 'a.bin').write_bytes(bytes(range(256)) * 64)
  old = artifacts.write_manifest(str(d), 'thing', {})
  for entry in old['files'].values():
    del entry['crc32c']
  artifacts.write_json_atomic(str(d / artifacts.MANIFEST), old)
  assert artifacts.read_manifest(str(d), 'thing', verify='full')['kind'] == 'thing'
