"""A study on SLURM: the tuning grid as one array, the comparison seeds as a second.

The second array depends on the first (`afterany`: an arm whose tuning finished is compared
even if another arm's failed). Its task i runs `python -m scone_jax.sweeps.slurm_study
--index=i ...`, which chooses every arm's learning rate from the finished tuning runs
(study.select_lrs, the same selection as the local backend), writes study.json, records
its point in status.json and prints the bash running that point's stages (slurm.point_body,
the same as phase 1), which the task then evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from scone_jax import artifacts, paths
from scone_jax.sweeps import backends, slurm, spec, status
from scone_jax.sweeps import study as study_lib

def _selection(study: study_lib.Study, tune: spec.Sweep) -> study_lib.Selection:
  """Every arm with a finished tuning run gets its lr (an arm without one is left out)."""
  records = study_lib.finished_records(tune)
  ok = []
  for arm in study.arms:
    try:
      study_lib.select_lrs(study, tune, records, [arm])
      ok.append(arm)
    except spec.SweepError:
      continue
  return study_lib.select_lrs(study, tune, records, ok)


def compare_point(study: study_lib.Study, root: str, extra: dict[str, Any],
                  index: int) -> tuple[spec.Sweep, spec.Point]:
  """Phase 2's point `index` (arm-major over the seeds) at its arm's chosen lr; writes
  study.json first (every task writes the same record, atomically)."""
  tune = study_lib.tune_sweep(study, root, extra)
  selection = _selection(study, tune)
  arm = list(study.arms)[index // len(study.seeds)]
  seed = study.seeds[index % len(study.seeds)]
  if arm not in selection.chosen:
    raise spec.SweepError(f'arm {arm!r}: no tuning run finished with a validation loss; '
                          'its comparison seeds cannot run (see the tuning runs\' logs)')
  compare = study_lib.compare_sweep(study, root, selection.chosen, extra)
  record = study_lib.selection_record(study, selection, compare, extra)
  artifacts.write_json_atomic(paths.join(compare.dir, study_lib.STUDY_JSON), record)
  plan = study_lib.compare_plan(study, selection.chosen)
  point = compare.points[plan.index((arm, selection.chosen[arm], seed))]
  return compare, point


def _compare_body(study: study_lib.Study, root: str, extra: dict[str, Any], python: str,
                  nodes: int, index: int) -> str:
  """A phase-2 task: asks this module for its point's stages, then runs them."""
  argv = [python, '-m', 'scone_jax.sweeps.slurm_study', f'--study={study.path}', f'--root={root}',
          f'--extra={json.dumps(extra, sort_keys=True)}', f'--python={python}',
          f'--nodes={nodes}', f'--index={index}']
  return (f'body=$({" ".join(shlex.quote(a) for a in argv)}) || return\n'
          'eval "$body"')


def submit_study(study: study_lib.Study, root: str, extra: dict[str, Any],
                 flag_options: dict[str, Any], python: str, policy: status.RetryPolicy,
                 run: slurm.Run = slurm.run_command, out=None) -> dict[str, str]:
  """Phase 1 (tuning) as an array, phase 2 (every arm x seed at its chosen lr) as a
  second array that starts after the first ends (afterany: an arm whose tuning finished
  is compared even if another arm's failed). Returns key -> job id: tuning point names,
  and 'compare ARM seed S' for phase-2 tasks (their run names depend on the selection).
  """
  out = out or sys.stdout
  tune = study_lib.tune_sweep(study, root, extra)
  tune_jobs, _ = slurm.submit_sweep(tune, flag_options, python, policy, run, out)
  options = slurm.point_options(tune, flag_options)
  arm_opts = {arm: options[p.name] for (arm, _, _), p in
              zip(study_lib.tune_plan(study), tune.points)}
  arrays = sorted({slurm.array_id(j) for j in tune_jobs.values()})
  dependency = 'afterany:' + ':'.join(arrays) if arrays else ''
  sdir = slurm.script_dir(tune.dir)
  logs = os.path.join(sdir, 'logs')
  os.makedirs(logs, exist_ok=True)  # Phase 1 may have had nothing to submit.
  keys = [(arm, seed) for arm in study.arms for seed in study.seeds]
  by_opts: dict[slurm.SlurmOptions, list[int]] = {}
  for i, (arm, _) in enumerate(keys):
    by_opts.setdefault(arm_opts[arm], []).append(i)
  jobs = dict(tune_jobs)
  for k, (opts, indices) in enumerate(by_opts.items()):
    bodies = [_compare_body(study, root, extra, python, opts.nodes, i) for i in indices]
    array = slurm.submit(slurm.batch_script(f'{study.name}-compare', opts, bodies, python,
                                policy.retries, logs, dependency),
                   os.path.join(sdir, f'compare-{k}.sh'), run)
    print(f'compare phase, {len(indices)} point(s): job {array} (after {dependency})',
          file=out)
    for j, i in enumerate(indices):
      jobs[f'compare {keys[i][0]} seed {keys[i][1]}'] = (
          f'{array}_{j}' if len(indices) > 1 else array)
  return jobs


def study_outcomes(study: study_lib.Study, root: str, extra: dict[str, Any],
                   jobs: dict[str, str], infos: dict[str, dict[str, str]]
                   ) -> list[backends.Outcome]:
  """After both phases: every tuning and comparison point's outcome (each run once)."""
  tune = study_lib.tune_sweep(study, root, extra)
  result = slurm.outcomes(tune, jobs, infos)
  selection = _selection(study, tune)
  compare = study_lib.compare_sweep(study, root, selection.chosen, extra)
  plan = study_lib.compare_plan(study, selection.chosen)
  seen = {o.name for o in result}
  compare_jobs = {p.name: jobs[f'compare {arm} seed {seed}']
                  for (arm, _, seed), p in zip(plan, compare.points) if p.name not in seen}
  compare_infos = {p.name: infos[f'compare {arm} seed {seed}']
                   for (arm, _, seed), p in zip(plan, compare.points) if p.name in compare_jobs}
  result += slurm.outcomes(compare, compare_jobs, compare_infos)
  missing = [a for a in study.arms if a not in selection.chosen]
  result += [backends.Outcome(f'compare {a} seed {s}', 'failed', detail='  no tuning run '
                              'of this arm finished') for a in missing for s in study.seeds]
  return result


def _task_main(argv: list[str]) -> int:
  """`python -m scone_jax.sweeps.slurm_study --study=... --index=I`: prints the bash running
  phase-2 point I (run by the compare array's task I; see _compare_body)."""
  parser = argparse.ArgumentParser(description=_task_main.__doc__)
  for name in ('study', 'root', 'extra', 'python'):
    parser.add_argument(f'--{name}', required=True)
  parser.add_argument('--nodes', type=int, required=True)
  parser.add_argument('--index', type=int, required=True)
  args = parser.parse_args(argv)
  try:
    study = study_lib.load_study(args.study)
    compare, point = compare_point(study, args.root, json.loads(args.extra), args.index)
  except spec.SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  spec.write_point_json(compare, point)
  job = (f'{os.environ["SLURM_ARRAY_JOB_ID"]}_{os.environ["SLURM_ARRAY_TASK_ID"]}'
         if 'SLURM_ARRAY_JOB_ID' in os.environ else os.environ.get('SLURM_JOB_ID', ''))
  previous = status.read(compare.dir).get(point.name, {})
  if not spec.is_finished(point):  # A tuning run reused as is keeps its own entry.
    status.update(compare.dir, {point.name: {
        'backend': 'slurm', 'job_id': job, 'state': 'running',
        'attempts': previous.get('attempts', 0) + 1,
        'log': os.path.join(slurm.script_dir(compare.dir), 'logs',
                            f'{study.name}-compare-{job}.txt')}})
  print(slurm.point_body(compare, point, args.python, args.nodes))
  return 0


if __name__ == '__main__':
  sys.exit(_task_main(sys.argv[1:]))
