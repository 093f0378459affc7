"""Sweep results -> results.csv, REPORT.md (what a reviewer reads) and plots.

  python -m scone_jax.report --sweep=experiments/sweeps/study.py --root=runs

Reads every run under ROOT/SWEEP/ that a sweep (scone_jax.sweeps) started
(scone_jax/sweeps/results.py), plus the study's study.json when there is one (the lr grid
and each arm's chosen lr), and writes into the sweep dir:
* results.csv: one row per run, its accounting (model/arm_accounting.py, at the run's real
  S), every corpus's loss / perplexity / bits per byte with the tokens evaluated and the
  fraction of the set they are, and each downstream task's headline metric per path;
* REPORT.md: the chosen lrs and the grid (validation loss); per TEST corpus (never
  averaged across corpora; a macro-average only under its own label) each arm's mean,
  sample std and 95% t-interval over seeds of loss, perplexity and bits per byte, the
  paired SCONE-minus-baseline differences with intervals, and verdict lines
  (scone_jax/sweeps/analysis.py) that say "beyond the seed spread" only when the interval
  excludes zero; each arm's parameters, memory and FLOPs (model/arm_accounting.py, the
  numbers the dry run printed); when runs scored downstream tasks (W/downstream.json),
  per path a table of each arm's accuracy per task (mean, 95% interval over seeds, the
  paper's six-task average under its own label) and the paired differences against the
  baseline (downstream/report.py);
* PNGs per test corpus with 95% intervals as error bars (scone_jax/sweeps/plots.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from absl import flags

from scone_jax import cli
from scone_jax import paths as paths_lib
from scone_jax.model import arm_accounting
from scone_jax.sweeps import analysis
from scone_jax.sweeps import corpus_stats
from scone_jax.sweeps import plots
from scone_jax.sweeps import results as results_lib
from scone_jax.sweeps import stats
from scone_jax.sweeps import study
from scone_jax.sweeps import tables

FLAGS = flags.FlagValues()
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py); its name '
                             'names the sweep directory.', required=True, flag_values=FLAGS)
_ROOT = flags.DEFINE_string('root', 'runs', 'The --root the sweep ran under.',
                            flag_values=FLAGS)

CORPUS_COLUMNS = ('loss', 'perplexity', 'bits_per_byte', 'tokens', 'fraction_evaluated')


def run_rows(results: Sequence[results_lib.PointResult],
             arm_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """One flat dict per run: arm, varied overrides, accounting, final loss, per-corpus
  results (with tokens evaluated and the fraction of the set)."""
  keys = results_lib.varying_keys(results)
  rows = []
  for r in results:
    row = {'run': r.name, **({'arm': arm_of.get(r.name, '(lr tuning only)')}
                             if arm_of is not None else {}),
           **{k: r.overrides.get(k, '') for k in keys},
           'num_fgrams': r.num_fgrams, 'af_layers': r.cfg.fgram_model.num_layers,
           **arm_accounting.run_columns(r.accounting()), 'seed': r.cfg.train.seed,
           'steps': r.curve[-1][0] if r.curve else '',
           'final_train_loss': r.curve[-1][1] if r.curve else ''}
    for corpus, res in sorted(r.eval.items()):
      for metric in CORPUS_COLUMNS:
        if metric in res:
          row[f'{corpus}/{metric}'] = res[metric]
    for path, entry in sorted(r.downstream.get('paths', {}).items()):
      for task, res in sorted(entry.get('tasks', {}).items()):
        row[f'downstream_{path}/{task}/{res["metric"]}'] = res['value']
    rows.append(row)
  return rows


def resource_rows(arms: Sequence[analysis.Arm]) -> list[dict[str, Any]]:
  """Per arm: its parameters, memory and FLOPs per token (model/arm_accounting.py), the
  dry run's per-arm columns at the arm's real S."""
  return [{'arm': a.name, **arm_accounting.arm_columns(a.runs[0].accounting())}
          for a in arms]


def write_report(sweep_dir: str) -> dict[str, str]:
  """Writes results.csv, REPORT.md and the plots; returns {'csv','markdown',plot names}."""
  runs = results_lib.collect(sweep_dir)
  if not runs:
    raise FileNotFoundError(f'{sweep_dir} holds no runs started by a sweep '
                            '(no */point.json)')
  record = study.read_study_json(sweep_dir)
  arms, baseline = analysis.arms_of(runs, record)
  arm_of = {r.name: a.name for a in arms for r in a.runs}
  paths = {'csv': os.path.join(sweep_dir, 'results.csv'),
           'markdown': os.path.join(sweep_dir, 'REPORT.md')}
  tables.write_csv(paths['csv'], run_rows(runs, arm_of if record else None))
  plot_paths, captions = plots.draw_plots(runs, arms, baseline, sweep_dir)
  paths.update(plot_paths)
  tests, valids = analysis.test_corpora(runs), analysis.validation_corpora(runs)
  md = [f'# Sweep {os.path.basename(os.path.normpath(sweep_dir))}', '',
        f'Statistics: {stats.METHOD}. "std" is the sample standard deviation over seeds.', '',
        'Test corpora (the results): ' + (', '.join(
            f'`{c}` ({analysis.coverage(runs, c)})' for c in tests) or 'none yet') + '.',
        'Validation corpora (used only to choose learning rates and the best SCONE arm, '
        'never reported as results): ' + (', '.join(
            f'`{c}` ({analysis.coverage(runs, c)})' for c in valids) or 'none') + '.', '']
  if record:
    md += _selection_section(record, [a.name for a in arms])
  for corpus in tests:
    md += [f'## Test corpus `{corpus}` ({analysis.coverage(runs, corpus)})', '',
           tables.markdown_table(analysis.summary_rows(arms, corpus)), '']
    if len(arms) >= 3:
      md += [f'Ranking on `{corpus}` by mean test loss (paired per-seed loss differences '
             'against the first arm and the baseline, 95% t-intervals):', '',
             tables.markdown_table(analysis.ranking_rows(arms, baseline, corpus)), '']
    rows = analysis.paired_rows(arms, baseline, corpus)
    if rows:
      md += [f'Paired difference, SCONE arm minus baseline `{baseline.name}` (per seed, '
             'then mean and 95% t-interval; negative = SCONE better):', '',
             tables.markdown_table(rows), '']
  if len(tests) > 1:
    md += [f'## Macro-average over the {len(tests)} test corpora (LABELLED: the unweighted '
           'mean of per-corpus (geometric) mean perplexities; not a corpus, no interval)', '',
           tables.markdown_table([{'arm': a.name, 'macro-avg perplexity': float(np.mean(
               [a.ppl_summary(c).mean for c in tests]))} for a in arms]), '']
  downstream = analysis.downstream_tables(arms, baseline)
  if downstream:
    md += ['## Downstream accuracy', '', 'Zero-shot multiple-choice tasks scored by '
           'python -m scone_jax.downstream (W/downstream.json; docs/DOWNSTREAM.md): each '
           "task's headline metric in percent.", '', downstream, '']
  md += ['## Parameters, memory and FLOPs per arm', '',
         'Accelerator params/memory in training (params + grads + AdamW, no activations) '
         'and at inference (+ KV cache per sequence), the offloaded host store, FLOPs per '
         'token (scone_jax/model/arm_accounting.py; what the dry run printed, at the real S):',
         '', tables.markdown_table(resource_rows(arms)), '']
  exposure = analysis.exposure_rows(arms)
  if exposure:
    md += ['## How often training met each arm\'s least frequent f-gram', '',
           tables.markdown_table(exposure), '']
  fgram_stats = corpus_stats.rows(arms, tests)
  if fgram_stats:
    md += ['## What each corpus offers SCONE (f-gram statistics of the prepared splits)', '',
           'Per SCONE arm\'s S: the share of positions where an f-gram ends (their input '
           'embedding is SCONE\'s), the mean length of the longest match there, train tokens '
           'per occurrence of one of the S f-grams, the S-th f-gram\'s train count, and the '
           'share of positions whose longest match spans a word boundary '
           '(scone_jax/fgrams/stats.py defines each).', '',
           tables.markdown_table(fgram_stats), '']
  md += ['## Verdicts', ''] + [f'* {line}' for line in analysis.verdicts(arms, baseline, runs)]
  md += ['', f'Per-run results (every corpus, tokens and fraction evaluated): '
         f'{os.path.basename(paths["csv"])}', '']
  unfinished = [r.name for r in runs if not r.finished]
  if unfinished:
    md += [f'Unfinished runs (no final eval.json): {", ".join(unfinished)}', '']
  md += [f'![{captions[k]}]({os.path.basename(v)})' for k, v in plot_paths.items()]
  paths_lib.write_bytes(paths['markdown'], ('\n'.join(md) + '\n').encode())
  return paths


def _selection_section(record: dict[str, Any], order: Sequence[str]) -> list[str]:
  sel = record['selection']
  lrs = record['learning_rates']
  rows = []
  rank = {name: i for i, name in enumerate(order)}
  for arm, cells in sorted(sel['grid'].items(), key=lambda kv: (rank.get(kv[0], 1 << 30),
                                                                 kv[0])):
    row: dict[str, Any] = {'arm': arm}
    chosen = sel['chosen'].get(arm)  # None: the study has not reached this arm yet.
    for cell in cells:
      mark = ' *' if cell['lr'] == chosen else ''
      spread = cell.get('valid_std', math.nan)  # Absent in a study.json before 2026-12-07.
      spread = f' ± {spread:.4f}' if math.isfinite(spread) else ''
      row[f'lr={cell["lr"]:g}'] = (f'{cell["valid_loss"]:.4f}{spread}{mark}'
                                   if math.isfinite(cell['valid_loss']) else 'no result')
    row['chosen lr'] = ('not chosen yet' if chosen is None else f'{chosen:g}' + (
        ' (grid edge)' if sel['at_edge'][arm] else ''))
    rows.append(row)
  return [f'## Learning rates: each arm tuned over {[f"{x:g}" for x in lrs]} with seed(s) '
          f'{record["tune_seeds"]}, chosen by {sel["metric"]} on '
          f'{", ".join(f"`{c}`" for c in sel["validation_corpora"])}', '',
          'Cells: validation loss (mean over the tuning seeds ± their standard deviation '
          'when there are several); * = chosen. Compared at the chosen lr over seeds '
          f'{record["seeds"]} (same seed = same data order across arms).'
          + (' An lr at the grid edge means the grid should be widened.'
             if any(sel['at_edge'].values()) else ''), '',
          tables.markdown_table(rows), '']


def main(argv):
  """`python -m scone_jax.report`: writes the report and prints the table and paths."""
  del argv
  name = os.path.splitext(os.path.basename(_SWEEP.value))[0]
  paths = write_report(os.path.join(_ROOT.value, name))
  print(paths_lib.read_text(paths['markdown']))
  for key, path in paths.items():
    print(f'{key}: {path}')


if __name__ == '__main__':
  cli.run('report', main, FLAGS)
