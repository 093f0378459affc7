"""Sweep points on several processes (spec.Point.processes): the launch plan of the local
backend, the group runner (one dies: the rest are killed, its log named), --parallel as a
budget of processes, SLURM's task counts, the backends that refuse it; and (slow) a real
2-point sweep on 2 gloo processes per point, killed mid-point, resumed, skipped, reported."""

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from scone_jax.sweeps import backends, slurm, spec
from scone_jax.sweeps import cli as sweeps_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')  # train.batch_size 16, steps 300.


def _sweep(tmp_path, points=({},), processes_line='PROCESSES = 2\n', **kw):
  path = tmp_path / 'mp.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\n{processes_line}\n'
                  f'def get_sweep():\n  return {list(points)!r}\n')
  return spec.load_sweep(str(path), str(tmp_path / 'runs'), **kw)


def _flags(cmd):
  return dict(a[2:].split('=', 1) for a in shlex.split(cmd) if a.startswith('--config.distr'))


def test_launch_plan_of_a_two_process_point(tmp_path):
  sweep = _sweep(tmp_path)
  point = sweep.points[0]
  assert point.processes == 2
  stages = dict(backends._stage_commands(sweep, point, 'PY'))
  # Every stage but prepare runs on the point's processes (stage_launches adds the flags).
  assert ' -m scone_jax.evaluate ' in stages['evaluate']
  launches = backends.stage_launches(point, stages['train'], 4321,
                                     environ={'CUDA_VISIBLE_DEVICES': '0,1,2,3'})
  assert [x.log for x in launches] == [os.path.join(point.workdir, 'log.txt'),
                                       os.path.join(point.workdir, 'log.process1.txt')]
  assert [x.env for x in launches] == [{'CUDA_VISIBLE_DEVICES': '0,1'},
                                       {'CUDA_VISIBLE_DEVICES': '2,3'}]
  for i, x in enumerate(launches):
    assert x.cmd.startswith(stages['train'] + ' ')  # The stage's own arguments, then:
    assert _flags(x.cmd) == {
        'config.distributed.mode': 'explicit',
        'config.distributed.coordinator_address': '127.0.0.1:4321',
        'config.distributed.num_processes': '2', 'config.distributed.process_id': str(i)}
  assert [x.env for x in backends.stage_launches(point, 'c', 1, environ={})] == [{}, {}]
  # --dry_run prints each stage as its 2 processes in the background, then `wait`.
  printed = io.StringIO()
  backends.dry_run(sweep, 'PY', out=printed)
  lines = printed.getvalue().splitlines()
  at = lines.index(f'# {point.name}: train on 2 processes')
  assert [_flags(line)['config.distributed.process_id'] for line in lines[at + 1:at + 3]] == [
      '0', '1']
  assert lines[at + 1].endswith(f">> {os.path.join(point.workdir, 'log.txt')} 2>&1 &")
  assert lines[at + 3] == 'wait'
  with pytest.raises(spec.SweepError, match='3 GPUs.*2 processes'):
    backends.stage_launches(point, 'c', 1, environ={'CUDA_VISIBLE_DEVICES': '0,1,2'})
  # Where it runs is not what it computes: the same name on any process count.
  assert _sweep(tmp_path, processes=1).points[0].name == point.name
  assert _sweep(tmp_path, processes=1).points[0].processes == 1
  with pytest.raises(spec.SweepError, match='batch_size=16 is not divisible by the 3'):
    _sweep(tmp_path, processes=3)
  with pytest.raises(spec.SweepError, match='must be an int >= 1'):
    _sweep(tmp_path, processes_line='PROCESSES = 0\n')


def test_group_runner_kills_the_rest_when_one_dies(tmp_path):
  """Real processes: one sleeps (as a survivor waits in a collective), one dies."""
  logs = [str(tmp_path / 'log.txt'), str(tmp_path / 'log.process1.txt')]
  launches = [backends.Launch('echo "$ROLE up"; exec sleep 60', {'ROLE': 'zero'}, logs[0]),
              backends.Launch('echo "$ROLE: Traceback boom"; exit 3', {'ROLE': 'one'},
                              logs[1])]
  start = time.time()
  with backends._forward_sigterm():  # As in run_local: not stopping (an earlier test's).
    assert backends.shell_group_runner(launches, poll_s=0.05) == (3, 1)
    assert time.time() - start < 20  # Not the survivor's 60 s.
    ok = [backends.Launch('exit 0', {}, logs[0]), backends.Launch('exit 0', {}, logs[1])]
    assert backends.shell_group_runner(ok, poll_s=0.05) == (0, -1)
  assert 'zero up' in open(logs[0]).read()
  assert 'one: Traceback boom' in open(logs[1]).read()


class _FakeGroup:
  """Runs a stage's processes 'at once': records them and how many points overlap; the
  point whose workdir is in `crash` loses process 1, the others write eval.json."""

  def __init__(self, crash=()):
    self.calls, self.crash, self.lock = [], set(crash), threading.Lock()
    self.running = self.most = 0

  def __call__(self, launches):
    with self.lock:
      self.calls.append(launches)
      self.running += 1
      self.most = max(self.most, self.running)
    time.sleep(0.05)
    workdir = os.path.dirname(launches[0].log)
    for x in launches:
      with open(x.log, 'a') as f:
        f.write(f'{_flags(x.cmd)["config.distributed.process_id"]} ran\n')
    with self.lock:
      self.running -= 1
    if os.path.basename(workdir) in self.crash:
      with open(launches[1].log, 'a') as f:
        f.write('Traceback: gloo peer gone\n')
      return 137, 1
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump({'step': 300, 'corpora': {'c': {'loss': 1.0}}}, f)
    return 0, -1


def test_local_points_on_two_processes_take_two_slots(tmp_path):
  sweep = _sweep(tmp_path, [{'train.seed': s} for s in range(3)])
  names = [p.name for p in sweep.points]
  prepares = []
  group = _FakeGroup(crash={names[1]})
  out = open(os.devnull, 'w')
  outcomes = backends.run_local(sweep, 'PY', parallel=2, out=out, group_runner=group,
                                runner=lambda cmd, log: prepares.append(cmd) or 0)
  assert [o.status for o in outcomes] == ['done', 'failed', 'done']
  assert len(prepares) == 1 and 'scone_jax.prepare' in prepares[0]  # One process.
  assert group.most == 1  # --parallel=2 is two processes: one 2-process point at a time.
  assert all(len(c) == 2 for c in group.calls)
  ports = {_flags(c[0].cmd)['config.distributed.coordinator_address'] for c in group.calls}
  assert len(ports) == len(group.calls)  # A fresh coordinator port per start.
  detail = outcomes[1].detail
  assert 'train process 1 of 2' in detail and 'exited with 137' in detail
  assert 'log.process1.txt' in detail and 'gloo peer gone' in detail
  # Rerun: the finished points are skipped, the failed one starts both processes again.
  group2 = _FakeGroup()
  outcomes = backends.run_local(sweep, 'PY', parallel=4, out=out, group_runner=group2,
                                runner=lambda cmd, log: 0)
  assert sorted(o.status for o in outcomes) == ['done', 'skipped', 'skipped']
  assert len(group2.calls) == 1 and names[1] in group2.calls[0][0].cmd


def test_slurm_runs_the_processes_as_srun_tasks(tmp_path):
  sweep = _sweep(tmp_path, processes=4)
  point = sweep.points[0]
  body = slurm.point_body(sweep, point, 'PY', 2)
  runs = [shlex.split(shlex.split(line.split('run_stage ', 1)[1])[0])
          for line in body.splitlines() if 'run_stage' in line]
  assert len(runs) == 2  # train, then evaluate (a run train did not finish evaluating).
  for argv, module in zip(runs, ('scone_jax.train', 'scone_jax.evaluate')):
    assert argv[:4] == ['srun', '--nodes=2', '--ntasks-per-node=2', '--kill-on-bad-exit=1']
    assert argv[6] == module and argv[-1] == '--config.distributed.mode=auto'
  script = slurm.batch_script('j', slurm.make_options('j', {'nodes': 2}), [body], 'PY', 3,
                              '/logs', tasks_per_node=slurm.tasks_per_node(point, 2))
  assert '#SBATCH --ntasks-per-node=2' in script.splitlines()
  with pytest.raises(spec.SweepError, match='4 processes.*3 nodes'):
    slurm.tasks_per_node(point, 3)


@pytest.mark.parametrize('backend,error', [
    ('tpu', 'one process per host'), ('xpk', 'one process per host'),
    ('local', '3 GPUs, which do not split equally between 2 processes')])
def test_cli_refuses_before_launching(tmp_path, monkeypatch, backend, error):
  path = str(tmp_path / 'mp.py')
  _sweep(tmp_path)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2')
  try:
    sweeps_cli.FLAGS(['sweeps', f'--sweep={path}', f'--backend={backend}', '--processes=2',
                      f'--root={tmp_path}', '--dry_run'])
    with pytest.raises(spec.SweepError, match=f'{error}.*nothing was launched'):
      sweeps_cli.main([])
  finally:
    sweeps_cli.FLAGS.unparse_flags()


def _pids_of(*needles):
  """PIDs of the Python processes whose command line holds every needle (not the bash
  that started one, should it not have exec'd it)."""
  out = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
      continue
    if all(n in cmdline for n in needles) and not cmdline.startswith('/bin/bash'):
      out.append(int(pid))
  return out


def _committed_steps(workdir):
  try:
    return [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  except FileNotFoundError:
    return []


@pytest.mark.slow
def test_two_process_points_resume_after_kill_skip_and_report(tmp_path):
  """python -m scone_jax.sweeps with PROCESSES = 2 on CPU gloo (1 device per process): a
  kill -9 of one worker of point 0 mid-train fails that point (the other worker is
  killed, the dead one's log named) while point 1 completes; the rerun resumes point 0
  from its checkpoint on 2 processes again and writes the report; a third run skips
  both."""
  import train_helpers as th
  corpus = str(tmp_path / 'corpus')
  th.write_corpus(corpus)
  # Enough steps that the kill lands between the first checkpoint and the end.
  config = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, '',
                                **{'train.steps': 60, 'checkpoint.every_steps': 2})
  sweep_file = tmp_path / 'mp2.py'
  sweep_file.write_text(f'BASE_CONFIG = {config!r}\nPROCESSES = 2\n\n'
                        "def get_sweep():\n  return [{'train.seed': 0}, {'train.seed': 1}]\n")
  root = str(tmp_path / 'runs')
  argv = [sys.executable, '-m', 'scone_jax.sweeps', f'--sweep={sweep_file}', f'--root={root}',
          '--parallel=2']
  env = th.subprocess_env(1)
  sweep = spec.load_sweep(str(sweep_file), root)
  first, second = sweep.points
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 600
  while not _committed_steps(first.workdir) and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.1)
  victims = _pids_of('scone_jax.train', first.workdir, 'process_id=1')
  assert len(victims) == 1 and not os.path.exists(os.path.join(first.workdir, 'eval.json'))
  os.kill(victims[0], signal.SIGKILL)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 1, out
  assert re.search(r'train process 1 of 2 .*(was killed by SIGKILL|exited with 137)', out), out
  assert os.path.join(first.workdir, 'log.process1.txt') in out
  assert not _pids_of('scone_jax.train', first.workdir)  # Process 0 was killed too.
  assert spec.is_finished(second) and not spec.is_finished(first)
  resumed = subprocess.run(argv + ['--report'], env=env, capture_output=True, text=True,
                           timeout=900)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert '2/2 point(s) ok' in resumed.stdout and spec.is_finished(first)
  log = open(os.path.join(first.workdir, 'log.txt')).read()
  assert 'completed at step 60 (resumed from' in log and 'resumed from None' not in log
  # Both processes trained the resumed run: process 1 logged its own rerun.
  assert open(os.path.join(first.workdir, 'log.process1.txt')).read().count('$ ') == 2
  with open(os.path.join(sweep.dir, 'results.csv')) as f:
    csv = f.read()
  assert first.name in csv and second.name in csv
  again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count('skipped') >= 2, again.stdout
  assert '[2/2 finished, 0 running, 0 failed' in again.stdout
