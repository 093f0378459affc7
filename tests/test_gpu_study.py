"""benchmarks/gpu_study.py: the corpus it takes, and its CPU smoke run (`--quick`)."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

import train_helpers as th

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    'gpu_study', os.path.join(REPO, 'benchmarks', 'gpu_study.py'))
gpu_study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_study)


def _corpus(directory):
  th.write_corpus(str(directory))
  for split, source in (('train', 'train.txt'), ('valid', 'eval.txt'), ('test', 'eval.txt')):
    with open(directory / source) as f:
      lines = f.read().splitlines()
    lines = lines[:60] if split == 'valid' else lines[60:] if split == 'test' else lines
    (directory / f'{split}.txt').write_text('\n'.join(lines) + '\n')
  return directory


def test_corpus_from_a_directory_or_a_tarball_and_missing_splits(tmp_path):
  d = _corpus(tmp_path / 'prose')
  assert gpu_study.corpus_dir(str(d), str(tmp_path)) == str(d)
  tar_path = tmp_path / 'prose.tar.xz'
  with tarfile.open(tar_path, 'w:xz') as tar:
    for split in ('train', 'valid', 'test'):
      tar.add(d / f'{split}.txt', arcname=f'prose/{split}.txt')
  got = gpu_study.corpus_dir(str(tar_path), str(tmp_path / 'scratch'))
  assert open(os.path.join(got, 'test.txt')).read() == (d / 'test.txt').read_text()
  os.remove(d / 'valid.txt')
  with pytest.raises(SystemExit, match='valid.txt'):
    gpu_study.corpus_dir(str(d), str(tmp_path))


@pytest.mark.slow
def test_quick_cpu_run_gives_each_arm_the_same_step_time(tmp_path):
  corpus = _corpus(tmp_path / 'prose')
  out = tmp_path / 'study.json'
  minutes = 0.05
  subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_study.py'),
                  '--device=cpu', '--quick', f'--corpus={corpus}', f'--minutes={minutes}',
                  f'--out={out}'], env=th.subprocess_env(1), check=True, timeout=1200,
                 capture_output=True)
  result = json.load(open(out))
  assert [a['arm'] for a in result['arms']] == ['baseline', 'scone']
  for arm in result['arms']:
    # steps x calibrated step time = the budget (to one step).
    budget = minutes * 60
    assert abs(arm['steps'] * arm['calibrated_step_seconds'] - budget) <= max(
        arm['calibrated_step_seconds'], 0.02 * budget)
    assert arm['tokens_seen'] == arm['steps'] * 4 * 32 and arm['epochs'] > 0
    assert 0 < arm['test_loss'] < 10 and arm['mfu'] is None  # CPU: no peak.
  assert result['test_loss_scone_minus_baseline'] == pytest.approx(
      result['arms'][1]['test_loss'] - result['arms'][0]['test_loss'])
