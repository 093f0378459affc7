"""Downstream evaluation as a sweep stage: after evaluate, `python -m scone_jax.downstream`.

A sweep file turns it on with a module-level dict (the sweep CLI's --downstream_* flags
override its keys, or turn it on for any sweep):

  DOWNSTREAM = {'tasks': ['piqa', 'arc_easy'], 'task_dir': 'data/tasks',
                'paths': ['train'], 'preset': 'olmo'}

Every point then runs, after train and evaluate, one downstream command per scoring path
(docs/DOWNSTREAM.md); path 'store' first exports the point's store and applies only to
points with a mined table (a baseline or hashed point has no store: its train path is its
served model). The settings decide nothing about training, so they are not part of run
names. A point counts as finished when its W/downstream.json holds every task for every
path at the final step with this preset (`done`); the runner itself skips a task already
scored on the same task file, so a rerun after a kill scores only what is missing.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Sequence

from scone_jax import config as config_lib
from scone_jax import paths
from scone_jax.downstream import presets, runner
from scone_jax.errors import UserError

CONVERT = ('python -m scone_jax.downstream.convert --task=TASK --input=DOWNLOADED_FILE '
           '--out={task_dir}/TASK.jsonl (docs/DOWNSTREAM.md lists the files each task ships)')


class DownstreamSettingError(UserError, ValueError):
  """A sweep's downstream settings or task files are invalid; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class Downstream:
  """What a sweep scores after training (scone_jax/downstream/runner.run's arguments).

  Attributes:
    tasks: task names (downstream/presets.TASKS), read from TASK_DIR/<task>.jsonl.
    task_dir: local or gs:// directory of the converted task files; every backend's
      workers must read it too (a gs:// directory for TPU and xpk).
    paths: scoring paths, from runner.PATHS ('store' exports first).
    preset: task formulation and headline metric (downstream/presets.PRESETS).
  """
  tasks: tuple[str, ...]
  task_dir: str
  paths: tuple[str, ...] = ('train',)
  preset: str = 'olmo'

  def paths_for(self, cfg: config_lib.Config) -> tuple[str, ...]:
    """The paths a point scores: 'store' only where the point exports a mined table."""
    return tuple(p for p in self.paths
                 if p != 'store' or cfg.fgram_model.uses_fgram_table)


def _as_tuple(value: Any) -> tuple[str, ...]:
  if isinstance(value, str):
    return tuple(v for v in value.split(',') if v)
  return tuple(value)


def from_settings(settings: dict[str, Any] | None, where: str) -> Downstream | None:
  """A validated Downstream from a sweep file's DOWNSTREAM dict (flags already merged);
  None when it names no tasks. Checks that every task file exists.

  Raises:
    DownstreamSettingError: an unknown key, task, path or preset, no task_dir, or a
      missing task file (the message names the files and the convert command).
  """
  if not settings:
    return None
  fields = {f.name for f in dataclasses.fields(Downstream)}
  unknown = sorted(set(settings) - fields)
  if unknown:
    raise DownstreamSettingError(f'{where}: unknown DOWNSTREAM key(s) {unknown}; valid: '
                                 f'{sorted(fields)}')
  tasks = _as_tuple(settings.get('tasks', ()))
  if not tasks:
    return None
  task_dir = str(settings.get('task_dir', ''))
  # Absolute: a stage may run from another directory (a SLURM job, a worker's checkout).
  ds = Downstream(tasks, paths.resolve(task_dir) if task_dir else '',
                  _as_tuple(settings.get('paths', ('train',))),
                  str(settings.get('preset', 'olmo')))
  try:
    presets.get(ds.preset)
    for task in ds.tasks:
      presets.check_task(task)
  except UserError as e:
    raise DownstreamSettingError(f'{where}: {e}') from e
  bad = [p for p in ds.paths if p not in runner.PATHS]
  if bad or not ds.paths:
    raise DownstreamSettingError(f'{where}: downstream paths {list(ds.paths)}; use some of '
                                 f'{list(runner.PATHS)}')
  if not ds.task_dir:
    raise DownstreamSettingError(
        f'{where}: downstream tasks {list(ds.tasks)} need a task directory: pass '
        '--downstream_task_dir=DIR holding TASK.jsonl per task (convert the downloads with '
        + CONVERT.format(task_dir='DIR') + ')')
  files = [runner.task_file(ds.task_dir, t) for t in ds.tasks]
  if presets.get(ds.preset).num_shots:
    files += [runner.task_file(ds.task_dir, t, dev=True) for t in ds.tasks]
  missing = [f for f in files if not paths.exists(f)]
  if missing:
    raise DownstreamSettingError(
        f'{where}: missing downstream task file(s) {", ".join(missing)}; convert each '
        'dataset first: ' + CONVERT.format(task_dir=ds.task_dir) +
        ('' if not presets.get(ds.preset).num_shots else
         f'; preset {ds.preset!r} also reads TASK.dev.jsonl (the dev split, converted the '
         'same way)') + '; or pass --downstream_task_dir=DIR where they are, or '
        '--downstream_tasks= (empty) to run without downstream tasks')
  return ds


def command(python: str, workdir: str, ds: Downstream, path: str) -> str:
  """`python -m scone_jax.downstream` for one path of a point, shell-quoted."""
  args = [python, '-m', 'scone_jax.downstream', f'--workdir={workdir}',
          f'--tasks={",".join(ds.tasks)}', f'--task_dir={ds.task_dir}', f'--path={path}',
          f'--preset={ds.preset}']
  return ' '.join(shlex.quote(a) for a in args)


def done(workdir: str, ds: Downstream, path: str, steps: int) -> bool:
  """True when W/downstream.json holds every task of `ds` for `path`, scored at the final
  step (>= steps) with ds.preset (the runner re-checks the task files' bytes itself)."""
  entry = runner.read_results(workdir)['paths'].get(path, {})
  scored = entry.get('tasks', {})
  return (int(entry.get('step', -1)) >= steps and
          all(t in scored and scored[t].get('preset') == ds.preset for t in ds.tasks))


def done_argv(workdir: str, ds: Downstream, path: str, steps: int) -> list[str]:
  """Arguments of `done_from_argv` (a shell check on a remote worker)."""
  return [workdir, path, str(steps), ds.preset, ','.join(ds.tasks)]


def done_from_argv(argv: Sequence[str]) -> bool:
  workdir, path, steps, preset, tasks = argv
  return done(workdir, Downstream(_as_tuple(tasks), '', (path,), preset), path, int(steps))


# A shell command (before done_argv's arguments) that exits 0 when `done` holds.
DONE_CHECK = ('import sys; from scone_jax.sweeps import downstream_stage as d; '
              'sys.exit(not d.done_from_argv(sys.argv[1:]))')


def done_check_command(python: str, workdir: str, ds: Downstream, path: str,
                       steps: int) -> str:
  return ' '.join(shlex.quote(a) for a in
                  [python, '-c', DONE_CHECK, *done_argv(workdir, ds, path, steps)])
