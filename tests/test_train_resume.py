"""Resume: a run interrupted (SIGTERM in-process; kill -9 of the CLI, slow) and restarted
ends bitwise-equal (CPU) to an uninterrupted run: params, optimizer state, data order."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax.train import loop
from scone_jax.train import metrics as metrics_lib


class _SigtermOnFetch:
  """Wraps the train iterator; sends this process SIGTERM when batch `n` is fetched."""

  def __init__(self, iterator, n):
    self._it, self._n, self._fetched = iterator, n, 0

  def __next__(self):
    self._fetched += 1
    if self._fetched == self._n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def _assert_same_run(workdir, ref_workdir, step, first_resumed_step):
  got, want = th.checkpoint_arrays(workdir, step), th.checkpoint_arrays(ref_workdir, step)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # Bitwise.
  got_m = {r['step']: r for r in metrics_lib.read_metrics(workdir)}
  want_m = {r['step']: r for r in metrics_lib.read_metrics(ref_workdir)}
  for s in range(first_resumed_step, step + 1):
    for key in ('loss', 'grad_norm', 'lr', 'tokens', 'batch/fgram_unique'):
      assert got_m[s][key] == want_m[s][key], (s, key)


def test_sigterm_saves_then_resume_is_bitwise(tmp_path, tmp_path_factory, monkeypatch):
  cfg, ref = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path / 'run')
  make_iterator = loop.batches.make_train_iterator
  with monkeypatch.context() as m:
    # Batch 2 is fetched after step 1 is dispatched: the loop must finish step 2, save it
    # and return (checkpoint.every_steps=2 would save it anyway, so save at step 3 too).
    m.setattr(loop.batches, 'make_train_iterator',
              lambda *a, **k: _SigtermOnFetch(make_iterator(*a, **k), 3))
    result = loop.train(cfg, workdir)
  assert result.status == 'preempted'
  assert result.step == 3
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [2, 3]
  result = loop.train(cfg, workdir)
  assert (result.status, result.resumed_from, result.step) == ('completed', 3, 4)
  _assert_same_run(workdir, ref, 4, first_resumed_step=4)


@pytest.mark.slow
def test_kill9_then_restart_is_bitwise(tmp_path, tmp_path_factory):
  base = str(tmp_path_factory.getbasetemp())
  corpus, artifacts = th.shared_dirs(base)
  overrides = {'train.steps': 8, 'checkpoint.every_steps': 2}
  ref = str(tmp_path / 'ref')
  loop.train(th.micro_config(corpus, artifacts, **overrides), ref)
  config_file = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, artifacts,
                                     **overrides)
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'scone_jax.train', f'--config={config_file}',
         f'--workdir={workdir}']
  env = th.subprocess_env(8)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 300
    # orbax renames <step>.orbax-checkpoint-tmp to <step> only once the save is committed.
    while not os.path.isdir(os.path.join(workdir, 'checkpoints', '4')):
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline, 'no checkpoint at step 4 within 300 s'
      time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to save anything more.
  finally:
    proc.wait()
  killed_at = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                  if s.isdigit())
  assert killed_at < 8, 'the run finished before it was killed; nothing was tested'
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  # The final eval per corpus, with the fraction of the set (eval_batches limits it).
  assert 'heldout (test): loss' in done.stdout and '% of the set)' in done.stdout
  _assert_same_run(workdir, ref, 8, first_resumed_step=killed_at + 1)
