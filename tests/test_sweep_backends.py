"""The backends' shared pieces and remote command lines: status.json, TPU points in
parallel, queued-resource slices, xpk workloads, SLURM batch scripts (no cluster needed;
tests/test_slurm.py runs them against a real SLURM). Generated gcloud and xpk commands are
checked against the installed CLIs' argument parsers when they are installed."""

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading

import pytest

from scone_jax.sweeps import backends, slurm, spec, status, tpu, xpk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')
# The xpk console script (pip install xpk; not a requirement): XPK=/path/to/xpk or on PATH.
XPK = os.environ.get('XPK', shutil.which('xpk') or '')


def load(tmp_path, points, root, body=''):
  path = tmp_path / 'sw.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\n{body}\ndef get_sweep():\n  return {points!r}\n')
  return spec.load_sweep(str(path), root)


def finish(point, steps=None):
  """What a successful train leaves: a final eval.json."""
  os.makedirs(point.workdir, exist_ok=True)
  with open(os.path.join(point.workdir, 'eval.json'), 'w') as f:
    json.dump({'step': steps or point.cfg.train.steps, 'corpora': {'c': {'loss': 1.0}}}, f)


def test_status_file_round_trip(tmp_path):
  sweep = load(tmp_path, [{'train.seed': s} for s in range(3)], str(tmp_path))
  a, b, c = sweep.points
  assert status.read(sweep.dir) == {}
  status.update(sweep.dir, {a.name: {'backend': 'slurm', 'job_id': '7_0', 'state': 'submitted',
                                     'attempts': 1}})
  status.record_outcomes(sweep.dir, 'local', [backends.Outcome(a.name, 'failed', detail='x'),
                                              backends.Outcome(b.name, 'skipped')])
  entries = status.read(sweep.dir)
  # Merged, not replaced: the job id stays; an attempt is counted, a skip is not.
  assert entries[a.name]['job_id'] == '7_0' and entries[a.name]['attempts'] == 2
  assert entries[a.name]['backend'] == 'local' and entries[b.name]['attempts'] == 0
  finish(c)
  rows = status.table(sweep, lambda p: 'step 1/2' if p is a else '')
  assert [(r['state'], r['job'], r['last step']) for r in rows] == [
      ('failed', '7_0', 'step 1/2'), ('skipped', '', ''), ('done', '', '')]
  with pytest.raises(ValueError, match='not one of'):
    status.update(sweep.dir, {a.name: {'state': 'exploded'}})
  with open(status.path(sweep.dir), 'w') as f:
    f.write('{"points": ')
  with pytest.raises(spec.SweepError, match='unreadable.*delete it'):
    status.read(sweep.dir)
  with pytest.raises(spec.SweepError, match='>= 0'):
    status.RetryPolicy(retries=-1)


def test_tpu_points_run_in_parallel_over_targets(tmp_path):
  sweep = load(tmp_path, [{'train.seed': s} for s in range(4)], 'gs://b/r')
  targets = [tpu.TpuTarget(n, 'z', repo='gs://b/code') for n in ('pod-a', 'pod-b')]
  both_running = threading.Barrier(2, timeout=30)
  calls, lock = [], threading.Lock()

  def runner(cmd, log):
    argv = shlex.split(cmd)
    with lock:
      calls.append((argv[4], argv[5].split(':')[0]))
      nth_ssh = sum(verb == 'ssh' for verb, _ in calls)
    if argv[4] == 'ssh' and nth_ssh <= 2:
      both_running.wait()  # The first two points run at the same time, one per pod.
    return 1 if argv[4] == 'ssh' and nth_ssh == 3 else 0  # One preemption: retried.

  outcomes = tpu.run_tpu(sweep, targets, runner=runner, retries=2,
                              log_dir=str(tmp_path), out=open(os.devnull, 'w'),
                              retry_wait_s=0)
  assert [o.status for o in outcomes] == ['done'] * 4
  assert sorted(pod for verb, pod in calls if verb == 'scp') == [tpu.BOOTSTRAP_SCRIPT] * 2
  ssh = [pod for verb, pod in calls if verb == 'ssh']
  assert len(ssh) == 5 and set(ssh[:2]) == {'pod-a', 'pod-b'}


def test_queued_slices_are_created_run_and_always_deleted(tmp_path, monkeypatch):
  qs = tpu.QueuedSlice('v5p-8', 'v2-alpha-tpuv5', 'us-east5-a', 'proj', 'gs://b/code')
  sweep = load(tmp_path, [{'train.seed': 0}, {'train.seed': 1}], 'gs://b/r')
  monkeypatch.setattr(spec, 'is_finished', lambda p: False)  # No bucket here.
  verbs, runs = [], []

  def runner(cmd, log):
    argv = shlex.split(cmd)
    verb = 'wait' if argv[0] == 'while' else argv[4]
    verbs.append(verb)
    if verb == 'ssh':
      runs.append(cmd)
      return 1 if len(runs) == 1 else 0  # The first run is preempted.
    return 0

  outcomes = tpu.run_queued(sweep, qs, runner=runner,
                            policy=status.RetryPolicy(retries=1, wait_s=0),
                            log_dir=str(tmp_path), out=open(os.devnull, 'w'))
  assert [o.status for o in outcomes] == ['done', 'done']
  one = ['create', 'wait', 'scp', 'ssh', 'delete']
  assert verbs == one * 3  # Point 0 twice (its slice deleted after the failure too).
  assert runs[0] == runs[1]  # The retry reruns the same (resuming) command.
  names = {tpu.slice_name(qs, sweep, p) for p in sweep.points}
  assert len(names) == 2 and all(len(n) <= 32 for n in names)
  with pytest.raises(spec.SweepError, match='use gs://'):
    tpu.run_queued(load(tmp_path, [{}], str(tmp_path)), qs, runner=runner)


def _gcloud_parses(cmd: str) -> str:
  """'' if gcloud's parser accepts cmd (it then stops at the missing account: no request is
  made), else gcloud's error."""
  env = {**os.environ, 'CLOUDSDK_CONFIG': tempfile.mkdtemp(),
         'CLOUDSDK_CORE_DISABLE_PROMPTS': '1',
         'CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK': '1'}
  proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True, env=env, timeout=120)
  ok = proc.returncode == 1 and 'active account' in proc.stderr
  return '' if ok else f'exit {proc.returncode}: {proc.stderr[-500:]}'


@pytest.mark.skipif(not shutil.which('gcloud'), reason='gcloud is not installed')
def test_queued_and_tpu_commands_parse_with_gcloud(tmp_path):
  qs = tpu.QueuedSlice('v5p-64', 'v2-alpha-tpuv5', 'us-east5-a', 'proj', 'gs://b/code',
                       spot=True)
  sweep = load(tmp_path, [{'name': "it's \"odd\" $HOME"}], 'gs://b/r')
  commands = dict(tpu.point_commands(qs, sweep, sweep.points[0]))
  assert set(commands) == {'create', 'wait', 'bootstrap', 'run', 'delete'}
  for what in ('create', 'run', 'delete'):
    assert _gcloud_parses(commands[what]) == '', what
  # The checker itself rejects a misspelt flag.
  assert 'unrecognized arguments' in _gcloud_parses(commands['delete'] + ' --forcee')


def _xpk_parse_errors(commands: list[str]) -> list[str]:
  """Each command through the installed xpk's own argparse parser (xpk.parser.core, run by
  the interpreter of the `xpk` script): '' where it parses, else argparse's error."""
  with open(XPK) as f:
    python = f.readline()[2:].strip()  # The console script's #! interpreter.
  check = ('import argparse, contextlib, io, json, sys\n'
           'from xpk.parser.core import set_parser\n'
           'parser = argparse.ArgumentParser(prog="xpk"); set_parser(parser)\n'
           'out = []\n'
           'for argv in json.load(sys.stdin):\n'
           '  err = io.StringIO()\n'
           '  try:\n'
           '    with contextlib.redirect_stderr(err): parser.parse_args(argv)\n'
           '    out.append("")\n'
           '  except SystemExit:\n'
           '    out.append(err.getvalue() or "exit")\n'
           'print(json.dumps(out))\n')
  proc = subprocess.run([python, '-c', check], input=json.dumps(
      [shlex.split(c)[1:] for c in commands]), capture_output=True, text=True, check=True,
      timeout=300)
  return json.loads(proc.stdout)


@pytest.mark.parametrize('device,count_flag', [('v5p-8', '--num-slices=2'),
                                               ('h100-80gb-8', '--num-nodes=2')])
def test_xpk_commands_for_tpu_and_gpu(tmp_path, device, count_flag):
  target = xpk.XpkTarget('my-cluster', device, 'us-docker.pkg.dev/p/r/scone:1', 'proj',
                         'us-east5-a', count=2)
  sweep = load(tmp_path, [{'train.seed': 0}, {'train.seed': 1}], 'gs://b/r')
  commands = xpk.dry_run_commands(target, sweep)
  assert [c.split(': ')[-1] for c, _ in commands] == ['submit', 'submit', 'wait', 'wait']
  create = shlex.split(commands[0][1])
  assert create[:3] == ['xpk', 'workload', 'create'] and count_flag in create
  assert {'--cluster=my-cluster', '--project=proj', '--zone=us-east5-a',
          f'--device-type={device}'} <= set(create)
  inner = next(a for a in create if a.startswith('--command='))[len('--command='):]
  train, evaluate = inner.split(' && ')
  assert shlex.split(train)[:3] == ['python3', '-m', 'scone_jax.train']
  assert '--config.distributed.mode=auto' in shlex.split(train)
  assert shlex.split(evaluate)[2] == 'scone_jax.evaluate'
  assert shlex.split(commands[2][1])[:3] == ['xpk', 'workload', 'list']
  assert '--restart-on-exit-codes=75' in create  # A preempted (saved) run restarts.
  if XPK:
    errors = _xpk_parse_errors([cmd for _, cmd in commands] + [commands[0][1] + ' --slicez=3'])
    assert errors[:-1] == [''] * len(commands) and 'unrecognized' in errors[-1]
  with pytest.raises(spec.SweepError, match='use gs://'):
    xpk.dry_run_commands(target, load(tmp_path, [{}], str(tmp_path)))
  with pytest.raises(spec.SweepError, match='needs --xpk.docker_image'):
    xpk.dry_run_commands(xpk.XpkTarget('c', device, ''), sweep)


def test_xpk_submits_all_then_waits_and_skips_finished(tmp_path, monkeypatch):
  target = xpk.XpkTarget('c', 'v5p-8', 'img')
  sweep = load(tmp_path, [{'train.seed': s} for s in range(3)], 'gs://b/r')
  finished = {sweep.points[0].workdir}
  monkeypatch.setattr(spec, 'is_finished', lambda p: p.workdir in finished)
  monkeypatch.setattr(spec, 'write_point_json', lambda s, p: None)  # No bucket here.
  calls = []

  def runner(cmd, log):
    calls.append(shlex.split(cmd)[2])
    if calls[-1] == 'list' and xpk.workload_name(target, sweep, sweep.points[1]) in cmd:
      finished.add(sweep.points[1].workdir)  # Point 1's workload wrote its results.
    return 0

  outcomes = xpk.run_xpk(sweep, target, runner=runner, log_dir=str(tmp_path),
                         out=open(os.devnull, 'w'))
  assert calls == ['create', 'create', 'list', 'list']  # Point 0 was finished: skipped.
  assert [o.status for o in outcomes] == ['skipped', 'done', 'failed']
  assert 'without final results' in outcomes[2].detail


def test_slurm_script_multi_node_setup_and_option_precedence(tmp_path):
  body = ("SLURM = {'partition': 'gpu', 'gpus_per_node': 8, 'time': '02:00:00'}\n"
          "def slurm_resources(o):\n  return {'nodes': 2} if o['train.seed'] == 1 else {}\n")
  sweep = load(tmp_path, [{'train.seed': 0}, {'train.seed': 1}], 'gs://b/r', body)
  opts = slurm.point_options(sweep, {'time': '04:00:00', 'extra': ['--qos=high']})
  one, two = (opts[p.name] for p in sweep.points)
  assert (one.partition, one.gpus_per_node, one.nodes, one.time) == ('gpu', 8, 1, '04:00:00')
  assert two.nodes == 2 and two.extra == ('--qos=high',)
  bodies = [slurm.point_body(sweep, p, '/venv/bin/python', opts[p.name].nodes)
            for p in sweep.points]
  script = slurm.batch_script('sw-points', two, bodies, '/venv/bin/python', 3, '/logs',
                              'afterok:12')
  lines = script.splitlines()
  for expected in ('#SBATCH --array=0-1', '#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8',
                   '#SBATCH --partition=gpu', '#SBATCH --time=04:00:00', '#SBATCH --qos=high',
                   '#SBATCH --requeue', '#SBATCH --dependency=afterok:12',
                   '#SBATCH --signal=B:TERM@120', '#SBATCH --output=/logs/%x-%A_%a.txt'):
    assert expected in lines
  # The multi-node point trains under srun, one process per node, jax.distributed auto.
  train = next(line for line in bodies[1].splitlines() if 'scone_jax.train' in line)
  inner = shlex.split(shlex.split(train)[1])
  assert inner[:4] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1']
  assert '--config.distributed.mode=auto' in inner
  assert 'srun' not in bodies[0] and 'distributed' not in bodies[0]
  assert subprocess.run(['bash', '-n'], input=script, text=True).returncode == 0
  with pytest.raises(spec.SweepError, match="unknown SLURM option.*'gpus'"):
    slurm.point_options(sweep, {'gpus': 1})
  with pytest.raises(spec.SweepError, match="one option starting with '-'"):
    slurm.make_options('x', {'extra': 'qos=high'})


def test_slurm_job_states_parse_pending_ranges():
  lines = ('JobId=7 ArrayJobId=7 ArrayTaskId=2-3%2 JobState=PENDING ExitCode=0:0 Restarts=0\n'
           'JobId=9 ArrayJobId=7 ArrayTaskId=1 JobState=RUNNING ExitCode=0:0 Restarts=1\n'
           'JobId=8 ArrayJobId=7 ArrayTaskId=0 JobState=COMPLETED ExitCode=0:0 Restarts=0\n')

  def run(argv):
    assert argv[:4] == ['scontrol', 'show', 'job', '-o']
    return subprocess.CompletedProcess(argv, 0, lines, '')

  states = slurm.job_states('7', run)
  assert {k: v['state'] for k, v in states.items()} == {
      '7_0': 'COMPLETED', '7_1': 'RUNNING', '7_2': 'PENDING', '7_3': 'PENDING'}
  assert states['7_1']['restarts'] == '1'
  gone = slurm.job_states('5', lambda a: subprocess.CompletedProcess(
      a, 1, '', 'slurm_load_jobs error: Invalid job id specified'))
  assert gone == {}
  # A busy controller is not "every job ended": the wait retries, then gives up loudly.
  replies = iter([subprocess.CompletedProcess([], 1, '', 'Socket timed out'),
                  subprocess.CompletedProcess([], 0, lines.replace('PENDING', 'COMPLETED')
                                              .replace('RUNNING', 'COMPLETED'), '')])
  infos = slurm.wait_jobs({'a': '7_1', 'b': '7_3'}, lambda argv: next(replies), poll_s=0,
                          out=open(os.devnull, 'w'))
  assert {k: v['state'] for k, v in infos.items()} == {'a': 'COMPLETED', 'b': 'COMPLETED'}
  def down(argv):
    return subprocess.CompletedProcess(argv, 1, '', 'Unable to contact slurm controller')

  with pytest.raises(slurm.SlurmUnreachable, match='Unable to contact'):
    slurm.wait_jobs({'a': '7_1'}, down, poll_s=0, out=open(os.devnull, 'w'),
                    unreachable_polls=3)


def test_default_dry_run_lists_local_stages(tmp_path):
  sweep = load(tmp_path, [{'train.seed': 0}], str(tmp_path))
  out = tmp_path / 'out.txt'
  with open(out, 'w') as f:
    backends.dry_run(sweep, 'PY', out=f)
  lines = out.read_text().splitlines()
  assert lines[0].startswith('# prepare ') and 'scone_jax.prepare' in lines[1]
  assert 'scone_jax.train' in lines[3] and 'scone_jax.evaluate' in lines[5]
