"""Downstream evaluation as a sweep stage (scone_jax/sweeps/downstream_stage.py): settings
checked before anything runs, the stages after evaluate on every backend, skip/resume."""

import json
import os
import shlex
import subprocess

import pytest

from scone_jax.sweeps import backends, downstream_stage, slurm, spec, tpu, xpk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')
POINTS = [{'fgram_model.num_layers': 0}, {'fgram.use_size': 1000}]
TASKS = ('piqa', 'arc_easy')


def task_dir(tmp_path):
  d = tmp_path / 'tasks'
  d.mkdir(exist_ok=True)
  for t in TASKS:
    (d / f'{t}.jsonl').write_text('{"id": "0", "context": "q", "choices": ["a", "b"], '
                                  '"gold": 0}\n')
  return str(d)


def load(tmp_path, root, **settings):
  path = tmp_path / 'sw.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\nDOWNSTREAM = {{"tasks": {list(TASKS)!r}, '
                  f'"task_dir": {task_dir(tmp_path)!r}}}\n'
                  f'def get_sweep():\n  return {POINTS!r}\n')
  return spec.load_sweep(str(path), root, downstream=settings)


def test_settings_are_checked_before_anything_runs(tmp_path):
  missing = str(tmp_path / 'none')
  with pytest.raises(spec.SweepError) as e:
    load(tmp_path, str(tmp_path), task_dir=missing)
  assert (f'{missing}/piqa.jsonl' in str(e.value) and f'{missing}/arc_easy.jsonl' in str(e.value)
          and 'python -m scone_jax.downstream.convert' in str(e.value))
  with pytest.raises(spec.SweepError, match='TASK.dev.jsonl'):
    load(tmp_path, str(tmp_path), preset='olmes')  # 5-shot: the dev files are missing.
  for settings, match in (({'tasks': ['nope']}, "unknown task 'nope'"),
                          ({'paths': ['gpu']}, 'use some of'),
                          ({'preset': 'x'}, "unknown preset 'x'"),
                          ({'task_dir': ''}, '--downstream_task_dir'),
                          ({'task': 'piqa'}, "unknown DOWNSTREAM key")):
    with pytest.raises(spec.SweepError, match=match):
      load(tmp_path, str(tmp_path), **settings)
  # No tasks: no downstream stage; the settings never change run names.
  plain = load(tmp_path, str(tmp_path), tasks=[])
  assert all(p.downstream is None for p in plain.points)
  assert ([p.name for p in plain.points] ==
          [p.name for p in load(tmp_path, str(tmp_path)).points])


class FakeRunner:
  """Records (stage, path) per command; train writes a final eval.json, downstream writes
  its tasks into downstream.json as the real runner does."""

  def __init__(self):
    self.calls = []

  def __call__(self, cmd, log):
    argv = shlex.split(cmd)
    stage = argv[2].split('.')[-1]
    flags = dict(a[2:].split('=', 1) for a in argv[3:] if a.startswith('--'))
    w = flags.get('workdir', '')
    self.calls.append((os.path.basename(w)[:12], stage, flags.get('path', '')))
    if stage == 'train':
      with open(os.path.join(w, 'eval.json'), 'w') as f:
        json.dump({'step': 300, 'corpora': {'c': {'loss': 1.0}}}, f)
    if stage == 'downstream':
      record = {'format_version': 1, 'paths': {}}
      if os.path.exists(os.path.join(w, 'downstream.json')):
        record = json.load(open(os.path.join(w, 'downstream.json')))
      record['paths'][flags['path']] = {'step': 300, 'tasks': {
          t: {'preset': flags['preset'], 'value': 0.5} for t in flags['tasks'].split(',')}}
      json.dump(record, open(os.path.join(w, 'downstream.json'), 'w'))
    return 0


def test_local_runs_downstream_after_evaluate_and_resumes_what_is_missing(tmp_path):
  sweep = load(tmp_path, str(tmp_path / 'runs'), paths=['train', 'store'])
  base, scone = sweep.points
  runner = FakeRunner()
  outcomes = backends.run_local(sweep, 'PY', runner=runner, out=open(os.devnull, 'w'))
  assert [o.status for o in outcomes] == ['done', 'done']
  b, s = base.name[:12], scone.name[:12]
  # The baseline has no store (nothing to export): its train path is its served model.
  assert runner.calls[1:] == [(b, 'train', ''), (b, 'downstream', 'train'),
                              (s, 'train', ''), (s, 'downstream', 'train'),
                              (s, 'export', ''), (s, 'downstream', 'store')]
  assert all(spec.is_finished(p) for p in sweep.points)
  again = FakeRunner()
  outcomes = backends.run_local(sweep, 'PY', runner=again, out=open(os.devnull, 'w'))
  assert [o.status for o in outcomes] == ['skipped', 'skipped'] and not again.calls
  # The store path killed before it finished a task: only export + store rerun.
  path = os.path.join(scone.workdir, 'downstream.json')
  record = json.load(open(path))
  del record['paths']['store']['tasks']['arc_easy']
  json.dump(record, open(path, 'w'))
  assert not spec.is_finished(scone) and spec.stage_done(scone, 'downstream:train')
  again = FakeRunner()
  backends.run_local(sweep, 'PY', runner=again, out=open(os.devnull, 'w'))
  assert again.calls[1:] == [(s, 'export', ''), (s, 'downstream', 'store')]
  # Scored at another step or preset: not done.
  assert not downstream_stage.done(scone.workdir, scone.downstream, 'train', 301)
  other = downstream_stage.Downstream(TASKS, '', ('train',), 'olmes')
  assert not downstream_stage.done(scone.workdir, other, 'train', 300)


def _check_result(check: str) -> bool:
  """Runs a stage's shell check in-process: `PY -c DONE_CHECK ARGS...` -> done?"""
  argv = shlex.split(check)
  assert argv[1:3] == ['-c', downstream_stage.DONE_CHECK]
  return downstream_stage.done_from_argv(argv[3:])


def test_remote_backends_run_the_same_downstream_stages(tmp_path):
  sweep = load(tmp_path, 'gs://b/r', paths=['store'])
  base, scone = sweep.points
  stages = spec.after_evaluate(scone, 'PY')
  assert [s for s, _, _ in stages] == ['export', 'downstream:store']
  assert spec.after_evaluate(base, 'PY') == []  # A baseline has no store to score.
  down = stages[1][1]
  assert shlex.split(down)[1:] == [
      '-m', 'scone_jax.downstream', f'--workdir={scone.workdir}', '--tasks=piqa,arc_easy',
      f'--task_dir={tmp_path}/tasks', '--path=store', '--preset=olmo']
  on_tpu = tpu.tpu_command(sweep, scone, tpu.TpuTarget('pod', 'z', repo='gs://c'))
  remote = next(a for a in shlex.split(on_tpu) if a.startswith('--command='))
  down_tpu = downstream_stage.command('.venv/bin/python', scone.workdir, scone.downstream,
                                      'store')
  assert remote.endswith(f' || {down_tpu}; }}') and 'scone_jax.export' in remote
  container = xpk.point_command(xpk.XpkTarget('c', 'v5p-8', 'img'), sweep, scone)
  assert container.split(' && ')[1].split()[2] == 'scone_jax.evaluate'
  assert 'scone_jax.downstream' in container.split(' && ')[-1]
  body = slurm.point_body(sweep, scone, 'PY', 1)
  lines = body.splitlines()
  assert lines[0].startswith('finished ') and downstream_stage.DONE_CHECK in lines[0]
  assert [ln for ln in lines if 'scone_jax.downstream ' in ln][0].startswith('PY -c ')
  script = slurm.batch_script('j', slurm.make_options('j', {}), [body], 'PY', 3, '/logs')
  assert subprocess.run(['bash', '-n'], input=script, text=True).returncode == 0
  # The shell check is the same `done` the local runner uses.
  local = load(tmp_path, str(tmp_path / 'runs2'), paths=['store']).points[1]
  check = spec.after_evaluate(local, 'PY')[1][2]
  assert not _check_result(check)
  os.makedirs(local.workdir)
  FakeRunner()(down.replace(scone.workdir, local.workdir), os.devnull)
  assert _check_result(check)


def test_backbone_olmo_scores_table_1_given_its_task_files(tmp_path, capsys):
  path = os.path.join(REPO, 'experiments', 'sweeps', 'backbone_olmo.py')
  six = ('piqa', 'hellaswag', 'arc_easy', 'arc_challenge', 'commonsense_qa', 'mmlu')
  with pytest.raises(spec.SweepError) as e:
    spec.load_sweep(path, str(tmp_path), downstream={'task_dir': str(tmp_path)})
  assert all(f'{tmp_path}/{t}.jsonl' in str(e.value) for t in six)
  assert 'python -m scone_jax.downstream.convert --task=TASK' in str(e.value)
  for t in six:
    (tmp_path / f'{t}.jsonl').write_text('')
  sweep = spec.load_sweep(path, str(tmp_path / 'runs'),
                          downstream={'task_dir': str(tmp_path)})
  backends.dry_run(sweep, 'PY')
  lines = capsys.readouterr().out.splitlines()
  downstream = [shlex.split(ln) for ln in lines if ' scone_jax.downstream ' in ln]
  assert len(downstream) == len(sweep.points) == 7
  assert all(f'--tasks={",".join(six)}' in d and '--path=train' in d and '--preset=olmo' in d
             for d in downstream)
  assert not os.path.exists(tmp_path / 'runs')  # A dry run writes nothing.
  assert ' 75.3 / 67.1 / 72.5 / 36.4 / 50.8 / 39.9 / 57.0' in spec.load_sweep_module(
      path).__doc__  # Table 1's SCONE row, as the paper prints it.
