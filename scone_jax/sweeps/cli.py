"""The sweep command line: `python -m scone_jax.sweeps` (launch/sweep.py is the same).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/demo.py --dry_run
  python -m scone_jax.sweeps --sweep=experiments/sweeps/demo.py --parallel=2 --report
  python -m scone_jax.sweeps --sweep=experiments/sweeps/num_fgrams.py --backend=tpu \\
      --tpu_name=v5p-64 --zone=us-east5-a --project=P --root=gs://BUCKET/runs \\
      --repo=https://github.com/ORG/scone_jax.git --ref=main

Every point is validated against the config schema before anything launches. Finished
points (complete W/eval.json) are skipped; interrupted ones resume from W/checkpoints.
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

import os
import sys

from absl import flags

from scone_jax import cli
from scone_jax import paths as paths_lib
from scone_jax import report as report_lib
from scone_jax.sweeps import backends
from scone_jax.sweeps import spec
from scone_jax.sweeps import study as study_lib

FLAGS = flags.FlagValues()
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py).',
                             required=True, flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'tpu'], 'Where to run points.',
                             flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print commands and accounting; run nothing.',
                             flag_values=FLAGS)
_AF_TOKENS = flags.DEFINE_float(
    'af_tokens_per_token', None, 'Dry run: measured A_f tokens per main-model token for '
    'the *_measured accounting columns (default: worst case only).', flag_values=FLAGS)
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local backend: points run at once.',
                                 flag_values=FLAGS)
_ONLY = flags.DEFINE_string('only', '', 'Run only points whose run name matches this regex.',
                            flag_values=FLAGS)
_REPORT = flags.DEFINE_bool('report', False,
                            'Write the report (CSV, REPORT.md, plots) after.',
                            flag_values=FLAGS)
_ROOT = flags.DEFINE_string('root', 'runs', 'Runs go to ROOT/SWEEP/RUN (local or gs://).',
                            flag_values=FLAGS)
_SET = flags.DEFINE_multi_string(
    'set', [], 'KEY=VALUE override for every point (part of run names), e.g. '
    '--set=train.steps=3. VALUE is parsed as a Python literal, else kept as a string.',
    flag_values=FLAGS)
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Local backend: the interpreter.',
                              flag_values=FLAGS)
_TPU_NAME = flags.DEFINE_string('tpu_name', '', 'TPU backend: TPU VM name.',
                                flag_values=FLAGS)
_ZONE = flags.DEFINE_string('zone', '', 'TPU backend: zone.', flag_values=FLAGS)
_PROJECT = flags.DEFINE_string('project', '', 'TPU backend: GCP project (default: gcloud).',
                               flag_values=FLAGS)
_REPO = flags.DEFINE_string('repo', '', 'TPU backend: git URL or gs:// folder of this repo.',
                            flag_values=FLAGS)
_REF = flags.DEFINE_string('ref', 'main', 'TPU backend: git ref the workers check out.',
                           flag_values=FLAGS)
_RETRIES = flags.DEFINE_integer('retries', 3, 'TPU backend: retries of a failed point.',
                                flag_values=FLAGS)


def main(argv):
  """`python -m scone_jax.sweeps` (run through `cli.run('sweeps', main, FLAGS)`)."""
  del argv
  try:
    extra = spec.parse_set(_SET.value)
    if study_lib.is_study_file(_SWEEP.value):
      return _main_study(study_lib.load_study(_SWEEP.value), extra)
    sweep = spec.load_sweep(_SWEEP.value, _ROOT.value, extra, _ONLY.value)
  except spec.SweepError as e:  # Every point is checked before any launches.
    raise spec.SweepError(f'{e}; nothing was launched') from e
  print(f'sweep {sweep.name}: {len(sweep.points)} point(s) under {sweep.dir}')
  tpu = _tpu_target() if _BACKEND.value == 'tpu' else None
  if _DRY_RUN.value:
    backends.dry_run(sweep, _PYTHON.value, tpu, af_tokens_per_token=_AF_TOKENS.value)
    return
  if tpu is None:
    outcomes = backends.run_local(sweep, _PYTHON.value, _PARALLEL.value)
  else:
    outcomes = backends.run_tpu(sweep, tpu, retries=_RETRIES.value,
                                log_dir=os.path.join('runs', 'tpu_logs'))
  _finish(sweep.name, sweep.dir, outcomes)


def _main_study(study: study_lib.Study, extra: dict) -> None:
  """The two-phase study (local backend only: selection reads the runs' eval.json)."""
  if _BACKEND.value != 'local' or _ONLY.value:
    raise cli.CommandLineError(
        'a study runs on the local backend and always runs all its points (lr selection '
        'needs every tuning run); drop --backend/--only')
  # Validates every tuning point before anything runs.
  tune = study_lib.tune_sweep(study, _ROOT.value, extra)
  print(f'study {study.name}: {len(study.arms)} arm(s), lr grid '
        f'{list(study.learning_rates)}, seeds {list(study.seeds)} under {tune.dir}')
  if _DRY_RUN.value:
    study_lib.dry_run(study, _ROOT.value, _PYTHON.value, extra)
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


def _tpu_target() -> backends.TpuTarget:
  missing = [f'--{n}' for n, v in (('tpu_name', _TPU_NAME.value), ('zone', _ZONE.value),
                                   ('repo', _REPO.value)) if not v]
  if missing:
    raise cli.CommandLineError(f'--backend=tpu needs {", ".join(missing)}')
  return backends.TpuTarget(_TPU_NAME.value, _ZONE.value, _PROJECT.value, _REPO.value,
                            _REF.value)
