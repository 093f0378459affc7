"""`make demo`: the main job, end to end on the embedded corpus in ~15 minutes on 2 CPU cores.

  python -m scone_jax.demo --workdir=runs/demo

prepare (once, shared) -> train a baseline and SCONE at three numbers of f-grams S, two
seeds each (experiments/sweeps/demo.py through scone_jax.sweeps' local backend) ->
evaluate -> report (table + PNG plots) -> export the best SCONE model's f-gram embeddings
-> generate a few lines through the host store. It ends with the table, the plot paths and
a plain verdict: did SCONE beat the baseline, and did perplexity fall as S grew (means over
seeds)? The verdict reports what the data says, whichever way it goes. Rerunning resumes:
finished points are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

from scone_jax import report
from scone_jax.sweeps import backends as sweep_backends
from scone_jax.sweeps import spec as sweep_spec

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Root of the demo sweep and its report.')
_SWEEP = flags.DEFINE_string('sweep', os.path.join(_REPO, 'experiments', 'sweeps', 'demo.py'),
                             'The sweep to run (tests pass a smaller one).')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 2, "Points trained at once (2 overlaps one run's Python startup and "
    "compilation with the other's training on 2 cores).")
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE override for every point.')
_PROMPTS = flags.DEFINE_multi_string(
    'prompt', ['Return the number of', 'This module provides', 'If the file'],
    'Prompts for the generation step.')

@dataclasses.dataclass(frozen=True)
class Verdict:
  """What the demo's data says; `lines` are the plain-English statements."""
  scone_beats_baseline: bool | None
  ppl_falls_with_s: bool | None
  lines: list[str]


def verdict(runs: Sequence[report.Run]) -> Verdict:
  """Compares mean held-out perplexity (over seeds) of the baseline and the SCONE points."""
  gs = [g for g in report.groups(runs) if g.n]
  base = [g for g in gs if not g.first.cfg.is_scone]
  scone = sorted((g for g in gs if g.first.cfg.is_scone), key=lambda g: g.first.num_fgrams)
  if not base or not scone:
    return Verdict(None, None, ['Not enough finished runs for a verdict (need a baseline '
                                'and SCONE points with eval.json).'])
  b = base[0].stat(report.np.mean)
  means = [(g.first.num_fgrams, g.stat(report.np.mean)) for g in scone]
  best_s, best = min(means, key=lambda m: m[1])
  beats = best < b
  lines = [f'Baseline perplexity {b:.3f} (mean of {base[0].n} seed(s)); best SCONE '
           f'{best:.3f} at S={best_s}: SCONE {"BEAT" if beats else "did NOT beat"} the '
           f'baseline ({(best - b) / b:+.1%}).']
  falls = all(later < earlier for (_, earlier), (_, later) in zip(means, means[1:]))
  trend = ', '.join(f'S={s}: {m:.3f}' for s, m in means)
  lines.append(f'Perplexity {"fell" if falls else "did NOT fall monotonically"} as S grew '
               f'({trend}).')
  return Verdict(beats, falls, lines)


def best_scone_run(runs: Sequence[report.Run]) -> report.Run | None:
  """The lowest-perplexity finished SCONE run of the best SCONE group."""
  scone = [g for g in report.groups(runs) if g.n and g.first.cfg.is_scone]
  if not scone:
    return None
  best = min(scone, key=lambda g: g.stat(report.np.mean))
  return min((r for r in best.runs if r.finished), key=lambda r: r.perplexity)


def export_and_generate(sweep: sweep_spec.Sweep, run: report.Run, prompts: Sequence[str],
                        python: str = sys.executable) -> str:
  """Exports the run's f-gram embeddings and generates from prompts; returns the text."""
  point = next(p for p in sweep.points if p.name == run.name)
  log = os.path.join(point.workdir, 'log.txt')
  rc = sweep_backends.shell_runner(sweep_spec.command(sweep, point, python, 'export'), log)
  if rc:
    raise RuntimeError(f'export of {run.name} failed (exit {rc}); see {log}')
  cmd = sweep_spec.command(sweep, point, python, 'generate')
  # Half the context for new tokens leaves the other half for the (short) prompts.
  cmd += f' --max_new_tokens={run.cfg.model.max_seq_len // 2} --temperature=0.8 --top_k=40'
  cmd += ''.join(' ' + shlex.quote(f'--prompt={p}') for p in prompts)
  result = subprocess.run(cmd, shell=True, executable='/bin/bash', capture_output=True,
                          text=True, check=False)
  with open(log, 'a') as f:
    f.write(f'\n$ {cmd}\n{result.stdout}{result.stderr}')
  if result.returncode:
    raise RuntimeError(f'generate from {run.name} failed (exit {result.returncode}); see '
                       f'{log}:\n{result.stderr[-2000:]}')
  return result.stdout


def main(argv):
  del argv
  sweep = sweep_spec.load_sweep(_SWEEP.value, _WORKDIR.value,
                                sweep_spec.parse_set(_SET.value))
  print(f'demo: sweep {sweep.name}, {len(sweep.points)} points under {sweep.dir}', flush=True)
  outcomes = sweep_backends.run_local(sweep, sys.executable, _PARALLEL.value)
  failed = [o.name for o in outcomes if o.status == 'failed']
  paths = report.write_report(sweep.dir)
  runs = report.collect(sweep.dir)
  best = best_scone_run(runs)
  if best is not None:
    print(f'\nexport + generate from the best SCONE run {best.name}:', flush=True)
    print(export_and_generate(sweep, best, _PROMPTS.value))
  print('\n' + report.markdown_table(report.group_rows(runs)) + '\n')
  for name, path in paths.items():
    print(f'{name}: {path}')
  print('\nVERDICT')
  for line in verdict(runs).lines:
    print('  ' + line)
  if failed:
    sys.exit(f'{len(failed)} point(s) failed: {", ".join(failed)} (logs in their log.txt)')


if __name__ == '__main__':
  app.run(main)
