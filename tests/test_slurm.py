"""The SLURM backend against a real single-node SLURM (tests/slurm_fixture.py).

The fast tests run the stages through a stand-in interpreter (fake_python below): prepare,
train and evaluate become a few lines that write what the real ones write (metrics.jsonl,
a "checkpoint" step, eval.json), so arrays, dependencies, scancel, requeue-and-resume,
skip and report are exercised through sbatch and scontrol in seconds. The slow test runs
the real trainer on the micro config and compares with --backend=local bit for bit.
"""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from scone_jax.sweeps import backends, slurm, slurm_study, spec, status
from scone_jax.sweeps import study as study_lib
from slurm_fixture import slurm_cluster  # noqa: F401  (a pytest fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MICRO = 'experiments/demo.py:micro'
POLICY = status.RetryPolicy(retries=2, wait_s=0)

# The fake stages. Train continues from W/fake_ckpt (the resume under test), logs each
# step, exits 75 (preempted) at step $FAKE_PREEMPT_AT on a job's first run, sleeps
# $FAKE_SLEEP_S per step in workdirs matching $FAKE_SLOW, and writes eval.json whose loss
# depends on lr, seed and arm (so a study has something to choose).
_STAGES = r'''
import json, math, os, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[3:] if a.startswith('--') and '=' in a)
stage, w = sys.argv[2].split('.')[-1], args['workdir']
with open(os.path.join(os.environ['FAKE_LOG'], 'calls.txt'), 'a') as f:
  f.write(f'{stage} {w}\n')
if stage == 'prepare':
  sys.exit(0)
steps = int(args.get('config.train.steps', 3))
if stage == 'train':
  os.makedirs(w, exist_ok=True)
  ckpt = os.path.join(w, 'fake_ckpt')
  start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
  for step in range(start + 1, steps + 1):
    if os.environ.get('FAKE_SLOW') and os.environ['FAKE_SLOW'] in w:
      time.sleep(float(os.environ.get('FAKE_SLEEP_S', 0)))
    with open(os.path.join(w, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, 'loss': 9.0 - step,
                          'restart': int(os.environ.get('SLURM_RESTART_COUNT', 0))}) + '\n')
    with open(ckpt + '.tmp', 'w') as f:
      f.write(str(step))
    os.replace(ckpt + '.tmp', ckpt)
    if (str(step) == os.environ.get('FAKE_PREEMPT_AT')
        and not int(os.environ.get('SLURM_RESTART_COUNT', 0))):
      sys.exit(75)
lr = float(args.get('config.train.learning_rate', 5e-3))
loss = (4.0 + 1e4 * (lr - 3e-3) ** 2 + 0.01 * int(args.get('config.train.seed', 0))
        + 0.5 * (args.get('config.fgram_model.num_layers') == '0'))
corpora = {c: {'loss': loss, 'perplexity': math.exp(loss), 'tokens': 100}
           for c in ('valid.stdlib', 'stdlib')}
with open(os.path.join(w, 'eval.json.tmp'), 'w') as f:
  json.dump({'step': steps, 'corpora': corpora}, f)
os.replace(os.path.join(w, 'eval.json.tmp'), os.path.join(w, 'eval.json'))
'''


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
  """An interpreter whose scone_jax.{prepare,train,evaluate} are the fake stages; every
  other use (the batch script's finished-check, the study's phase-2 task) is real."""
  (tmp_path / 'stages.py').write_text(_STAGES)
  py = tmp_path / 'python'
  py.write_text(f'''#!/bin/bash
case "$1 $2" in
  "-m scone_jax.prepare"|"-m scone_jax.train"|"-m scone_jax.evaluate")
    exec {sys.executable} {tmp_path}/stages.py "$@" ;;
esac
exec {sys.executable} "$@"
''')
  py.chmod(py.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv('FAKE_LOG', str(tmp_path))
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return str(py)


def _calls(tmp_path) -> list[str]:
  path = tmp_path / 'calls.txt'
  return path.read_text().splitlines() if path.exists() else []


def write_sweep(tmp_path, points, base=DEMO_MICRO, name='sw', slurm_block=''):
  path = tmp_path / f'{name}.py'
  path.write_text(f'BASE_CONFIG = {base!r}\n{slurm_block}\n'
                  f'def get_sweep():\n  return {points!r}\n')
  return str(path)


def _sweep(tmp_path, n=4, **kw):
  points = [{'train.seed': s} for s in range(n)]
  return spec.load_sweep(write_sweep(tmp_path, points, **kw), str(tmp_path / 'runs'),
                         {'train.steps': 3})


def _state(job: str) -> str:
  state = slurm.job_states(job)[job]['state']
  assert state not in slurm.TERMINAL, f'job {job} ended {state} too early'
  return state


def _wait_for(predicate, timeout_s=60.0):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out after {timeout_s}s')


def test_array_skip_and_scancel(slurm_cluster, tmp_path, fake_python, monkeypatch):
  sweep = _sweep(tmp_path)
  names = [p.name for p in sweep.points]
  # Point 2 is slow, so it is still running when it is cancelled.
  monkeypatch.setenv('FAKE_SLOW', names[2])
  monkeypatch.setenv('FAKE_SLEEP_S', '30')
  jobs, skipped = slurm.submit_sweep(sweep, {}, fake_python, POLICY)
  assert not skipped and set(jobs) == set(names)
  arrays = {j.split('_')[0] for j in jobs.values()}
  assert len(arrays) == 1 and jobs[names[0]] == f'{arrays.pop()}_0'  # One array.
  _wait_for(lambda: _state(jobs[names[2]]) == 'RUNNING'
            and any(c.startswith('train') and names[2] in c for c in _calls(tmp_path)))
  slurm_cluster.run('scancel', jobs[names[2]])
  infos = slurm.wait_jobs(jobs, poll_s=0.3, out=open(os.devnull, 'w'))
  # Nobody recorded the ends yet: the status command asks scontrol.
  assert {e['state'] for e in status.read(sweep.dir).values()} == {'submitted'}
  slurm.refresh(sweep)
  assert [r['state'] for r in status.table(sweep, backends._last_step)] == [
      'done', 'done', 'failed', 'done']
  assert status.read(sweep.dir)[names[2]]['slurm_state'] == 'CANCELLED'
  result = {o.name: o for o in slurm.outcomes(sweep, jobs, infos)}
  assert [result[n].status for n in names] == ['done', 'done', 'failed', 'done']
  assert 'CANCELLED' in result[names[2]].detail
  entries = status.read(sweep.dir)
  assert entries[names[2]]['state'] == 'failed' and entries[names[0]]['state'] == 'done'
  assert entries[names[0]]['job_id'] == jobs[names[0]]
  # One prepare (the points share the artifacts dir), one train per point, no evaluate
  # (train wrote the final eval.json): what the local backend runs.
  stages = [c.split()[0] for c in _calls(tmp_path)]
  assert stages.count('prepare') == 1 and stages.count('train') == 4
  assert 'evaluate' not in stages
  # A second invocation skips the finished points and submits only the cancelled one.
  monkeypatch.delenv('FAKE_SLOW')
  out = slurm.run_slurm(sweep, {}, fake_python, POLICY, poll_s=0.3,
                        out=open(os.devnull, 'w'))
  assert sorted((o.name, o.status) for o in out) == sorted(
      [(n, 'skipped') for n in names if n != names[2]] + [(names[2], 'done')])
  assert status.read(sweep.dir)[names[2]]['attempts'] == 2
  rows = status.table(sweep, backends._last_step)
  assert {r['state'] for r in rows} == {'done'} and rows[2]['last step'].startswith('step 3/3')


def test_preempted_point_requeues_and_resumes(slurm_cluster, tmp_path, fake_python,
                                              monkeypatch):
  sweep = _sweep(tmp_path, n=1)
  monkeypatch.setenv('FAKE_PREEMPT_AT', '2')
  out = slurm.run_slurm(sweep, {}, fake_python, POLICY, poll_s=0.3,
                        out=open(os.devnull, 'w'))
  assert [o.status for o in out] == ['done']
  point = sweep.points[0]
  records = [json.loads(line) for line in open(os.path.join(point.workdir, 'metrics.jsonl'))]
  # Steps 1-2 on the first run, then the requeued run continues at 3 (not from 1).
  assert [(r['step'], r['restart']) for r in records] == [(1, 0), (2, 0), (3, 1)]
  assert status.read(sweep.dir)[point.name]['restarts'] == 1


@pytest.mark.slow  # Fast-suite budget (CI's 2 cores): `make test-all` runs it.
def test_study_phases_with_dependency(slurm_cluster, tmp_path, fake_python):
  path = tmp_path / 'st.py'
  path.write_text(f'BASE_CONFIG = {DEMO_MICRO!r}\n\ndef get_study():\n'
                  "  return {'arms': {'baseline': {'fgram_model.num_layers': 0}, "
                  "'scone': {}}, 'learning_rates': [1e-3, 3e-3], 'seeds': [0, 1]}\n")
  study = study_lib.load_study(str(path))
  root, extra = str(tmp_path / 'runs'), {'train.steps': 3}
  jobs = slurm_study.submit_study(study, root, extra, {}, fake_python, POLICY,
                            out=open(os.devnull, 'w'))
  tune_arrays = {j.split('_')[0] for k, j in jobs.items() if not k.startswith('compare')}
  compare_job = jobs['compare scone seed 1']
  detail = slurm_cluster.run('scontrol', 'show', 'job', '-o', compare_job.split('_')[0])
  assert f'Dependency=afterany:{tune_arrays.pop()}' in detail
  infos = slurm.wait_jobs(jobs, poll_s=0.3, out=open(os.devnull, 'w'))
  result = slurm_study.study_outcomes(study, root, extra, jobs, infos)
  assert {o.status for o in result} == {'done'}
  # 4 tuning runs + the seed-1 run of each arm (seed 0 at the chosen lr is a tuning run).
  assert len(result) == 6 and len({o.name for o in result}) == 6
  record = study_lib.read_study_json(os.path.join(root, 'st'))
  assert record['selection']['chosen'] == {'baseline': 3e-3, 'scone': 3e-3}
  # The comparison phase started only after every tuning run ended.
  trains = [c for c in _calls(tmp_path) if c.startswith('train')]
  assert len(trains) == 6
  tune = study_lib.tune_sweep(study, root, extra)
  assert {c.split('/')[-1] for c in trains[:4]} == {p.name for p in tune.points}
  compare_dirs = {r for runs in record['compare_runs'].values() for r in runs.values()}
  assert {c.split('/')[-1] for c in trains[4:]} <= compare_dirs
  # The comparison tasks recorded their points (named after the selection) and job ids.
  entries = status.read(os.path.join(root, 'st'))
  seed1 = [record['compare_runs'][arm]['1'] for arm in ('baseline', 'scone')]
  assert [entries[n]['job_id'] for n in seed1] == [jobs['compare baseline seed 1'],
                                                   jobs['compare scone seed 1']]
  assert {entries[n]['state'] for n in seed1} == {'done'}


def test_bad_inputs_fail_before_any_submission(slurm_cluster, tmp_path, fake_python,
                                               monkeypatch):
  sweep = _sweep(tmp_path, n=2)
  cases = [({'partition': 'gpu-a100'}, r"partition 'gpu-a100' does not exist.*debug"),
           ({'nodes': 3, 'shared_fs': True}, r'asks for 3 nodes.*has 1'),
           ({'nodes': 1, 'bogus': 1}, r"unknown SLURM option\(s\) \['bogus'\]")]
  for flags, match in cases:
    with pytest.raises(spec.SweepError, match=match):
      slurm.run_slurm(sweep, flags, fake_python, POLICY)
  # A sweep file's per-point resources: point 1 asks for 2 nodes on a local root.
  block = ("def slurm_resources(overrides):\n"
           "  return {'nodes': 2} if overrides['train.seed'] == 1 else {}\n")
  sweep2 = _sweep(tmp_path, n=2, name='sw2', slurm_block=block)
  with pytest.raises(spec.SweepError, match=r'2 nodes but --root=.* local path'):
    slurm.run_slurm(sweep2, {}, fake_python, POLICY)
  monkeypatch.setenv('PATH', '/nonexistent')
  with pytest.raises(spec.SweepError, match='sbatch is not on PATH'):
    slurm.run_slurm(sweep, {}, fake_python, POLICY)
  monkeypatch.undo()
  assert slurm_cluster.queue_empty() and not _calls(tmp_path)
  assert not os.path.exists(os.path.join(sweep.dir, 'slurm'))


def test_dry_run_pasted_into_bash_runs_the_sweep(slurm_cluster, tmp_path, fake_python):
  """The dry run's commands, pasted into a shell in order, submit the same sweep."""
  sweep = _sweep(tmp_path, n=2)
  text = '\n'.join(cmd for _, cmd in slurm.dry_run_commands(sweep, {}, fake_python, POLICY))
  subprocess.run(['bash', '-euc', text], check=True, capture_output=True, cwd=tmp_path)
  _wait_for(lambda: all(spec.is_finished(p) for p in sweep.points))
  assert sorted(c.split()[0] for c in _calls(tmp_path)) == ['prepare', 'train', 'train']


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'scone_jax.sweeps', *args], cwd=REPO,
                        capture_output=True, text=True, env=env)


@pytest.mark.slow  # Fast-suite budget (CI's 2 cores): `make test-all` runs it.
def test_cli_report_same_as_local_and_status(slurm_cluster, tmp_path, fake_python):
  path = write_sweep(tmp_path, [{'train.seed': s} for s in range(4)])
  common = [f'--sweep={path}', '--set=train.steps=3', f'--python={fake_python}', '--report']
  local = _cli(*common, f'--root={tmp_path}/local', '--parallel=2')
  assert local.returncode == 0, local.stderr
  sl = _cli(*common, f'--root={tmp_path}/slurm', '--backend=slurm', '--slurm.partition=debug')
  assert sl.returncode == 0, sl.stderr
  assert '4/4 point(s) ok' in sl.stdout
  report = (tmp_path / 'slurm' / 'sw' / 'REPORT.md').read_text()
  assert report == (tmp_path / 'local' / 'sw' / 'REPORT.md').read_text()
  # The status command reads the sweep's status.json: each point's job and state.
  st = _cli(f'--sweep={path}', '--set=train.steps=3', f'--root={tmp_path}/slurm', '--status')
  assert st.returncode == 0, st.stderr
  rows = [line for line in st.stdout.splitlines() if 'train.seed=' in line]
  assert len(rows) == 4 and all(re.search(r'\| slurm +\| \d+_\d +\| done', r) for r in rows)
  assert all('step 3/3' in r for r in rows)
  local_status = status.read(str(tmp_path / 'local' / 'sw'))
  assert [(e['backend'], e['state']) for e in local_status.values()] == [('local', 'done')] * 4
  # Bad input from the command line: one line naming the fix, nothing submitted.
  bad = _cli(*common, f'--root={tmp_path}/bad', '--backend=slurm', '--slurm.partition=gpu')
  assert bad.returncode != 0 and "partition 'gpu' does not exist" in bad.stderr
  assert not os.path.exists(tmp_path / 'bad')


def _micro_sweep(tmp_path, root, steps, seeds, **overrides):
  import train_helpers as th  # The micro corpus and config the train tests use.
  corpus = os.path.join(str(tmp_path), 'corpus')
  th.write_corpus(corpus)
  base = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, **overrides)
  path = write_sweep(tmp_path, [{'train.seed': s} for s in seeds], base=base, name='real')
  return spec.load_sweep(path, root, {'train.steps': steps})


@pytest.mark.slow
def test_real_training_bitwise_equal_to_local(slurm_cluster, tmp_path):
  import train_helpers as th
  local = _micro_sweep(tmp_path, str(tmp_path / 'local'), 4, range(4))
  sl = _micro_sweep(tmp_path, str(tmp_path / 'slurm'), 4, range(4))
  devnull = open(os.devnull, 'w')
  assert {o.status for o in backends.run_local(local, sys.executable, 2, out=devnull)} == {
      'done'}
  result = slurm.run_slurm(sl, {}, sys.executable, POLICY, poll_s=1, out=devnull)
  assert {o.status for o in result} == {'done'} and len(result) == 4
  for a, b in zip(local.points, sl.points):
    ea = json.load(open(os.path.join(a.workdir, 'eval.json')))
    eb = json.load(open(os.path.join(b.workdir, 'eval.json')))
    assert ea['corpora'] == eb['corpora']  # Bitwise: the same floats, not close ones.
    ca, cb = th.checkpoint_arrays(a.workdir, 4), th.checkpoint_arrays(b.workdir, 4)
    assert ca.keys() == cb.keys()
    for k in ca:
      assert ca[k].tobytes() == cb[k].tobytes(), k
  from scone_jax import report
  assert (open(report.write_report(local.dir)['markdown']).read()
          == open(report.write_report(sl.dir)['markdown']).read())


@pytest.mark.slow
def test_real_requeued_point_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
  """`scontrol requeue` of a running point: it restarts and the trainer resumes."""
  sweep = _micro_sweep(tmp_path, str(tmp_path / 'runs'), 100, [0],
                       **{'checkpoint.every_steps': 5})
  point = sweep.points[0]
  jobs, _ = slurm.submit_sweep(sweep, {}, sys.executable, POLICY, out=open(os.devnull, 'w'))
  job = jobs[point.name]
  _wait_for(lambda: _state(job) and os.path.exists(
      os.path.join(point.workdir, 'checkpoints', '10')), timeout_s=300)
  slurm_cluster.run('scontrol', 'requeue', job)
  infos = slurm.wait_jobs(jobs, poll_s=1, out=open(os.devnull, 'w'))
  assert [o.status for o in slurm.outcomes(sweep, jobs, infos)] == ['done']
  assert int(infos[point.name]['restarts']) == 1
  steps = [json.loads(line)['step'] for line in open(os.path.join(point.workdir,
                                                                  'metrics.jsonl'))
           if '"loss"' in line]
  assert steps.count(1) == 1 and steps[-1] == 100  # Never restarted from step 1.
  # The requeued run restored a checkpoint saved before the requeue (>= 10).
  log = open(status.read(sweep.dir)[point.name]['log']).read()
  resumed = re.findall(r'train: completed at step 100 \(resumed from (\d+)\)', log)
  assert len(resumed) == 1 and int(resumed[0]) >= 10, log[-3000:]
