"""`make demo`: the main job, end to end on the embedded corpus in ~15 minutes on 2 CPU cores.

  python -m scone_jax.demo --workdir=runs/demo

prepare (once, shared) -> train a baseline and SCONE at three numbers of f-grams S, two
seeds each (experiments/sweeps/demo.py through scone_jax.sweeps' local backend) ->
evaluate -> report (table + PNG plots) -> export the best SCONE model's f-gram embeddings
-> generate a few lines through the host store -> score that model on a multiple-choice
task built from the embedded corpus's held-out modules (the true next sentence of a
docstring; downstream/embedded.py) through the training forward and through the store,
against chance. It ends with the per-corpus tables, the
plot paths and the verdict lines of the report (scone_jax/sweeps/analysis.py): did SCONE
beat the baseline, and did perplexity fall as S grew, each "beyond the seed spread" only
when the paired interval excludes zero. The learning rates are those `make study` chose
(experiments/sweeps/demo.py). Rerunning resumes: finished points are skipped.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import flags

from scone_jax import cli, prepare, report
from scone_jax import run as run_lib
from scone_jax.downstream import embedded, presets, runner, tasks
from scone_jax.sweeps import analysis
from scone_jax.sweeps import backends as sweep_backends
from scone_jax.sweeps import results
from scone_jax.sweeps import spec as sweep_spec
from scone_jax.sweeps import study
from scone_jax.sweeps import tables

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Root of the demo sweep and its report.',
                              default='runs/demo')
_SWEEP = flags.DEFINE_string('sweep', 'experiments/sweeps/demo.py',
                             'The sweep to run (tests pass a smaller one).', flag_values=FLAGS)
_PARALLEL = flags.DEFINE_integer(
    'parallel', 2, "Points trained at once (2 overlaps one run's Python startup and "
    "compilation with the other's training on 2 cores).", flag_values=FLAGS)
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE override for every point.',
                                 flag_values=FLAGS)
_PROMPTS = flags.DEFINE_multi_string(
    'prompt', ['Return the number of', 'This module provides', 'If the file'],
    'Prompts for the generation step.', flag_values=FLAGS)


def verdict_lines(runs: Sequence[results.PointResult]) -> list[str]:
  """What the demo's data says, per test corpus (scone_jax/sweeps/analysis.py)."""
  arms, baseline = analysis.arms_of(runs, None)
  return analysis.verdicts(arms, baseline, runs)


def best_scone_run(runs: Sequence[results.PointResult]) -> results.PointResult | None:
  """The best SCONE arm's run with the lowest validation loss (the first test corpus's
  loss when there is no validation corpus)."""
  arms, _ = analysis.arms_of(runs, None)
  tests = analysis.test_corpora(runs)
  best, _ = analysis.best_scone(arms, tests[0] if tests else '')
  if best is None:
    return None

  def score(r: results.PointResult) -> float:
    valid = study.validation_loss(r.eval)
    return valid if math.isfinite(valid) else r.eval[tests[0]]['loss']
  return min(best.finished, key=score)


def export_and_generate(sweep: sweep_spec.Sweep, run: results.PointResult, prompts: Sequence[str],
                        python: str = sys.executable) -> str:
  """Exports the run's f-gram embeddings and generates from prompts; returns the text."""
  point = next(p for p in sweep.points if p.name == run.name)
  log = os.path.join(point.workdir, 'log.txt')
  rc = sweep_backends.shell_runner(sweep_spec.command(sweep, point, python, 'export'), log)
  if rc:
    raise RuntimeError(f'export of {run.name} failed (exit {rc}); see {log}')
  cmd = sweep_spec.command(sweep, point, python, 'generate')
  # Half the context for new tokens leaves the other half for the (short) prompts.
  cmd += (f' --config.serve.max_new_tokens={run.cfg.model.max_seq_len // 2}'
          ' --config.serve.temperature=0.8 --config.serve.top_k=40')
  cmd += ''.join(' ' + shlex.quote(f'--prompt={p}') for p in prompts)
  result = subprocess.run(cmd, shell=True, executable='/bin/bash', capture_output=True,
                          text=True, check=False)
  with open(log, 'a') as f:
    f.write(f'\n$ {cmd}\n{result.stdout}{result.stderr}')
  if result.returncode:
    raise RuntimeError(f'generate from {run.name} failed (exit {result.returncode}); see '
                       f'{log}:\n{result.stderr[-2000:]}')
  return result.stdout


EMBEDDED, NUM_CHOICES, NUM_DOCS = 'embedded', 4, 200
# Context tokens a document keeps at least (longer contexts lose their oldest tokens).
MIN_CONTEXT_TOKENS = 8


def fitting_docs(docs: Sequence[tasks.Doc], tokenizer, window: int,
                 limit: int = NUM_DOCS) -> list[tasks.Doc]:
  """The first `limit` docs whose every continuation (presets.DELIMITER + choice) fits
  the model's window beside BOS and MIN_CONTEXT_TOKENS of context: the micro demo's
  32-token window is shorter than many docstring sentences."""
  lengths = iter(len(t) for t in tokenizer.encode(
      [presets.DELIMITER + c for d in docs for c in d.choices]))
  room = window - 1 - MIN_CONTEXT_TOKENS
  keep = [d for d in docs if max([next(lengths) for _ in d.choices]) <= room]
  return keep[:limit]


def downstream_lines(record: dict, paths: Sequence[str] = runner.PATHS) -> list[str]:
  """One line per scoring path of W/downstream.json's embedded task: accuracy +- its
  standard error against chance."""
  lines = []
  for path in paths:
    r = record['paths'][path]['tasks'][EMBEDDED]
    lines.append(f'  path={path:5s} {r["metric"]} {r["value"]:.3f} +- {r["stderr"]:.3f} '
                 f'(chance {r["chance"]:.3f}, n={r["n"]})')
  return lines


def score_embedded_task(sweep: sweep_spec.Sweep, run: results.PointResult) -> list[str]:
  """Builds the next-sentence task from the held-out split of the embedded corpus and
  scores `run` on it through the training forward and through its exported store
  (downstream/runner.py; after export_and_generate); returns downstream_lines."""
  corpus_dir = os.path.join(prepare.artifacts_dir(run.cfg, run.workdir), 'corpus')
  task_dir = os.path.join(sweep.dir, 'downstream_tasks')
  window = run.cfg.model.max_seq_len
  # Sentences of at most 1.5 characters per window token (the micro demo's 32-token
  # window: 48), so that some fit whole; fitting_docs then checks their tokens.
  every = embedded.embedded_task_from_corpus(
      corpus_dir, num_docs=sys.maxsize, num_choices=NUM_CHOICES,
      max_chars=min(embedded.MAX_CHARS, 3 * window // 2))
  tasks.write_tasks(runner.task_file(task_dir, EMBEDDED), fitting_docs(
      every, run_lib.RunDir(run.workdir).tokenizer(), window))
  record = {}
  for path in runner.PATHS:  # Resumes: a task already scored on the same file is kept.
    record = runner.run(run.workdir, [EMBEDDED], task_dir, path, log=lambda line: None)
  return downstream_lines(record)


def main(argv):
  del argv
  sweep = sweep_spec.load_sweep(_SWEEP.value, _WORKDIR.value,
                                sweep_spec.parse_set(_SET.value))
  print(f'demo: sweep {sweep.name}, {len(sweep.points)} points under {sweep.dir}', flush=True)
  outcomes = sweep_backends.run_local(sweep, sys.executable, _PARALLEL.value)
  failed = [o.name for o in outcomes if o.status == 'failed']
  paths = report.write_report(sweep.dir)
  runs = results.collect(sweep.dir)
  best = best_scone_run(runs)
  if best is not None:
    print(f'\nexport + generate from the best SCONE run {best.name}:', flush=True)
    print(export_and_generate(sweep, best, _PROMPTS.value))
    print(f'downstream: the true next sentence of a held-out docstring among {NUM_CHOICES} '
          f'(the others from other modules), scored by {best.name}:', flush=True)
    try:
      print('\n'.join(score_embedded_task(sweep, best)))
    except tasks.TaskFileError as e:  # E.g. a --set data source without the embedded corpus.
      print(f'  skipped: {e}')
  arms, _ = analysis.arms_of(runs, None)
  for corpus in analysis.test_corpora(runs):
    print(f'\ntest corpus {corpus} ({analysis.coverage(runs, corpus)}):')
    print(tables.markdown_table(analysis.summary_rows(arms, corpus)))
  print()
  for name, path in paths.items():
    print(f'{name}: {path}')
  print('\nVERDICT')
  for line in verdict_lines(runs):
    print('  ' + line)
  if failed:
    sys.exit(f'{len(failed)} point(s) failed: {", ".join(failed)} (logs in their log.txt)')


if __name__ == '__main__':
  cli.run('demo', main, FLAGS)
