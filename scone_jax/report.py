"""Sweep results -> CSV, Markdown table and the paper's plots.

  python -m scone_jax.report --sweep=experiments/sweeps/demo.py --root=runs

Reads every run under ROOT/SWEEP/ that a sweep (scone_jax.sweeps) started (W/point.json: overrides
and resolved config) with its W/metrics.jsonl and W/eval.json, and writes into the sweep
dir: results.csv (one row per run), REPORT.md (runs grouped over seeds: mean, std, min,
max) and PNG plots: held-out perplexity vs number of f-grams, vs A_f size, vs inference
FLOPs per token (baselines as a line), and training curves.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from scone_jax import config as config_lib

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
    """S as trained: 0 for the baseline, else the used slice of the table."""
    if not self.cfg.is_scone:
      return 0
    return self.cfg.fgram.use_size or self.cfg.fgram.size

  @property
  def perplexity(self) -> float:
    """Held-out perplexity averaged over eval corpora (the paper's 'avg perplexity')."""
    values = [c['perplexity'] for c in self.eval.values()]
    return float(np.mean(values)) if values else math.nan

  @property
  def group(self) -> tuple:
    """Runs that differ only in their seed share a group."""
    return tuple(sorted((k, v) for k, v in self.overrides.items() if k != SEED_KEY))


def accounting(cfg: config_lib.Config) -> dict[str, float]:
  """Params and FLOPs per token of a config (scone_jax.model.flops), as table columns.

  accel_params is what sits on the accelerator at inference (equal for SCONE and its
  backbone); offloaded_params is the exported S x d f-gram table; train_flops_af is A_f's
  training cost amortised per token at the static capacity.
  """
  from scone_jax.model import flops  # Deferred: reading results needs no JAX.
  params = flops.param_counts(cfg)
  per_token = flops.flops_per_token(cfg)
  return {
      'accel_params': params.backbone_total,
      'offloaded_params': params.offloaded,
      'af_params': params.fgram_total,
      'train_flops_backbone': per_token.train_backbone,
      'train_flops_af': per_token.train_fgram,
      'infer_flops': per_token.inference,
      # What the paper's tables vary, so a dry run can be checked against them.
      'af_layers': cfg.fgram_model.num_layers,
      'S': (cfg.fgram.use_size or cfg.fgram.size) if cfg.is_scone else 0,
      'K': cfg.fgram.max_len,
      'train_tokens': cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
      'seed': cfg.train.seed,
  }


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _read_curve(path: str) -> list[tuple[int, float]]:
  curve = []
  if not os.path.exists(path):
    return curve
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # A run killed mid-write leaves a partial last line.
      if isinstance(rec, dict) and 'step' in rec and 'loss' in rec:
        curve.append((int(rec['step']), float(rec['loss'])))
  return curve


def collect(sweep_dir: str) -> list[Run]:
  """Every run under sweep_dir that has a point.json, sorted by name."""
  if not os.path.isdir(sweep_dir):
    raise FileNotFoundError(f'{sweep_dir} does not exist: run the sweep first '
                            '(python -m scone_jax.sweeps --sweep=FILE --root=ROOT)')
  runs = []
  for name in sorted(os.listdir(sweep_dir)):
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


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One flat dict per run: varied overrides, accounting, final loss, eval results."""
  keys = varying_keys(runs)
  rows = []
  for r in runs:
    row = {'run': r.name, **{k: r.overrides.get(k, '') for k in keys},
           'num_fgrams': r.num_fgrams, 'af_layers': r.cfg.fgram_model.num_layers,
           **accounting(r.cfg), 'steps': r.curve[-1][0] if r.curve else '',
           'final_train_loss': r.curve[-1][1] if r.curve else ''}
    for corpus, res in sorted(r.eval.items()):
      for metric in ('loss', 'perplexity', 'bits_per_byte'):
        if metric in res:
          row[f'{corpus}/{metric}'] = res[metric]
    row['perplexity'] = r.perplexity if r.finished else ''
    rows.append(row)
  return rows


@dataclasses.dataclass
class Group:
  """Runs that differ only in their seed, with perplexity statistics over seeds."""
  runs: list[Run]

  @property
  def first(self) -> Run:
    return self.runs[0]

  def _ppl(self) -> np.ndarray:
    return np.array([r.perplexity for r in self.runs if r.finished])

  @property
  def n(self) -> int:
    return len(self._ppl())

  def stat(self, fn) -> float:
    ppl = self._ppl()
    return float(fn(ppl)) if len(ppl) else math.nan


def groups(runs: Sequence[Run]) -> list[Group]:
  by_key: dict[tuple, list[Run]] = {}
  for r in runs:
    by_key.setdefault(r.group, []).append(r)
  return [Group(v) for v in by_key.values()]


def group_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
  keys = [k for k in varying_keys(runs) if k != SEED_KEY]
  rows = []
  for g in sorted(groups(runs), key=lambda g: (accounting(g.first.cfg)['accel_params'],
                                               g.first.cfg.is_scone, g.first.num_fgrams,
                                               accounting(g.first.cfg)['af_params'])):
    acc = accounting(g.first.cfg)
    rows.append({**{k: g.first.overrides.get(k, '') for k in keys},
                 'S': g.first.num_fgrams, 'accel_params': acc['accel_params'],
                 'af_params': acc['af_params'],
                 'infer_flops': acc['infer_flops'], 'seeds': f'{g.n}/{len(g.runs)}',
                 'ppl_mean': g.stat(np.mean), 'ppl_std': g.stat(np.std),
                 'ppl_min': g.stat(np.min), 'ppl_max': g.stat(np.max)})
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
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=os.path.dirname(os.path.abspath(path)))
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  buf = io.StringIO()
  cols = list(dict.fromkeys(k for r in rows for k in r))
  writer = csv.DictWriter(buf, fieldnames=cols)
  writer.writeheader()
  writer.writerows(rows)
  _write_atomic(path, buf.getvalue().encode())


def write_report(sweep_dir: str) -> dict[str, str]:
  """Writes results.csv, REPORT.md and the plots; returns {'csv','markdown',plot names}."""
  runs = collect(sweep_dir)
  if not runs:
    raise FileNotFoundError(f'{sweep_dir} holds no runs started by a sweep '
                            '(no */point.json)')
  paths = {'csv': os.path.join(sweep_dir, 'results.csv'),
           'markdown': os.path.join(sweep_dir, 'REPORT.md')}
  write_csv(paths['csv'], run_rows(runs))
  plots = draw_plots(runs, sweep_dir)
  paths.update(plots)
  unfinished = [r.name for r in runs if not r.finished]
  md = [f'# Sweep {os.path.basename(os.path.normpath(sweep_dir))}', '',
        'Held-out perplexity (mean over eval corpora); mean/std/min/max over seeds.', '',
        markdown_table(group_rows(runs)), '',
        f'Per-run results: {os.path.basename(paths["csv"])}', '']
  if unfinished:
    md += [f'Unfinished runs (no eval.json): {", ".join(unfinished)}', '']
  md += [f'![{k}]({os.path.basename(v)})' for k, v in plots.items()]
  _write_atomic(paths['markdown'], ('\n'.join(md) + '\n').encode())
  return paths


def _save_png(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  _write_atomic(path, buf.getvalue())


def _series(gs: Sequence[Group], x_key: str) -> dict[str, list[Group]]:
  """Splits groups into plot series by their overrides other than x_key and the seed."""
  keys = [k for k in varying_keys([g.first for g in gs]) if k not in (x_key, SEED_KEY)]
  out: dict[str, list[Group]] = {}
  for g in gs:
    label = ', '.join(f'{k.split(".")[-1]}={g.first.overrides.get(k, "-")}' for k in keys)
    out.setdefault(label or 'SCONE', []).append(g)
  return out


def _label(g: Group) -> str:
  """A group's overrides (seed excluded), short keys: 'use_size=1024, num_layers=2'."""
  return ', '.join(f'{k.split(".")[-1]}={v}' for k, v in g.first.group) or 'base'


def _log_x(ax, ticks: Sequence[float] = ()) -> None:
  """Log x axis without the overlapping minor labels; major ticks at `ticks` if given."""
  from matplotlib import ticker
  ax.set_xscale('log')
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  if ticks:
    ax.set_xticks(list(ticks), [f'{t:,.0f}' for t in ticks])


def _errorbar(ax, gs: Sequence[Group], xs: Sequence[float], label: str, **kw) -> None:
  """Mean over seeds with a min..max bar."""
  mean = np.array([g.stat(np.mean) for g in gs])
  lo = mean - np.array([g.stat(np.min) for g in gs])
  hi = np.array([g.stat(np.max) for g in gs]) - mean
  ax.errorbar(xs, mean, yerr=[lo, hi], marker='o', capsize=3, label=label, **kw)


def _baseline_lines(ax, baselines: Sequence[Group]) -> None:
  for i, g in enumerate(baselines):
    m = g.stat(np.mean)
    ax.axhline(m, color=f'C{7 + i % 3}', linestyle='--',
               label=f'baseline {g.first.cfg.model.num_layers}L d{g.first.cfg.model.d_model}'
               f' ({m:.4g})')
    if g.n > 1:
      ax.axhspan(g.stat(np.min), g.stat(np.max), color=f'C{7 + i % 3}', alpha=0.15)


def _ppl_plot(path: str, title: str, xlabel: str, scone: Sequence[Group],
              baselines: Sequence[Group], x_of, x_key: str, logx: bool) -> None:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, gs in _series(scone, x_key).items():
    gs = sorted(gs, key=x_of)
    _errorbar(ax, gs, [x_of(g) for g in gs], label)
  _baseline_lines(ax, baselines)
  if logx:
    _log_x(ax, sorted({x_of(g) for gs in _series(scone, x_key).values() for g in gs}))
  ax.set(title=title, xlabel=xlabel, ylabel='held-out perplexity (mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _save_png(fig, path)
  plt.close(fig)


def draw_plots(runs: Sequence[Run], out_dir: str) -> dict[str, str]:
  """Draws the plots the sweep's data supports; returns {plot name: png path}."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  finished = [g for g in groups(runs) if g.n]
  scone = [g for g in finished if g.first.cfg.is_scone]
  baselines = [g for g in finished if not g.first.cfg.is_scone]
  paths = {}

  def af_params(g: Group) -> float:
    return accounting(g.first.cfg)['af_params']

  def infer_flops(g: Group) -> float:
    return accounting(g.first.cfg)['infer_flops']

  if len({g.first.num_fgrams for g in scone}) >= 2 or (scone and baselines):
    paths['ppl_vs_num_fgrams'] = os.path.join(out_dir, 'ppl_vs_num_fgrams.png')
    _ppl_plot(paths['ppl_vs_num_fgrams'], 'Perplexity vs number of f-grams',
              'number of f-grams S', scone, baselines, lambda g: g.first.num_fgrams,
              'fgram.use_size', logx=True)
  if len({af_params(g) for g in scone}) >= 2:
    paths['ppl_vs_af_size'] = os.path.join(out_dir, 'ppl_vs_af_size.png')
    _ppl_plot(paths['ppl_vs_af_size'], 'Perplexity vs A_f size', 'A_f parameters',
              scone, baselines, af_params, 'fgram_model.num_layers', logx=False)
  if finished:
    paths['ppl_vs_inference_flops'] = os.path.join(out_dir, 'ppl_vs_inference_flops.png')
    fig, ax = plt.subplots(figsize=(6, 4))
    if baselines:
      bs = sorted(baselines, key=infer_flops)
      _errorbar(ax, bs, [infer_flops(g) for g in bs], 'baselines', color='k', linestyle='--')
    for i, g in enumerate(scone):
      _errorbar(ax, [g], [infer_flops(g)], 'SCONE ' + _label(g),
                color=f'C{i % 7}', linestyle='none')
    _log_x(ax)
    ax.set(title='Perplexity vs inference FLOPs per token', xlabel='inference FLOPs / token',
           ylabel='held-out perplexity')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    _save_png(fig, paths['ppl_vs_inference_flops'])
    plt.close(fig)
  curves = sorted((g for g in groups(runs) if any(r.curve for r in g.runs)),
                  key=lambda g: (g.first.cfg.is_scone, g.first.num_fgrams, _label(g)))
  if curves:
    paths['training_curves'] = os.path.join(out_dir, 'training_curves.png')
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, g in enumerate(curves):
      steps, losses = _mean_curve([r.curve for r in g.runs if r.curve])
      ax.plot(steps, losses, color=f'C{i % 10}', label=_label(g),
              linestyle='-' if g.first.cfg.is_scone else '--')
    ax.set(title='Training loss (mean over seeds)', xlabel='step', ylabel='train loss')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    _save_png(fig, paths['training_curves'])
    plt.close(fig)
  return paths


def _mean_curve(curves: Sequence[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
  """Mean loss over seeds at the steps every curve logged."""
  common = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
  by_step = [dict(c) for c in curves]
  return common, [float(np.mean([d[s] for d in by_step])) for s in common]


def main(argv):
  """`python -m scone_jax.report`: writes the report and prints the table and paths."""
  del argv
  from absl import flags
  name = os.path.splitext(os.path.basename(flags.FLAGS.sweep))[0]
  paths = write_report(os.path.join(flags.FLAGS.root, name))
  with open(paths['markdown']) as f:
    print(f.read())
  for key, path in paths.items():
    print(f'{key}: {path}')


if __name__ == '__main__':
  # Flags are defined here, not at import: scone_jax.sweeps.cli imports this module and
  # defines its own --sweep/--root.
  from absl import app, flags
  flags.DEFINE_string('sweep', None, 'Sweep file (experiments/sweeps/*.py).', required=True)
  flags.DEFINE_string('root', 'runs', 'The --root the sweep ran under.')
  app.run(main)
