"""The local sweep runner under preemption: a stage that exits 75 (the trainer's status
after saving on SIGTERM) is requeued, and SIGTERM to the runner reaches its children,
which finish saving before the runner returns (no orphan keeps a run's lock)."""

import json
import os
import shlex
import signal
import sys
import threading
import time

from scone_jax.sweeps import backends as sweep_backends
from scone_jax.sweeps import spec as sweep_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')


def _sweep(tmp_path, points=({},)):
  path = tmp_path / 'sig.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\n\ndef get_sweep():\n  return {list(points)!r}\n')
  return sweep_spec.load_sweep(str(path), str(tmp_path / 'runs'))


def _stage_and_workdir(cmd):
  argv = shlex.split(cmd)
  return (argv[2].split('.')[-1],
          next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')))


def _write_eval(workdir):
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump({'step': 300, 'corpora': {'heldout': {'loss': 1.0}}}, f)


def test_preempted_stage_is_requeued_until_it_finishes(tmp_path, capsys):
  assert sweep_backends.PREEMPTED == 75
  sweep = _sweep(tmp_path)
  trains = []

  def runner(cmd, log):
    stage, workdir = _stage_and_workdir(cmd)
    if stage != 'train':
      return 0
    trains.append(cmd)
    if len(trains) < 3:
      return sweep_backends.PREEMPTED  # Saved and exited: a rerun resumes.
    _write_eval(workdir)
    return 0

  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)
  assert [o.status for o in outcomes] == ['done']
  assert len(trains) == 3 and len(set(trains)) == 1  # The same command, resumed.
  assert 'requeued 2/3' in capsys.readouterr().out


def test_requeues_are_bounded(tmp_path):
  sweep = _sweep(tmp_path)
  calls = []

  def runner(cmd, log):
    calls.append(_stage_and_workdir(cmd)[0])
    return sweep_backends.PREEMPTED if calls[-1] == 'train' else 0

  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)
  assert [o.status for o in outcomes] == ['failed']
  assert calls.count('train') == 1 + sweep_backends.REQUEUES
  assert 'exited with 75' in outcomes[0].detail


# A stand-in for the trainer: holds a "lock" file while running; on SIGTERM it sleeps
# (the checkpoint save), writes `saved`, removes the lock and exits 75.
_CHILD = '''
import os, signal, sys, time
workdir = sys.argv[1]
open(os.path.join(workdir, 'started'), 'w').close()
open(os.path.join(workdir, 'lock'), 'w').close()
def on_term(signum, frame):
  time.sleep(1.0)
  open(os.path.join(workdir, 'saved'), 'w').close()
  os.remove(os.path.join(workdir, 'lock'))
  sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
time.sleep(120)
'''


def test_sigterm_is_forwarded_and_children_save_before_the_runner_returns(tmp_path):
  sweep = _sweep(tmp_path, [{'train.seed': 1}, {'train.seed': 2}])
  child = tmp_path / 'child.py'
  child.write_text(_CHILD)
  trains = []

  def runner(cmd, log):
    stage, workdir = _stage_and_workdir(cmd)
    if stage != 'train':
      return 0
    trains.append(workdir)
    # Through the real runner: bash in its own process group, as for the real trainer.
    return sweep_backends.shell_runner(
        f'{shlex.quote(sys.executable)} {shlex.quote(str(child))} {shlex.quote(workdir)}', log)

  first = sweep.points[0].workdir

  def terminate_when_started():
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(first, 'started')) and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  killer = threading.Thread(target=terminate_when_started)
  killer.start()
  start = time.time()
  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)  # Main thread: handler.
  killer.join()
  assert time.time() - start < 60
  assert signal.getsignal(signal.SIGTERM) is previous  # The runner's handler is gone.
  # The child got the SIGTERM, saved and released its lock before run_local returned.
  assert os.path.exists(os.path.join(first, 'saved'))
  assert not os.path.exists(os.path.join(first, 'lock'))
  # Nothing new started after the SIGTERM, and no point counts as finished.
  assert trains[0] == first
  assert not os.path.exists(os.path.join(sweep.points[1].workdir, 'started'))
  assert [o.status for o in outcomes] == ['failed', 'failed']
  assert 'interrupted by SIGTERM' in outcomes[0].detail
  assert 'rerun the sweep to resume' in outcomes[0].detail
