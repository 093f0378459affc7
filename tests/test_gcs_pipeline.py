"""The whole pipeline through the CLIs with every path under gs://, against local disk.

prepare -> train (kill -9 after a checkpoint, then resume) -> evaluate -> export ->
generate, once with the corpus, workdir and artifacts in the (emulated) bucket and once on
local disk: checkpoints, eval.json, the exported store and the generated text are
bitwise-equal. These are the commands of the README's "Buckets" section. Slow (~minutes).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from scone_jax import paths

pytestmark = pytest.mark.slow
OVERRIDES = {'train.steps': 8, 'checkpoint.every_steps': 2, 'model.max_seq_len': 64}


def _run(args: list[str], env: dict[str, str]) -> str:
  done = subprocess.run([sys.executable, '-m', *args], env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, f'{args}: {done.stderr[-3000:]}'
  return done.stdout


def _train_killed_then_resumed(config_file: str, workdir: str, env: dict[str, str],
                               log_path: str) -> int:
  """Starts train, kill -9s it once step 4 is committed, reruns it; returns the kill step."""
  cmd = [sys.executable, '-m', 'scone_jax.train', f'--config={config_file}',
         f'--workdir={workdir}']
  # orbax marks a finished step in a bucket with commit_success.txt.
  marker = paths.join(workdir, 'checkpoints', '4', 'commit_success.txt')
  # stderr to a file: a pipe nobody drains would block the logging child.
  log = open(log_path, 'w+')
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
  try:
    deadline = time.time() + 600
    while not paths.exists(marker):
      if proc.poll() is not None:
        log.seek(0)
        pytest.fail(f'train exited with {proc.returncode}: {log.read()[-3000:]}')
      assert time.time() < deadline, 'no checkpoint at step 4 within 600 s'
      time.sleep(0.2)
    proc.kill()
  finally:
    proc.wait()
    log.close()
  from scone_jax import run as run_lib
  killed_at = run_lib.RunDir(workdir).latest_step()
  assert killed_at < 8, 'the run finished before it was killed; nothing was tested'
  _run(cmd[2:], env)
  return killed_at


def _checkpoint_arrays(workdir: str, step: int, scratch: str) -> dict:
  """The saved TrainState of `step` as {path: array}. A step in a bucket is copied to local
  disk first: orbax restores a sub-item (`state`) directly only where a rename, not a
  commit_success.txt beside it, marks the step finished."""
  if paths.is_remote(workdir):
    # This process listed checkpoints/ while train ran: drop gcsfs's cached listings.
    import fsspec  # pylint: disable=g-import-not-at-top
    fsspec.filesystem('gs', finalize_on_close=True).invalidate_cache()
    local = os.path.join(scratch, 'checkpoint_copy')
    for name in paths.walk_files(paths.join(workdir, 'checkpoints', str(step))):
      target = os.path.join(local, 'checkpoints', str(step), name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, 'wb') as f:
        f.write(paths.read_bytes(paths.join(workdir, 'checkpoints', str(step), name)))
    workdir = local
  return th.checkpoint_arrays(workdir, step)


def _pipeline(config_file: str, workdir: str, env: dict[str, str], scratch: str,
              kill: str = '') -> dict:
  """The CLIs in order; `kill`: a log path, to kill -9 train once and resume it."""
  _run(['scone_jax.prepare', f'--config={config_file}', f'--workdir={workdir}'], env)
  if kill:
    _train_killed_then_resumed(config_file, workdir, env, kill)
  else:
    _run(['scone_jax.train', f'--config={config_file}', f'--workdir={workdir}'], env)
  _run(['scone_jax.evaluate', f'--workdir={workdir}'], env)
  _run(['scone_jax.export', f'--workdir={workdir}'], env)
  text = _run(['scone_jax.generate', f'--workdir={workdir}', '--prompt=the of and',
               '--config.serve.max_new_tokens=6',
               '--config.serve.temperature=0', '--config.serve.decode_loop=host'], env)
  from scone_jax.serve import EmbeddingStore
  store = EmbeddingStore.open(paths.join(workdir, 'export'), 'ram')
  return {'eval': json.loads(paths.read_text(paths.join(workdir, 'eval.json'))),
          'state': _checkpoint_arrays(workdir, 8, scratch),
          'rows': store.gather(np.arange(store.num_rows)).view(np.uint16),
          'text': text.splitlines()[0]}


def test_pipeline_in_a_bucket_equals_local_disk(gcs, tmp_path):
  corpus = str(tmp_path / 'corpus')
  th.write_corpus(corpus, num_train_docs=600)
  bucket_corpus = f'{gcs}/pipeline/corpus'
  for name in ('train.txt', 'eval.txt'):
    with open(os.path.join(corpus, name), 'rb') as f:
      paths.write_bytes(f'{bucket_corpus}/{name}', f.read())
  env = th.subprocess_env(8)
  local_cfg = th.micro_config_file(str(tmp_path / 'local.py'), corpus, **OVERRIDES)
  bucket_cfg = th.micro_config_file(str(tmp_path / 'bucket.py'), bucket_corpus, **OVERRIDES)
  want = _pipeline(local_cfg, str(tmp_path / 'run'), env, str(tmp_path))
  got = _pipeline(bucket_cfg, f'{gcs}/pipeline/run', env, str(tmp_path),
                  kill=str(tmp_path / 'train.log'))
  assert got['eval'] == want['eval']
  assert sorted(got['state']) == sorted(want['state'])
  for key, value in want['state'].items():
    np.testing.assert_array_equal(got['state'][key], value, err_msg=key)
  np.testing.assert_array_equal(got['rows'], want['rows'])
  assert got['text'] == want['text']
  assert not os.path.exists('gs:')


def _sweep(sweep_file: str, root: str, env: dict[str, str]) -> dict:
  out = _run(['scone_jax.sweeps', f'--sweep={sweep_file}', f'--root={root}', '--report'], env)
  sweep_dir = paths.join(root, 'twopoint')
  evals = {}
  for name in sorted(p.name for p in paths.path(sweep_dir).iterdir()):
    eval_path = paths.join(sweep_dir, name, 'eval.json')
    if paths.exists(eval_path):  # Keyed by overrides: run names hash the data paths too.
      point = json.loads(paths.read_text(paths.join(sweep_dir, name, 'point.json')))
      evals[json.dumps(point['overrides'], sort_keys=True)] = json.loads(
          paths.read_text(eval_path))
  assert len(evals) == 2, (out, evals)
  report = paths.read_text(paths.join(sweep_dir, 'REPORT.md'))
  assert report.startswith('# Sweep twopoint')
  return {'evals': evals,
          'csv': paths.read_text(paths.join(sweep_dir, 'results.csv')),
          'plots': sorted(n for n in paths.walk_files(sweep_dir) if n.endswith('.png'))}


def test_two_point_sweep_with_report_in_a_bucket(gcs, tmp_path):
  corpus = str(tmp_path / 'corpus')
  th.write_corpus(corpus, num_train_docs=600)
  bucket_corpus = f'{gcs}/sweep/corpus'
  for name in ('train.txt', 'eval.txt'):
    with open(os.path.join(corpus, name), 'rb') as f:
      paths.write_bytes(f'{bucket_corpus}/{name}', f.read())
  env = th.subprocess_env(8)
  results = []
  for where, corpus_dir, root in (('local', corpus, str(tmp_path / 'runs')),
                                  ('bucket', bucket_corpus, f'{gcs}/sweep/runs')):
    base = th.micro_config_file(str(tmp_path / f'{where}.py'), corpus_dir)
    sweep_file = tmp_path / where / 'twopoint.py'
    sweep_file.parent.mkdir()
    sweep_file.write_text(f'BASE_CONFIG = {base!r}\n\ndef get_sweep():\n  return '
                          "[{'fgram_model.num_layers': 0}, {'fgram.use_size': 500}]\n")
    results.append(_sweep(str(sweep_file), root, env))
  want, got = results
  assert got['evals'] == want['evals']
  # The run column holds names; every other column (accounting, losses) must match.
  strip = lambda csv: [line.split(',', 1)[1] for line in csv.splitlines()]  # noqa: E731
  assert sorted(strip(got['csv'])) == sorted(strip(want['csv']))
  assert got['plots'] == want['plots'] and got['plots']
