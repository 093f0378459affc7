"""A run is immutable unless the user says otherwise: a resume never rebuilds what the run
trained on (changed inputs are refused before anything is written), --allow_config_change
admits only keys that change no shape, data or artifact, and train.init_from_run starts a
NEW run from another run's weights."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import runlock
from scone_jax import prepare as prepare_lib
from scone_jax.config import ConfigError
from scone_jax.train import loop


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished micro run on its own corpus, artifacts inside W: (corpus dir, W)."""
  base = tmp_path_factory.mktemp('guard')
  corpus = str(base / 'corpus')
  th.write_corpus(corpus)
  workdir = str(base / 'W')
  loop.train(th.micro_config(corpus), workdir)
  return corpus, workdir


def test_corpus_edited_in_place_is_refused_and_nothing_is_rewritten(finished_run):
  corpus, workdir = finished_run
  cfg = th.micro_config(corpus)
  train_file = os.path.join(corpus, 'train.txt')
  original, stat = open(train_file, 'rb').read(), os.stat(train_file)
  before = th.tree_digest(workdir)
  with open(train_file, 'ab') as f:
    f.write(b'a new document appended after the run was trained\n')
  try:
    for attempt in (lambda: loop.train(cfg, workdir),
                    lambda: prepare_lib.prepare(cfg, workdir)):
      with pytest.raises(prepare_lib.RunInputsChangedError) as e:
        attempt()
      message = str(e.value)
      assert "corpus 'train'" in message and train_file in message
      for choice in ('restore the inputs', 'new --workdir',
                     f'--config.train.init_from_run={workdir}'):
        assert choice in message
      assert th.tree_digest(workdir) == before  # Tokenizer, shards, table, config, run.json.
  finally:
    with open(train_file, 'wb') as f:
      f.write(original)
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  # The input restored (content and modification time, as `cp -p` would): it resumes.
  result = loop.train(cfg, workdir)
  assert (result.status, result.step, result.resumed_from) == ('completed', 4, 4)


def test_following_the_refusals_advice_changes_nothing(finished_run):
  corpus, workdir = finished_run
  cfg = th.micro_config(corpus)
  other = th.micro_config(corpus, **{'model.d_model': 64, 'fgram.size': 1000,
                                     'train.steps': 6})
  before = th.tree_digest(workdir)
  with pytest.raises(ConfigError) as e:
    loop.train(other, workdir)
  message = str(e.value)
  assert 'model.d_model: 32 in the run, 64 now' in message
  # Only the key that may change is suggested for the flag; the others need a new run.
  assert re.findall(r'--allow_config_change=(\S+)', message) == ['train.steps']
  assert f'--config.train.init_from_run={workdir}' in message
  # Passing the forbidden keys anyway is refused, still before anything is written.
  with pytest.raises(ConfigError, match='model.d_model can never change in a run'):
    loop.train(other, workdir, ('model.d_model', 'fgram.size', 'train.steps'))
  with pytest.raises(ConfigError, match='fgram.size can never change in a run'):
    loop.train(other, workdir, ('fgram.size',))
  assert th.tree_digest(workdir) == before
  # The original command still works on the untouched run.
  result = loop.train(cfg, workdir)
  assert (result.status, result.step) == ('completed', 4)


def test_init_from_run_starts_a_new_run_from_the_old_weights(finished_run, tmp_path):
  corpus, workdir = finished_run
  new = str(tmp_path / 'new')
  # A learning rate of 1e-12 leaves the params where they started: the old run's.
  cfg = th.micro_config(corpus, **{'train.init_from_run': workdir,
                                   'train.learning_rate': 1e-12})
  result = loop.train(cfg, new)
  assert (result.status, result.resumed_from, result.step) == ('completed', None, 4)
  old_params = {k: v for k, v in th.checkpoint_arrays(workdir, 4).items() if 'params' in k}
  new_params = {k: v for k, v in th.checkpoint_arrays(new, 4).items() if 'params' in k}
  assert sorted(old_params) == sorted(new_params) and old_params
  for key, value in old_params.items():
    np.testing.assert_allclose(new_params[key], value, rtol=0, atol=1e-6, err_msg=key)
  # Another model cannot start from them: the first differing parameter is named.
  wide = th.micro_config(corpus, **{'train.init_from_run': workdir, 'model.d_model': 64})
  with pytest.raises(ConfigError, match=r'init_from_run=.*its parameter .* is .*this run '
                     'needs'):
    loop.train(wide, str(tmp_path / 'wide'))


@pytest.mark.slow  # A CLI subprocess: ~2 min on 2 loaded cores.
def test_preempted_cli_exits_75_with_a_checkpoint_and_no_lock(tmp_path, tmp_path_factory):
  corpus, art = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  config_file = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, art,
                                     **{'train.steps': 100000,
                                        'checkpoint.every_steps': 100000})
  workdir = str(tmp_path / 'W')
  proc = subprocess.Popen([sys.executable, '-m', 'scone_jax.train', f'--config={config_file}',
                           f'--workdir={workdir}'], env=th.subprocess_env(8),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 300
    metrics = os.path.join(workdir, 'metrics.jsonl')
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):  # Training.
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline, 'no training step within 300 s'
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # EX_TEMPFAIL, not 0: a scheduler can tell "saved, requeue me" from "finished".
  assert proc.returncode == loop.EXIT_PREEMPTED == 75, stderr.decode()[-3000:]
  assert [s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  assert not os.path.exists(os.path.join(workdir, runlock.LOCK_FILE))  # Rerun: resumes.
