"""The sweep command line: `python -m scone_jax.sweeps` (launch/sweep.py is the same).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/demo.py --dry_run
  python -m scone_jax.sweeps --sweep=experiments/sweeps/demo.py --parallel=2 --report
  python -m scone_jax.sweeps --sweep=experiments/sweeps/num_fgrams.py --backend=tpu \\
      --tpu_name=v5p-64 --zone=us-east5-a --project=P --root=gs://BUCKET/runs \\
      --repo=https://github.com/ORG/scone_jax.git --ref=main

Every point is validated against the config schema before anything launches. Finished
points (complete W/eval.json, and W/downstream.json when the sweep scores downstream tasks:
its DOWNSTREAM dict or --downstream_tasks/--downstream_task_dir, sweeps/downstream_stage.py)
are skipped; interrupted ones resume from W/checkpoints. `--processes=N` (or the sweep
file's PROCESSES) runs each point on N JAX processes (docs/LAUNCH.md, "Points on several
processes").
`--dry_run` prints every command (for TPU: the bootstrap copy, then one ssh per point) and
a table of each point's accelerator-resident and offloaded params and training/inference
FLOPs per token; A_f's training FLOPs at the worst case (K A_f tokens per main-model token)
and, with `--af_tokens_per_token=X` (measured: the runs' logged
batch/fgram_af_tokens_per_token, or benchmarks/bench_train.py --mode=af_rate), at X. Exit
code is non-zero if any point failed.

A study file (one that defines get_study(), e.g. experiments/sweeps/study.py) runs in two
phases: each arm's learning rate is chosen on the validation corpora, then every arm runs
the comparison seeds at its chosen lr (scone_jax/sweeps/study.py). `--report` then writes
REPORT.md with the grid, the chosen lrs, per-corpus intervals and the verdicts.

Its flags live in its own `FLAGS` (scone_jax/cli.py), so importing it defines nothing
global.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from scone_jax import cli
from scone_jax import paths as paths_lib
from scone_jax import report as report_lib
from scone_jax.sweeps import backends
from scone_jax.sweeps import slurm
from scone_jax.sweeps import slurm_study
from scone_jax.sweeps import spec
from scone_jax.sweeps import status
from scone_jax.sweeps import study as study_lib
from scone_jax.sweeps import tpu as tpu_lib
from scone_jax.sweeps import tables
from scone_jax.sweeps import xpk as xpk_lib

FLAGS = flags.FlagValues()
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py).',
                             required=True, flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'tpu', 'slurm', 'xpk'],
                             'Where to run points (docs/LAUNCH.md).', flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print commands and accounting; run nothing.', flag_values=FLAGS)
_AF_TOKENS = flags.DEFINE_float(
    'af_tokens_per_token', None, 'Dry run: measured A_f tokens per main-model token for '
    'the *_measured accounting columns (default: worst case only).', flag_values=FLAGS)
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local backend: processes run at once (a '
                                 'point on N processes takes N).', flag_values=FLAGS)
_PROCESSES = flags.DEFINE_integer(
    'processes', None, "JAX processes per point (default: the sweep file's PROCESSES, else "
    '1). Local: N processes per stage on this machine (gloo on CPU; CUDA_VISIBLE_DEVICES '
    'split between them); SLURM: N tasks (srun, --ntasks-per-node=N/nodes); TPU/xpk: '
    "refused (one process per host of the slice).", flag_values=FLAGS)
_ONLY = flags.DEFINE_string('only', '', 'Run only points whose run name matches this regex.',
                            flag_values=FLAGS)
_REPORT = flags.DEFINE_bool('report', False,
                            'Write the report (CSV, REPORT.md, plots) after.',
                            flag_values=FLAGS)
_ROOT = flags.DEFINE_string('root', 'runs', 'Runs go to ROOT/SWEEP/RUN (local or gs://).',
                            flag_values=FLAGS)
_SET = flags.DEFINE_multi_string(
    'set', [], 'KEY=VALUE override for every point (part of run names), e.g. '
    '--set=train.steps=3. VALUE is parsed as a Python literal, else kept as a string.', flag_values=FLAGS)
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Local backend: the interpreter.', flag_values=FLAGS)
_TPU_NAME = flags.DEFINE_string('tpu_name', '', 'TPU backend: TPU VM name, or several '
                                'comma-separated (one point per free VM, in parallel).', flag_values=FLAGS)
_ZONE = flags.DEFINE_string('zone', '', 'TPU backend: zone.', flag_values=FLAGS)
_PROJECT = flags.DEFINE_string('project', '', 'TPU backend: GCP project (default: gcloud).', flag_values=FLAGS)
_REPO = flags.DEFINE_string('repo', '', 'TPU backend: git URL or gs:// folder of this repo.', flag_values=FLAGS)
_REF = flags.DEFINE_string('ref', 'main', 'TPU backend: git ref the workers check out.', flag_values=FLAGS)
_RETRIES = flags.DEFINE_integer('retries', 3, 'TPU backend: retries of a failed point; '
                                'SLURM: requeues of a preempted (exit 75) point.', flag_values=FLAGS)
_STATUS = flags.DEFINE_bool('status', False, "Print each point's backend, job, state, "
                            'attempts and last step (from ROOT/SWEEP/status.json); run nothing.', flag_values=FLAGS)
# --slurm.*: a point's job resources. Only flags given on the command line are passed on,
# so they override the sweep file's SLURM dict / slurm_resources() and leave the rest.
_SLURM_FLAGS = [
    flags.DEFINE_string('slurm.partition', '', 'SLURM: partition (default: the default).', flag_values=FLAGS),
    flags.DEFINE_integer('slurm.nodes', 1, 'SLURM: nodes per point (> 1: srun + '
                         'distributed.mode=auto; needs a gs:// root or --slurm.shared_fs).', flag_values=FLAGS),
    flags.DEFINE_integer('slurm.gpus_per_node', 0, 'SLURM: GPUs per node.', flag_values=FLAGS),
    flags.DEFINE_integer('slurm.cpus_per_task', 0, 'SLURM: CPUs per task.', flag_values=FLAGS),
    flags.DEFINE_string('slurm.mem', '', 'SLURM: memory per node, e.g. 64G.', flag_values=FLAGS),
    flags.DEFINE_string('slurm.time', '', 'SLURM: time limit per job, e.g. 04:00:00.', flag_values=FLAGS),
    flags.DEFINE_string('slurm.account', '', 'SLURM: account to charge.', flag_values=FLAGS),
    flags.DEFINE_multi_string('slurm.extra', [], "SLURM: extra sbatch option (repeat), "
                              "e.g. --slurm.extra=--qos=high.", flag_values=FLAGS),
    flags.DEFINE_string('slurm.setup', '', 'SLURM: shell lines before each point, e.g. '
                        '"module load cuda".', flag_values=FLAGS),
    flags.DEFINE_integer('slurm.max_parallel', 0, 'SLURM: array tasks at once (0: any).', flag_values=FLAGS),
    flags.DEFINE_bool('slurm.shared_fs', False, 'SLURM: the local --root is on a filesystem '
                      'every node mounts.', flag_values=FLAGS),
    flags.DEFINE_integer('slurm.signal_s', 120, 'SLURM: SIGTERM this many seconds before '
                         'the time limit (save, exit 75, requeue).', flag_values=FLAGS),
]
_TPU_QUEUED = flags.DEFINE_string(
    'tpu_queued', '', 'TPU backend: create a queued-resource slice of this accelerator type '
    '(e.g. v5p-64) per point, run it there, delete it (instead of --tpu_name).', flag_values=FLAGS)
_TPU_RUNTIME = flags.DEFINE_string('tpu_runtime_version', '', 'TPU backend with '
                                   '--tpu_queued: the TPU VM image, e.g. v2-alpha-tpuv5.', flag_values=FLAGS)
_TPU_SPOT = flags.DEFINE_bool('tpu_spot', False, 'TPU backend with --tpu_queued: spot.', flag_values=FLAGS)
_XPK_CLUSTER = flags.DEFINE_string('xpk.cluster', '', 'xpk: the GKE cluster.', flag_values=FLAGS)
_XPK_DEVICE = flags.DEFINE_string('xpk.device_type', '', 'xpk: e.g. v5p-8 or h100-80gb-8.', flag_values=FLAGS)
_XPK_IMAGE = flags.DEFINE_string('xpk.docker_image', '', 'xpk: image with this repo and its '
                                 'requirements (docs/LAUNCH.md).', flag_values=FLAGS)
_XPK_COUNT = flags.DEFINE_integer('xpk.count', 1, 'xpk: TPU slices or GPU nodes per point.', flag_values=FLAGS)
# --downstream_*: override the sweep file's DOWNSTREAM dict (sweeps/downstream_stage.py);
# only flags given on the command line are passed on.
_DOWNSTREAM_FLAGS = [
    flags.DEFINE_list('downstream_tasks', None, 'Tasks every point scores after evaluate '
                      '(python -m scone_jax.downstream); empty: none.', flag_values=FLAGS),
    flags.DEFINE_string('downstream_task_dir', None, 'Directory of the converted task '
                        'files TASK.jsonl (local or gs://).', flag_values=FLAGS),
    flags.DEFINE_list('downstream_paths', None, 'Scoring paths: train and/or store '
                      '(store exports first; points with a mined table only).',
                      flag_values=FLAGS),
    flags.DEFINE_string('downstream_preset', None, 'Downstream preset: olmo or olmes.',
                        flag_values=FLAGS),
]
_SLURM_WAIT = flags.DEFINE_bool('slurm.wait', False, 'SLURM: wait for the jobs (--report '
                                'waits too); otherwise submit and return.', flag_values=FLAGS)


def main(argv):
  """`python -m scone_jax.sweeps` (run through `cli.run('sweeps', main, FLAGS)`)."""
  del argv
  try:
    extra = spec.parse_set(_SET.value)
    if study_lib.is_study_file(_SWEEP.value):
      return _main_study(study_lib.load_study(_SWEEP.value), extra)
    sweep = spec.load_sweep(_SWEEP.value, _ROOT.value, extra, _ONLY.value,
                            {f.name[len('downstream_'):]: f.value
                             for f in _DOWNSTREAM_FLAGS if f.present}, _PROCESSES.value)
    processes = max((p.processes for p in sweep.points), default=1)
    if processes > 1 and _BACKEND.value in ('tpu', 'xpk'):
      raise spec.SweepError(
          f'--backend={_BACKEND.value} runs one process per host of the slice it gets '
          '(distributed.mode=auto), so a point cannot ask for its own process count '
          f'({processes} from PROCESSES/--processes): size the slice instead '
          '(--tpu_name/--tpu_queued or --xpk.device_type/--xpk.count) and pass '
          '--processes=1')
    if _BACKEND.value == 'local':  # The GPUs split between the processes, or the error.
      spec.process_env(0, processes, dict(os.environ))
  except spec.SweepError as e:  # Every point is checked before any launches.
    raise spec.SweepError(f'{e}; nothing was launched') from e
  print(f'sweep {sweep.name}: {len(sweep.points)} point(s) under {sweep.dir}')
  if _STATUS.value:
    slurm.refresh(sweep)  # Jobs nobody waited for: their state now.
    print(tables.markdown_table(status.table(sweep, backends._last_step)))
    return
  queued = _queued_slice() if _BACKEND.value == 'tpu' and _TPU_QUEUED.value else None
  tpu = _tpu_target() if _BACKEND.value == 'tpu' and not queued else None
  gke = _xpk_target() if _BACKEND.value == 'xpk' else None
  if _DRY_RUN.value:
    commands = None
    if _BACKEND.value == 'slurm':
      commands = slurm.dry_run_commands(sweep, _slurm_flags(), _PYTHON.value, _policy())
    elif queued is not None:
      commands = tpu_lib.dry_run_commands(queued, sweep)
    elif tpu is not None:
      commands = tpu_lib.tpu_dry_run_commands(sweep, tpu)
    elif gke is not None:
      commands = xpk_lib.dry_run_commands(gke, sweep)
    backends.dry_run(sweep, _PYTHON.value, af_tokens_per_token=_AF_TOKENS.value,
                     commands=commands)
    return
  if queued is not None or gke is not None:
    outcomes = (tpu_lib.run_queued(sweep, queued, _PARALLEL.value, policy=_policy())
                if queued is not None else xpk_lib.run_xpk(sweep, gke))
  elif _BACKEND.value == 'slurm':
    outcomes = slurm.run_slurm(sweep, _slurm_flags(), _PYTHON.value, _policy(),
                               wait=_REPORT.value or _SLURM_WAIT.value)
    if not (_REPORT.value or _SLURM_WAIT.value):
      print('submitted; follow with --status (same --sweep/--root/--set), and write the '
            'report with --report once the jobs end (it skips finished points)')
      return
  elif tpu is None:
    outcomes = backends.run_local(sweep, _PYTHON.value, _PARALLEL.value)
  else:
    outcomes = tpu_lib.run_tpu(sweep, tpu, retries=_RETRIES.value,
                               log_dir=os.path.join('runs', 'tpu_logs'))
  if _BACKEND.value != 'slurm':  # slurm records its own (with job ids) as it goes.
    status.record_outcomes(sweep.dir, _BACKEND.value, outcomes)
  _finish(sweep.name, sweep.dir, outcomes)


def _study_points(study: study_lib.Study, tune: spec.Sweep, extra: dict) -> spec.Sweep:
  """The tuning points, plus the comparison points once study.json holds a selection."""
  record = study_lib.read_study_json(tune.dir) or {}
  chosen = record.get('selection', {}).get('chosen', {})
  compare = study_lib.compare_sweep(study, _ROOT.value, chosen, extra).points if chosen else []
  names = {p.name for p in tune.points}
  return dataclasses.replace(tune, points=tune.points + [p for p in compare
                                                          if p.name not in names])


def _slurm_flags() -> dict:
  """The --slurm.* flags given on the command line, as SlurmOptions fields."""
  return {f.name.split('.', 1)[1]: f.value for f in _SLURM_FLAGS if f.present}


def _policy() -> status.RetryPolicy:
  return status.RetryPolicy(retries=_RETRIES.value)


def _main_study(study: study_lib.Study, extra: dict) -> None:
  """The two-phase study (local or SLURM: selection reads the runs' eval.json)."""
  if _BACKEND.value not in ('local', 'slurm') or _ONLY.value:
    raise cli.CommandLineError(
        'a study runs on the local or slurm backend and always runs all its points (lr '
        'selection needs every tuning run); drop --backend/--only (or use --backend=slurm)')
  if _PROCESSES.value not in (None, 1):
    raise cli.CommandLineError(
        'a study runs each point on one process; drop --processes (a sweep file runs '
        'points on several)')
  if any(f.present for f in _DOWNSTREAM_FLAGS):
    raise cli.CommandLineError(
        'a study does not run downstream tasks; score its runs afterwards with '
        'python -m scone_jax.downstream --workdir=W (docs/DOWNSTREAM.md), or drop '
        '--downstream_*')
  # Validates every tuning point before anything runs.
  tune = study_lib.tune_sweep(study, _ROOT.value, extra)
  if _STATUS.value:
    points = _study_points(study, tune, extra)
    slurm.refresh(points)
    print(tables.markdown_table(status.table(points, backends._last_step)))
    return
  print(f'study {study.name}: {len(study.arms)} arm(s), lr grid '
        f'{list(study.learning_rates)}, seeds {list(study.seeds)} under {tune.dir}')
  if _DRY_RUN.value:
    study_lib.dry_run(study, _ROOT.value, _PYTHON.value, extra)
    return
  if _BACKEND.value == 'slurm':
    jobs = slurm_study.submit_study(study, _ROOT.value, extra, _slurm_flags(),
                                    _PYTHON.value, _policy())
    if not (_REPORT.value or _SLURM_WAIT.value):
      print('submitted both phases; write the report with --report once the jobs end')
      return
    infos = slurm.wait_jobs(jobs)
    _finish(study.name, tune.dir,
            slurm_study.study_outcomes(study, _ROOT.value, extra, jobs, infos))
    return
  _, outcomes = study_lib.run_study(study, _ROOT.value, _PYTHON.value, _PARALLEL.value,
                                    extra)
  _finish(study.name, tune.dir, outcomes)


def _finish(name: str, sweep_dir: str, outcomes: list) -> None:
  failed = [o for o in outcomes if o.status == 'failed']
  print(f'{len(outcomes) - len(failed)}/{len(outcomes)} point(s) ok'
        + (f'; FAILED: {", ".join(o.name for o in failed)}' if failed else ''))
  if _REPORT.value:  # ROOT may be a bucket: the report is written next to the runs.
    report_paths = report_lib.write_report(sweep_dir)
    print(paths_lib.read_text(report_paths['markdown']))
    for key, path in report_paths.items():
      print(f'{key}: {path}')
  if failed:
    sys.exit(1)


def _queued_slice() -> tpu_lib.QueuedSlice:
  missing = [f'--{n}' for n, v in (('zone', _ZONE.value), ('repo', _REPO.value),
                                   ('tpu_runtime_version', _TPU_RUNTIME.value)) if not v]
  if missing:
    raise cli.CommandLineError(f'--tpu_queued needs {", ".join(missing)}')
  return tpu_lib.QueuedSlice(_TPU_QUEUED.value, _TPU_RUNTIME.value, _ZONE.value,
                             _PROJECT.value, _REPO.value, _REF.value, spot=_TPU_SPOT.value)


def _xpk_target() -> xpk_lib.XpkTarget:
  return xpk_lib.XpkTarget(_XPK_CLUSTER.value, _XPK_DEVICE.value, _XPK_IMAGE.value,
                           _PROJECT.value, _ZONE.value, _XPK_COUNT.value,
                           max_restarts=_RETRIES.value)


def _tpu_target() -> list[tpu_lib.TpuTarget]:
  """The TPU VMs of --tpu_name (comma-separated: points run in parallel over them)."""
  missing = [f'--{n}' for n, v in (('tpu_name', _TPU_NAME.value), ('zone', _ZONE.value),
                                   ('repo', _REPO.value)) if not v]
  if missing:
    raise cli.CommandLineError(f'--backend=tpu needs {", ".join(missing)}')
  return [tpu_lib.TpuTarget(name, _ZONE.value, _PROJECT.value, _REPO.value, _REF.value)
          for name in _TPU_NAME.value.split(',') if name]
