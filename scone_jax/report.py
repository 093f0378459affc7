"""Sweep results -> results.csv, REPORT.md (what a reviewer reads) and plots.

  python -m scone_jax.report --sweep=experiments/sweeps/study.py --root=runs

Reads every run under ROOT/SWEEP/ that a sweep (scone_jax.sweeps) started (W/point.json:
overrides and resolved config) with its W/metrics.jsonl and W/eval.json, plus the study's
study.json when there is one (the lr grid and each arm's chosen lr), and writes into the
sweep dir:
* results.csv: one row per run, every corpus's loss / perplexity / bits per byte with the
  tokens evaluated and the fraction of the set they are;
* REPORT.md: the chosen lrs and the grid (validation loss); per TEST corpus (never
  averaged across corpora; a macro-average only under its own label) each arm's mean,
  sample std and 95% t-interval over seeds of loss, perplexity and bits per byte, the
  paired SCONE-minus-baseline differences with intervals, and verdict lines
  (scone_jax/sweeps/analysis.py) that say "beyond the seed spread" only when the interval
  excludes zero;
* PNGs per test corpus with 95% intervals as error bars (scone_jax/sweeps/plots.py).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import flags

from scone_jax import cli
from scone_jax import config as config_lib
from scone_jax import paths as paths_lib

FLAGS = flags.FlagValues()
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py); its name '
                             'names the sweep directory.', required=True, flag_values=FLAGS)
_ROOT = flags.DEFINE_string('root', 'runs', 'The --root the sweep ran under.',
                            flag_values=FLAGS)

SEED_KEY = 'train.seed'


@dataclasses.dataclass
class Run:
  """One sweep point's results (eval and metrics are empty when it has not finished)."""
  name: str
  workdir: str
  overrides: dict[str, Any]
  cfg: config_lib.Config
  eval: dict[str, dict[str, float]]  # final eval.json 'corpora': name -> {perplexity, ...}
  curve: list[tuple[int, float]]  # (step, train loss)

  @property
  def finished(self) -> bool:
    return bool(self.eval)

  @property
  def num_fgrams(self) -> int:
    """S as trained: 0 for the baseline and for arms that use no f-gram table (hashed),
    else the used slice of the table."""
    if not self.cfg.is_scone or not self.cfg.fgram_model.uses_fgram_table:
      return 0
    return self.cfg.fgram.use_size or self.cfg.fgram.size



def accounting(cfg: config_lib.Config,
               af_tokens_per_token: float | None = None) -> dict[str, float]:
  """Params and FLOPs per token of a config (scone_jax.model.flops), as table columns.

  accel_params is what sits on the accelerator at inference (equal for SCONE and its
  backbone); offloaded_params is the exported S x d f-gram table. A_f's training cost is
  given per main-model token and per sequence (train.seq_len tokens) at the WORST case
  (af_tok_per_tok_worst = K: every position a distinct K-gram) and, when
  `af_tokens_per_token` (a measured "A_f tokens per main-model token", the logged
  batch/fgram_af_tokens_per_token) is given, at that figure (*_measured columns).
  """
  from scone_jax.model import arm_accounting, flops  # Deferred: reading results needs no JAX.
  params = flops.param_counts(cfg)
  per_token = flops.flops_per_token(cfg)
  seq = cfg.train.seq_len
  row = {
      'accel_params': params.backbone_total,
      # S d for A_f and a trained table, (n - 1) m d for hashed tables.
      'offloaded_params': arm_accounting.host_rows(cfg) * cfg.model.d_model,
      'af_params': params.fgram_total,
      'train_flops_backbone': per_token.train_backbone,
      'train_flops_af': per_token.train_fgram,
      'af_tok_per_tok_worst': per_token.af_tokens_per_token,
      'train_flops_seq_worst': per_token.train_total * seq,
      'infer_flops': per_token.inference,
      # What the paper's tables vary, so a dry run can be checked against them.
      'af_layers': cfg.fgram_model.num_layers,
      'S': (cfg.fgram.use_size or cfg.fgram.size) if cfg.is_scone else 0,
      'K': cfg.fgram.max_len,
      'train_tokens': cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
      'seed': cfg.train.seed,
  }
  if af_tokens_per_token is not None:
    measured = flops.flops_per_token(cfg, af_tokens_per_token=af_tokens_per_token)
    row.update(af_tok_per_tok_measured=measured.af_tokens_per_token,
               train_flops_af_measured=measured.train_fgram,
               train_flops_seq_measured=measured.train_total * seq)
  return row


def _read_json(path: str) -> Any:
  try:
    return json.loads(paths_lib.read_text(path))
  except (OSError, json.JSONDecodeError):
    return None


def _read_curve(path: str) -> list[tuple[int, float]]:
  curve = []
  if not paths_lib.exists(path):
    return curve
  for line in paths_lib.read_text(path).splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # A run killed mid-write leaves a partial last line.
    if isinstance(rec, dict) and 'step' in rec and 'loss' in rec:
      curve.append((int(rec['step']), float(rec['loss'])))
  return curve


def collect(sweep_dir: str) -> list[Run]:
  """Every run under sweep_dir that has a point.json, sorted by name."""
  if not paths_lib.isdir(sweep_dir):
    raise FileNotFoundError(f'{sweep_dir} does not exist: run the sweep first '
                            '(python -m scone_jax.sweeps --sweep=FILE --root=ROOT)')
  runs = []
  for name in sorted(p.name for p in paths_lib.path(sweep_dir).iterdir()):
    workdir = os.path.join(sweep_dir, name)
    point = _read_json(os.path.join(workdir, 'point.json'))
    if not isinstance(point, dict) or 'config' not in point:
      continue
    cfg = config_lib.from_configdict(point['config'])
    result = _read_json(os.path.join(workdir, 'eval.json'))
    final = isinstance(result, dict) and result.get('step', -1) >= cfg.train.steps
    runs.append(Run(name, workdir, point['overrides'], cfg,
                    result.get('corpora', {}) if final else {},
                    _read_curve(os.path.join(workdir, 'metrics.jsonl'))))
  return runs


def varying_keys(runs: Sequence[Run]) -> list[str]:
  """Override keys whose value differs across runs (a missing key counts as a value)."""
  keys = sorted({k for r in runs for k in r.overrides})
  return [k for k in keys if len({repr(r.overrides.get(k)) for r in runs}) > 1]


CORPUS_COLUMNS = ('loss', 'perplexity', 'bits_per_byte', 'tokens', 'fraction_evaluated')


def run_rows(runs: Sequence[Run], arm_of: dict[str, str] | None = None
             ) -> list[dict[str, Any]]:
  """One flat dict per run: arm, varied overrides, accounting, final loss, per-corpus
  results (with tokens evaluated and the fraction of the set)."""
  keys = varying_keys(runs)
  rows = []
  for r in runs:
    row = {'run': r.name, **({'arm': arm_of.get(r.name, '(lr tuning only)')}
                             if arm_of is not None else {}),
           **{k: r.overrides.get(k, '') for k in keys},
           'num_fgrams': r.num_fgrams, 'af_layers': r.cfg.fgram_model.num_layers,
           **accounting(r.cfg), 'steps': r.curve[-1][0] if r.curve else '',
           'final_train_loss': r.curve[-1][1] if r.curve else ''}
    for corpus, res in sorted(r.eval.items()):
      for metric in CORPUS_COLUMNS:
        if metric in res:
          row[f'{corpus}/{metric}'] = res[metric]
    rows.append(row)
  return rows


def _fmt(v: Any) -> str:
  """Table cell: big numbers with an SI suffix (419.2M, 2.73G), floats to 4 digits."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return str(v)
  if isinstance(v, float) and math.isnan(v):
    return '-'
  for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
    if abs(v) >= 10 * scale or (abs(v) >= scale and suffix != 'K'):
      return f'{v / scale:.4g}{suffix}'
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """A GitHub Markdown table over the union of the rows' keys (first-seen order)."""
  if not rows:
    return '(no rows)'
  cols = list(dict.fromkeys(k for r in rows for k in r))
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(_fmt(r.get(c, '')) for c in cols) + ' |' for r in rows]
  return '\n'.join(lines)


def _write_atomic(path: str, data: bytes) -> None:
  paths_lib.write_bytes(path, data)  # temp + rename locally; one PUT in a bucket.


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  buf = io.StringIO()
  cols = list(dict.fromkeys(k for r in rows for k in r))
  writer = csv.DictWriter(buf, fieldnames=cols)
  writer.writeheader()
  writer.writerows(rows)
  _write_atomic(path, buf.getvalue().encode())


def write_report(sweep_dir: str) -> dict[str, str]:
  """Writes results.csv, REPORT.md and the plots; returns {'csv','markdown',plot names}."""
  from scone_jax.sweeps import analysis, plots, stats, study  # Deferred (import cycle).
  runs = collect(sweep_dir)
  if not runs:
    raise FileNotFoundError(f'{sweep_dir} holds no runs started by a sweep '
                            '(no */point.json)')
  record = study.read_study_json(sweep_dir)
  arms, baseline = analysis.arms_of(runs, record)
  arm_of = {r.name: a.name for a in arms for r in a.runs}
  paths = {'csv': os.path.join(sweep_dir, 'results.csv'),
           'markdown': os.path.join(sweep_dir, 'REPORT.md')}
  write_csv(paths['csv'], run_rows(runs, arm_of if record else None))
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
           markdown_table(analysis.summary_rows(arms, corpus)), '']
    if len(arms) >= 3:
      md += [f'Ranking on `{corpus}` by mean test loss (paired per-seed loss differences '
             'against the first arm and the baseline, 95% t-intervals):', '',
             markdown_table(analysis.ranking_rows(arms, baseline, corpus)), '']
    rows = analysis.paired_rows(arms, baseline, corpus)
    if rows:
      md += [f'Paired difference, SCONE arm minus baseline `{baseline.name}` (per seed, '
             'then mean and 95% t-interval; negative = SCONE better):', '',
             markdown_table(rows), '']
  if len(tests) > 1:
    md += [f'## Macro-average over the {len(tests)} test corpora (LABELLED: the unweighted '
           'mean of per-corpus (geometric) mean perplexities; not a corpus, no interval)', '',
           markdown_table([{'arm': a.name, 'macro-avg perplexity': float(np.mean(
               [a.ppl_summary(c).mean for c in tests]))} for a in arms]), '']
  exposure = analysis.exposure_rows(arms)
  if exposure:
    md += ['## How often training met each arm\'s least frequent f-gram', '',
           markdown_table(exposure), '']
  md += ['## Verdicts', ''] + [f'* {line}' for line in analysis.verdicts(arms, baseline, runs)]
  md += ['', f'Per-run results (every corpus, tokens and fraction evaluated): '
         f'{os.path.basename(paths["csv"])}', '']
  unfinished = [r.name for r in runs if not r.finished]
  if unfinished:
    md += [f'Unfinished runs (no final eval.json): {", ".join(unfinished)}', '']
  md += [f'![{captions[k]}]({os.path.basename(v)})' for k, v in plot_paths.items()]
  _write_atomic(paths['markdown'], ('\n'.join(md) + '\n').encode())
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
      row[f'lr={cell["lr"]:g}'] = (f'{cell["valid_loss"]:.4f}{mark}'
                                   if math.isfinite(cell['valid_loss']) else 'no result')
    row['chosen lr'] = ('not chosen yet' if chosen is None else f'{chosen:g}' + (
        ' (grid edge)' if sel['at_edge'][arm] else ''))
    rows.append(row)
  return [f'## Learning rates: each arm tuned over {[f"{x:g}" for x in lrs]} with seed(s) '
          f'{record["tune_seeds"]}, chosen by {sel["metric"]} on '
          f'{", ".join(f"`{c}`" for c in sel["validation_corpora"])}', '',
          'Cells: validation loss; * = chosen. Compared at the chosen lr over seeds '
          f'{record["seeds"]} (same seed = same data order across arms).'
          + (' An lr at the grid edge means the grid should be widened.'
             if any(sel['at_edge'].values()) else ''), '',
          markdown_table(rows), '']


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
