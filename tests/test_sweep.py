"""scone_jax.sweeps (and launch/sweep.py): expansion, quoting, run names, skip/resume,
crashes, TPU commands, the bootstrap's Python check."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from scone_jax.sweeps import backends as sweep_backends
from scone_jax.sweeps import spec as sweep_spec
from scone_jax.sweeps import tpu as sweep_tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = os.path.join(REPO, 'experiments', 'tiny.py')
NASTY = "it's a \"test\" $HOME; echo pwned `id` & | > x"


def write_sweep(tmp_path, points, base=TINY, name='mysweep', body=None):
  path = tmp_path / f'{name}.py'
  path.write_text(body if body is not None else
                  f'BASE_CONFIG = {base!r}\n\ndef get_sweep():\n  return {points!r}\n')
  return str(path)


def test_expansion_names_and_workdirs(tmp_path):
  points = [{'fgram_model.num_layers': 0}, {'fgram.use_size': 1000, 'train.seed': 1}]
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, points), str(tmp_path / 'runs'))
  assert sweep.name == 'mysweep'
  assert [p.overrides for p in sweep.points] == points
  assert sweep.points[1].cfg.fgram.use_size == 1000 and sweep.points[1].cfg.train.seed == 1
  assert sweep.points[0].cfg.fgram_model.num_layers == 0
  name = sweep.points[1].name
  assert name.startswith('fgram.use_size=1000,train.seed=1-')
  assert sweep.points[1].workdir == f'{tmp_path}/runs/mysweep/{name}'
  # Both points have the same data, so they share one prepared artifacts dir.
  assert len({p.cfg.data.artifacts_dir for p in sweep.points}) == 1
  assert sweep.points[0].cfg.data.artifacts_dir.startswith(f'{tmp_path}/runs/prepare/')


def test_run_names_are_stable_and_distinct():
  a = sweep_spec.run_name({'train.seed': 1, 'fgram.use_size': 10})
  assert a == sweep_spec.run_name({'fgram.use_size': 10, 'train.seed': 1})  # order-free
  assert a != sweep_spec.run_name({'fgram.use_size': 10, 'train.seed': 2})
  assert a != sweep_spec.run_name({'fgram.use_size': 10, 'train.seed': '1'})
  # Long or odd values are truncated/sanitised in the readable part; the hash keeps them apart.
  long1 = sweep_spec.run_name({'name': 'x' * 300 + 'a'})
  long2 = sweep_spec.run_name({'name': 'x' * 300 + 'b'})
  assert long1 != long2 and len(long1) < 120
  odd = sweep_spec.run_name({'name': NASTY})
  assert '/' not in odd and ' ' not in odd and '$' not in odd
  # Pinned value: a name must not change between versions, or finished runs rerun.
  assert sweep_spec.run_name({}) == 'base-' + sweep_spec.run_name({})[-8:]


def test_names_follow_the_config_not_the_root(tmp_path):
  path = write_sweep(tmp_path, [{'train.seed': 1}])
  a = sweep_spec.load_sweep(path, str(tmp_path / 'r1')).points[0].name
  assert a == sweep_spec.load_sweep(path, 'gs://b/r2').points[0].name
  # Same overrides on an edited base experiment: a new run, not a stale skip.
  base = tmp_path / 'base.py'
  base.write_text(open(TINY).read().replace('c.train.steps = 300', 'c.train.steps = 301'))
  edited = write_sweep(tmp_path, [{'train.seed': 1}], base=str(base), name='mysweep2')
  b = sweep_spec.load_sweep(edited, str(tmp_path)).points[0].name
  assert a.split('-')[0] == b.split('-')[0] and a != b


def test_different_data_gets_different_artifacts_dir(tmp_path):
  points = [{'fgram.max_len': 3}, {'fgram.max_len': 4}, {'fgram.max_len': 4, 'train.seed': 1}]
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, points), str(tmp_path))
  dirs = [p.cfg.data.artifacts_dir for p in sweep.points]
  assert dirs[0] != dirs[1] and dirs[1] == dirs[2]


def test_quoting_survives_the_shell(tmp_path):
  """Each value reaches the program unchanged through a real shell."""
  sweep = sweep_spec.load_sweep(
      write_sweep(tmp_path, [{'name': NASTY, 'data.eval_files': 'a b,c=d e'}]), str(tmp_path))
  point = sweep.points[0]
  printer = f'{sys.executable} -c "import sys, json; print(json.dumps(sys.argv[1:]))"'
  cmd = sweep_spec.command(sweep, point, 'PY')
  cmd = cmd.replace('PY -m scone_jax.train', printer, 1)
  out = subprocess.run(cmd, shell=True, executable='/bin/bash', capture_output=True,
                       text=True, check=True).stdout
  argv = json.loads(out)
  assert f'--config.name={NASTY}' in argv
  assert '--config.data.eval_files=a b,c=d e' in argv
  assert f'--workdir={point.workdir}' in argv
  assert argv[0] == f'--config={sweep.base_config}'
  assert shlex.split(sweep_spec.command(sweep, point, 'PY'))[3:] == argv


def test_value_formatting():
  assert sweep_spec.format_value(True) == 'true'
  assert sweep_spec.format_value(1e-4) == '0.0001'
  assert sweep_spec.format_value(3) == '3'
  with pytest.raises(sweep_spec.SweepError, match='must be bool, int, float or str'):
    sweep_spec.format_value([1, 2])
  assert sweep_spec.parse_set(['train.steps=3', 'name=a b', 'x=1.5']) == {
      'train.steps': 3, 'name': 'a b', 'x': 1.5}
  with pytest.raises(sweep_spec.SweepError, match='KEY=VALUE'):
    sweep_spec.parse_set(['train.steps'])


def test_unknown_key_fails_before_anything_runs(tmp_path):
  calls = []
  path = write_sweep(tmp_path, [{'train.seed': 1}, {'model.num_layer': 3}])
  with pytest.raises(sweep_spec.SweepError, match=r"point 1 .*unknown config key "
                     r"'model.num_layer'.*num_layers"):
    sweep = sweep_spec.load_sweep(path, str(tmp_path))
    sweep_backends.run_local(sweep, runner=lambda c, l: calls.append(c) or 0)
  assert not calls
  with pytest.raises(sweep_spec.SweepError, match="'modle' is not a config section"):
    sweep_spec.load_sweep(write_sweep(tmp_path, [{'modle.num_layers': 3}]), str(tmp_path))
  with pytest.raises(sweep_spec.SweepError, match='must be of type int'):
    sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.steps': 'many'}]), str(tmp_path))
  with pytest.raises(sweep_spec.SweepError, match='identical overrides'):
    sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.seed': 1}] * 2), str(tmp_path))


def test_sweep_file_errors(tmp_path):
  with pytest.raises(sweep_spec.SweepError, match='defines no get_sweep'):
    sweep_spec.load_sweep(write_sweep(tmp_path, [], body=f'BASE_CONFIG = {TINY!r}\n'),
                          str(tmp_path))
  with pytest.raises(sweep_spec.SweepError, match='defines no BASE_CONFIG'):
    sweep_spec.load_sweep(write_sweep(tmp_path, [], body='def get_sweep():\n  return []\n'),
                          str(tmp_path))
  with pytest.raises(sweep_spec.SweepError, match='does not exist'):
    sweep_spec.load_sweep(str(tmp_path / 'nope.py'), str(tmp_path))
  with pytest.raises(sweep_spec.SweepError, match='list of dicts'):
    sweep_spec.load_sweep(write_sweep(tmp_path, [], body=f'BASE_CONFIG = {TINY!r}\n'
                                      'def get_sweep():\n  return {}\n'), str(tmp_path))


class FakeRunner:
  """Records commands; 'train' writes eval.json unless the workdir is in `crash`."""

  def __init__(self, crash=(), write_eval_in='train', steps=300):
    self.calls, self.crash, self.write_eval_in = [], set(crash), write_eval_in
    self.steps = steps  # experiments/tiny.py's train.steps

  def __call__(self, cmd, log):
    self.calls.append(cmd)
    argv = shlex.split(cmd)
    stage = argv[2].split('.')[-1]
    workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    with open(log, 'a') as f:
      f.write(f'{stage} ran\n')
    if stage != 'prepare' and os.path.basename(workdir) in self.crash:
      with open(log, 'a') as f:
        f.write('Traceback: boom\n')
      return 3
    if stage == self.write_eval_in:
      with open(os.path.join(workdir, 'eval.json'), 'w') as f:
        json.dump({'step': self.steps, 'corpora': {
            'heldout': {'loss': 1.0, 'perplexity': 2.7, 'bits_per_byte': 1.2}}}, f)
    return 0


def _stages(calls):
  return [shlex.split(c)[2].split('.')[-1] for c in calls]


def test_local_skip_resume_and_crash(tmp_path, capsys):
  points = [{'train.seed': s} for s in range(4)]
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, points), str(tmp_path / 'runs'))
  names = [p.name for p in sweep.points]
  runner = FakeRunner(crash={names[1]})
  outcomes = sweep_backends.run_local(sweep, 'PY', parallel=2, runner=runner)
  status = {o.name: o.status for o in outcomes}
  assert status == {names[0]: 'done', names[1]: 'failed', names[2]: 'done', names[3]: 'done'}
  # One prepare for the shared artifacts dir, one train per point; no evaluate needed
  # because train wrote eval.json.
  assert _stages(runner.calls).count('prepare') == 1
  assert _stages(runner.calls).count('train') == 4
  assert 'evaluate' not in _stages(runner.calls)
  out = capsys.readouterr().out
  assert 'failed' in out and 'Traceback: boom' in out and names[1] in out
  for p in sweep.points:
    assert os.path.exists(os.path.join(p.workdir, 'log.txt'))
    assert json.load(open(os.path.join(p.workdir, 'point.json')))['overrides'] == p.overrides
  # Rerun: finished points are skipped; the crashed one reruns (and resumes in the trainer).
  runner2 = FakeRunner()
  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner2)
  assert sorted(o.status for o in outcomes) == ['done', 'skipped', 'skipped', 'skipped']
  assert _stages(runner2.calls) == ['prepare', 'train']
  assert names[1] in runner2.calls[1]


def test_local_runs_evaluate_when_train_did_not(tmp_path):
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{}]), str(tmp_path))
  runner = FakeRunner(write_eval_in='evaluate')
  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)
  assert _stages(runner.calls) == ['prepare', 'train', 'evaluate']
  assert outcomes[0].status == 'done'
  # A point whose stages all "succeed" without eval.json is a failure, not a silent pass.
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.seed': 5}]), str(tmp_path))
  outcomes = sweep_backends.run_local(sweep, 'PY', runner=FakeRunner(write_eval_in='none'))
  assert outcomes[0].status == 'failed' and 'without writing' in outcomes[0].detail


def test_failed_prepare_fails_its_points_only(tmp_path):
  points = [{'fgram.max_len': 3}, {'fgram.max_len': 4}]
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, points), str(tmp_path))
  bad_adir = sweep.points[0].cfg.data.artifacts_dir

  def runner(cmd, log):
    if 'scone_jax.prepare' in cmd and bad_adir in cmd:
      return 1
    return FakeRunner()(cmd, log)

  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)
  assert [o.status for o in outcomes] == ['failed', 'done']
  assert 'prepare exited with 1' in outcomes[0].detail


def test_real_subprocess_crash_is_reported(tmp_path):
  """The shell runner with a tiny python -c standing in for the stages."""
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.seed': 0}, {'train.seed': 1}]),
                                str(tmp_path))
  crash = sweep.points[0].workdir
  script = ('import sys, json, os; a = dict(x.split("=", 1) for x in sys.argv[1:] if '
            'x.startswith("--") and "=" in x); w = a["--workdir"]; '
            f'sys.exit(7) if w == {crash!r} and "train" in sys.argv[0] else None; '
            'os.makedirs(w, exist_ok=True); '
            'json.dump({"step": 300, "corpora": {"c": {"perplexity": 3.0}}}, '
            'open(w + "/eval.json", "w"))')
  stub = tmp_path / 'stub.py'
  stub.write_text(script)

  def runner(cmd, log):
    # Swap `PY -m scone_jax.STAGE` for the stub, keeping the quoted arguments.
    argv = shlex.split(cmd)
    new = [sys.executable, str(stub), f'--stage={argv[2]}'] + argv[3:]
    if argv[2] == 'scone_jax.train':
      new[1:2] = ['-c', f'import sys; sys.argv[0] = "train"; exec(open({str(stub)!r}).read())']
    return sweep_backends.shell_runner(' '.join(shlex.quote(a) for a in new), log)

  outcomes = sweep_backends.run_local(sweep, 'PY', runner=runner)
  assert [o.status for o in outcomes] == ['failed', 'done']
  assert 'train exited with 7' in outcomes[0].detail


def test_tpu_commands(tmp_path):
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.seed': 0}, {'name': NASTY}]),
                                'gs://bucket/runs')
  target = sweep_tpu.TpuTarget('my-pod', 'us-east5-a', 'proj', 'https://g/x.git', 'v1')
  calls, rcs = [], iter([0, 1, 1, 0, 0])  # setup ok; point 0 preempted twice; point 1 ok.

  def runner(cmd, log):
    calls.append(cmd)
    return next(rcs)

  outcomes = sweep_tpu.run_tpu(sweep, target, runner=runner, retries=3,
                                    log_dir=str(tmp_path / 'logs'), retry_wait_s=0)
  assert [o.status for o in outcomes] == ['done', 'done']
  assert len(calls) == 5
  scp = shlex.split(calls[0])
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5] == sweep_tpu.BOOTSTRAP_SCRIPT and scp[6] == 'my-pod:tpu_bootstrap.sh'
  assert {'--zone=us-east5-a', '--project=proj', '--worker=all'} <= set(scp)
  ssh = shlex.split(calls[1])
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod']
  assert {'--zone=us-east5-a', '--project=proj', '--worker=all'} <= set(ssh)
  assert calls[1] == calls[2] == calls[3]  # retries rerun the same (resuming) command.
  remote = next(a for a in ssh if a.startswith('--command='))[len('--command='):]
  assert remote.startswith('bash tpu_bootstrap.sh https://g/x.git v1 scone_jax && cd scone_jax')
  assert '--config.distributed.mode=auto' in remote
  assert f"--workdir={sweep.points[0].workdir}" in remote
  # The nasty value survives two levels of quoting (local shell, then the worker's shell).
  remote1 = next(a for a in shlex.split(calls[4]) if a.startswith('--command='))
  train = remote1.split(' && ')[2]
  assert f'--config.name={NASTY}' in shlex.split(train)


def test_tpu_gives_up_after_retries(tmp_path):
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{}]), 'gs://b/r')
  target = sweep_tpu.TpuTarget('p', 'z', repo='gs://b/code')
  calls = []
  outcomes = sweep_tpu.run_tpu(
      sweep, target, runner=lambda c, l: calls.append(c) or (0 if len(calls) == 1 else 9),
      retries=2, log_dir=str(tmp_path), retry_wait_s=0)
  assert outcomes[0].status == 'failed' and len(calls) == 1 + 3
  assert '--project' not in calls[1]


def test_finished_needs_final_eval(tmp_path):
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{}]), str(tmp_path))
  point = sweep.points[0]
  os.makedirs(point.workdir)
  path = os.path.join(point.workdir, 'eval.json')
  assert not sweep_spec.is_finished(point)
  for record, finished in (({'step': 100, 'corpora': {'c': {'perplexity': 3.0}}}, False),
                           ({'step': 300, 'corpora': {}}, False),
                           ('{"step": 300, "corp', False),
                           ({'step': 300, 'corpora': {'c': {'perplexity': 3.0}}}, True)):
    with open(path, 'w') as f:
      f.write(record if isinstance(record, str) else json.dumps(record))
    assert sweep_spec.is_finished(point) == finished, record


def test_stages_after_train_take_only_the_workdir(tmp_path):
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{'train.seed': 2}]), str(tmp_path))
  point = sweep.points[0]
  for stage in ('evaluate', 'export', 'generate'):
    assert shlex.split(sweep_spec.command(sweep, point, 'PY', stage)) == [
        'PY', '-m', f'scone_jax.{stage}', f'--workdir={point.workdir}']
  assert '--config.train.seed=2' in sweep_spec.command(sweep, point, 'PY', 'prepare')


def test_a_groups_shared_prepare_does_not_judge_one_points_size(tmp_path):
  # Points that differ only in fgram.use_size share one prepare; it must build the table
  # whatever the first point asks for, so that only a point whose S exceeds the mined
  # rows fails (in its own train's prepare check), not the whole group.
  sweep = sweep_spec.load_sweep(
      write_sweep(tmp_path, [{'fgram.use_size': 64}, {'fgram.use_size': 32}]), str(tmp_path))
  assert len({p.cfg.data.artifacts_dir for p in sweep.points}) == 1
  cmd = shlex.split(sweep_spec.prepare_command(sweep, sweep.points[0], 'PY'))
  assert '--config.fgram.allow_short_table=true' in cmd
  assert not any('allow_short_table' in a
                 for a in shlex.split(sweep_spec.command(sweep, sweep.points[0], 'PY')))


# The paper's reported param counts: (d_model, layers) -> millions.
PAPER_GPT2 = {(1024, 6): 128, (1024, 12): 204, (1536, 12): 419, (1536, 24): 759,
              (1536, 18): 589, (1536, 36): 1099}
PAPER_OLMO = {(2048, 12): 711, (2048, 18): 1014, (2048, 24): 1316, (2048, 36): 1920}


@pytest.mark.parametrize('name,paper', [('backbone_gpt2', PAPER_GPT2),
                                        ('backbone_olmo', PAPER_OLMO)])
def test_backbone_dry_run_reproduces_paper_accounting(tmp_path, name, paper):
  # Without Table 1's task files (tests/test_sweep_downstream.py covers them).
  sweep = sweep_spec.load_sweep(os.path.join(REPO, 'experiments', 'sweeps', f'{name}.py'),
                                str(tmp_path), downstream={'tasks': []})
  rows = sweep_spec.accounting_rows(sweep)
  baseline, scone = {}, []
  for p, row in zip(sweep.points, rows):
    key = (p.cfg.model.d_model, p.cfg.model.num_layers)
    if p.cfg.has_fgram_side:
      scone.append((key, row))
      assert row['offloaded_params'] == p.cfg.fgram.size * p.cfg.model.d_model
      assert row['af_params'] > 0 and row['train_flops_af'] > 0
    else:
      baseline[key] = row
      assert row['offloaded_params'] == row['af_params'] == row['train_flops_af'] == 0
  assert set(baseline) == set(paper)
  for key, millions in paper.items():
    assert baseline[key]['accel_params'] == pytest.approx(millions * 1e6, rel=0.02), key
  assert scone
  for key, row in scone:
    # SCONE costs its backbone's accelerator memory and inference FLOPs, exactly.
    assert row['infer_flops'] == baseline[key]['infer_flops']
    assert row['accel_params'] == baseline[key]['accel_params']
    assert row['train_flops_backbone'] == baseline[key]['train_flops_backbone']


def test_dry_run_cli_prints_commands_and_table(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'scone_jax.sweeps', '--sweep=experiments/sweeps/backbone_gpt2.py',
       f'--root={tmp_path}', '--dry_run'], cwd=REPO, capture_output=True, text=True,
      check=True).stdout
  assert out.count('-m scone_jax.train ') == 9 and out.count('-m scone_jax.prepare ') == 1
  assert '| run | accel_params | offloaded_params | af_params |' in out
  assert '418.7M' in out and '1.099G' in out  # 419M and 1099M backbones.
  assert not os.listdir(tmp_path)  # a dry run creates nothing.


@pytest.mark.parametrize('name', ['demo', 'demo_micro', 'num_fgrams', 'af_size', 'max_len'])
def test_shipped_sweeps_validate(tmp_path, name):
  sweep = sweep_spec.load_sweep(os.path.join(REPO, 'experiments', 'sweeps', f'{name}.py'),
                                str(tmp_path))
  assert sum(not p.cfg.has_fgram_side for p in sweep.points) >= 1
  groups = sweep_backends.prepare_groups(sweep)
  if name == 'max_len':
    assert len(groups) == 7  # one table per K; the baseline shares K=5's (the preset's).
  else:
    assert len(groups) == 1  # S slices one table: mining happens once.


def test_progress_heartbeat_shows_latest_step(tmp_path, capsys):
  import time
  sweep = sweep_spec.load_sweep(write_sweep(tmp_path, [{}]), str(tmp_path))
  point = sweep.points[0]
  progress = sweep_backends.Progress(1, heartbeat_s=0.05)
  os.makedirs(point.workdir)
  with open(os.path.join(point.workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 5, "loss": 4.25}\n{"step": 5, "eval/c/loss": 4.0}\n{"step": 6, "lo')
  with progress:
    progress.active[point.name] = point
    time.sleep(0.3)
  assert f'{point.name}: step 5/300 loss 4.250' in capsys.readouterr().out


def test_tpu_dry_run_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'scone_jax.sweeps', '--sweep=experiments/sweeps/af_size.py',
       '--root=gs://b/runs', '--dry_run', '--backend=tpu', '--tpu_name=pod', '--zone=z',
       '--repo=https://example.com/x.git'], cwd=REPO, capture_output=True, text=True,
      check=True).stdout
  commands = [line for line in out.splitlines() if line.startswith('gcloud ')]
  # Every command a user would paste, in order: the bootstrap copy first, then the points
  # (3 backbones x (baseline + 4 A_f sizes)).
  assert len(commands) == 1 + 15
  scp = shlex.split(commands[0])
  assert scp[4] == 'scp' and scp[5] == sweep_tpu.BOOTSTRAP_SCRIPT
  assert os.path.isfile(scp[5]) and scp[6] == 'pod:tpu_bootstrap.sh'
  assert all(c.startswith('gcloud compute tpus tpu-vm ssh pod') for c in commands[1:])
  assert out.count('--config.distributed.mode=auto') == 15
  assert '| run | accel_params |' in out
  bad = subprocess.run([sys.executable, '-m', 'scone_jax.sweeps',
                        '--sweep=experiments/sweeps/af_size.py', '--backend=tpu', '--dry_run'],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and '--backend=tpu needs --tpu_name, --zone, --repo' in bad.stderr


def test_launch_script_is_the_same_entry_point(tmp_path):
  """launch/sweep.py is a thin wrapper: same output as `python -m scone_jax.sweeps`."""
  argv = ['--sweep=experiments/sweeps/demo_micro.py', f'--root={tmp_path}', '--dry_run']
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
  via_script = subprocess.run([sys.executable, 'launch/sweep.py', *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout
  via_module = subprocess.run([sys.executable, '-m', 'scone_jax.sweeps', *argv], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
  assert via_script == via_module and '-m scone_jax.train ' in via_script
  source = open(os.path.join(REPO, 'launch', 'sweep.py')).read()
  assert 'sys.path' not in source


def _fake_python(tmp_path, version):
  """An executable that reports `version` and fails the bootstrap's version check."""
  fake = tmp_path / 'python_old'
  fake.write_text(f'#!/bin/bash\nif [[ "$1" == --version ]]; then echo "Python {version}"; '
                  'exit 0; fi\nexit 1\n')
  fake.chmod(0o755)
  return str(fake)


def test_bootstrap_checks_python_version(tmp_path):
  script = sweep_tpu.BOOTSTRAP_SCRIPT
  env = {**os.environ, 'HOME': str(tmp_path), 'PYTHON': _fake_python(tmp_path, '3.8.10')}
  out = subprocess.run(['bash', script, 'gs://b/code', 'main', 'scone_jax'], env=env,
                       capture_output=True, text=True)
  assert out.returncode == 3, out.stderr
  assert 'needs Python >= 3.11' in out.stderr and 'Python 3.8.10' in out.stderr
  assert 'fix:' in out.stderr
  assert not (tmp_path / 'scone_jax').exists()  # it failed before fetching any code.
  # The minimum it checks is the package's own requires-python.
  pyproject = open(os.path.join(REPO, 'pyproject.toml')).read()
  minimum = next(l.split('=', 1)[1].strip().strip('"')[2:] for l in pyproject.splitlines()
                 if l.startswith('requires-python'))
  assert f'MIN_PYTHON={minimum}\n' in open(script).read()
  usage = subprocess.run(['bash', script], env=env, capture_output=True, text=True)
  assert usage.returncode == 2 and 'usage:' in usage.stderr


def test_cli_unknown_key_launches_nothing(tmp_path):
  path = write_sweep(tmp_path, [{'train.seed': 0}, {'train.sede': 1}])
  root = tmp_path / 'runs'
  out = subprocess.run([sys.executable, '-m', 'scone_jax.sweeps', f'--sweep={path}',
                        f'--root={root}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0
  assert "unknown config key 'train.sede'" in out.stderr and 'nothing was launched' in out.stderr
  assert not root.exists()
