"""Launches a sweep (experiments/sweeps/*.py) locally or on a TPU pod.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --dry_run
  python launch/sweep.py --sweep=experiments/sweeps/demo.py --parallel=2 --report
  python launch/sweep.py --sweep=experiments/sweeps/num_fgrams.py --backend=tpu \\
      --tpu_name=v5p-64 --zone=us-east5-a --project=P --root=gs://BUCKET/runs \\
      --repo=https://github.com/ORG/scone_jax.git --ref=main

Every point is validated against the config schema before anything launches. Finished
points (complete W/eval.json) are skipped; interrupted ones resume from W/checkpoints.
`--dry_run` prints every command and a table of each point's accelerator-resident and
offloaded params and training/inference FLOPs per token; A_f's training FLOPs at the worst
case (K A_f tokens per main-model token) and, with `--af_tokens_per_token=X` (measured: the
runs' logged batch/fgram_af_tokens_per_token, or benchmarks/bench_train.py), at X. Exit code is non-zero if any
point failed.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

# Running as a script puts launch/ on sys.path; the repo root holds scone_jax.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sweep_backends  # noqa: E402
import sweep_spec  # noqa: E402
from scone_jax import report as report_lib  # noqa: E402

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py).',
                             required=True)
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'tpu'], 'Where to run points.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print commands and accounting; run nothing.')
_AF_TOKENS = flags.DEFINE_float(
    'af_tokens_per_token', None, 'Dry run: measured A_f tokens per main-model token for '
    'the *_measured accounting columns (default: worst case only).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local backend: points run at once.')
_ONLY = flags.DEFINE_string('only', '', 'Run only points whose run name matches this regex.')
_REPORT = flags.DEFINE_bool('report', False, 'Write the report (CSV, REPORT.md, plots) after.')
_ROOT = flags.DEFINE_string('root', 'runs', 'Runs go to ROOT/SWEEP/RUN (local or gs://).')
_SET = flags.DEFINE_multi_string(
    'set', [], 'KEY=VALUE override for every point (part of run names), e.g. '
    '--set=train.steps=3. VALUE is parsed as a Python literal, else kept as a string.')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Local backend: the interpreter.')
_TPU_NAME = flags.DEFINE_string('tpu_name', '', 'TPU backend: TPU VM name.')
_ZONE = flags.DEFINE_string('zone', '', 'TPU backend: zone.')
_PROJECT = flags.DEFINE_string('project', '', 'TPU backend: GCP project (default: gcloud).')
_REPO = flags.DEFINE_string('repo', '', 'TPU backend: git URL or gs:// folder of this repo.')
_REF = flags.DEFINE_string('ref', 'main', 'TPU backend: git ref the workers check out.')
_RETRIES = flags.DEFINE_integer('retries', 3, 'TPU backend: retries of a failed point.')


def dry_run(sweep: sweep_spec.Sweep, python: str,
            tpu: sweep_backends.TpuTarget | None = None, out=None,
            af_tokens_per_token: float | None = None) -> None:
  """Prints the commands a run would execute, then the accounting table."""
  out = out or sys.stdout
  if tpu is not None:
    for p in sweep.points:
      print(f'# {p.name}', file=out)
      print(sweep_backends.tpu_command(sweep, p, tpu), file=out)
  else:
    for adir, group in sweep_backends.prepare_groups(sweep).items():
      print(f'# prepare {adir} (shared by {len(group)} point(s))', file=out)
      print(sweep_spec.command(sweep, group[0], python, 'prepare'), file=out)
    for p in sweep.points:
      print(f'# {p.name}', file=out)
      for stage in ('train', 'evaluate'):
        print(sweep_spec.command(sweep, p, python, stage), file=out)
  print(file=out)
  print(report_lib.markdown_table(sweep_spec.accounting_rows(sweep, af_tokens_per_token)),
        file=out)


def main(argv):
  del argv
  try:
    sweep = sweep_spec.load_sweep(_SWEEP.value, _ROOT.value,
                                  sweep_spec.parse_set(_SET.value), _ONLY.value)
  except sweep_spec.SweepError as e:
    sys.exit(f'error: {e}\nnothing was launched.')
  print(f'sweep {sweep.name}: {len(sweep.points)} point(s) under {sweep.dir}')
  tpu = _tpu_target() if _BACKEND.value == 'tpu' else None
  if _DRY_RUN.value:
    dry_run(sweep, _PYTHON.value, tpu, af_tokens_per_token=_AF_TOKENS.value)
    return
  if tpu is None:
    outcomes = sweep_backends.run_local(sweep, _PYTHON.value, _PARALLEL.value)
  else:
    outcomes = sweep_backends.run_tpu(sweep, tpu, retries=_RETRIES.value,
                                      log_dir=os.path.join('runs', 'tpu_logs'))
  failed = [o for o in outcomes if o.status == 'failed']
  print(f'{len(outcomes) - len(failed)}/{len(outcomes)} point(s) ok'
        + (f'; FAILED: {", ".join(o.name for o in failed)}' if failed else ''))
  if _REPORT.value:
    if '://' in sweep.dir:
      print(f'report: copy {sweep.dir} to a local ROOT/{sweep.name} (gcloud storage rsync '
            f'-r) and run python -m scone_jax.report --sweep={_SWEEP.value} --root=ROOT')
    else:
      for name, path in report_lib.write_report(sweep.dir).items():
        print(f'{name}: {path}')
  if failed:
    sys.exit(1)


def _tpu_target() -> sweep_backends.TpuTarget:
  missing = [f'--{n}' for n, v in (('tpu_name', _TPU_NAME.value), ('zone', _ZONE.value),
                                   ('repo', _REPO.value)) if not v]
  if missing:
    sys.exit(f'error: --backend=tpu needs {", ".join(missing)}')
  return sweep_backends.TpuTarget(_TPU_NAME.value, _ZONE.value, _PROJECT.value, _REPO.value,
                                  _REF.value)


if __name__ == '__main__':
  app.run(main)
