"""The report's PNGs: one set per TEST corpus (never averaged across corpora), each point
a mean over seeds with its 95% t-interval as the error bar (no bar with < 2 seeds)."""

from __future__ import annotations

import io
import os
import re
from typing import Any, Sequence

import numpy as np

from scone_jax import paths
from scone_jax.sweeps import analysis
from scone_jax.sweeps import stats

_BARS = 'bars: 95% t-interval over seeds'


def _save_png(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  paths.write_bytes(path, buf.getvalue())  # temp + rename locally; one PUT in a bucket.


def _slug(corpus: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]', '_', corpus)


def _yerr(summaries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  mean = np.array([s.mean for s in summaries])
  lo = np.array([s.mean - s.lo if s.n >= 2 else 0.0 for s in summaries])
  hi = np.array([s.hi - s.mean if s.n >= 2 else 0.0 for s in summaries])
  return mean, lo, hi


def _baseline_band(ax, baseline: analysis.Arm | None, corpus: str) -> None:
  if baseline is None or not baseline.finished:
    return
  s = baseline.ppl_summary(corpus)
  ax.axhline(s.mean, color='k', linestyle='--', label=f'baseline {baseline.name} ({s.mean:.4g})')
  if s.n >= 2:
    ax.axhspan(s.lo, s.hi, color='k', alpha=0.12)


def _log_x(ax, ticks: Sequence[float]) -> None:
  from matplotlib import ticker
  ax.set_xscale('log')
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  if ticks:
    ax.set_xticks(list(ticks), [f'{t:,.0f}' for t in ticks])


def _trend_plot(path: str, caption: str, xlabel: str, groups: list[list[analysis.Arm]],
                x_of, baseline, corpus: str, logx: bool) -> None:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  xs_all = set()
  for i, members in enumerate(groups):
    xs = [x_of(a) for a in members]
    xs_all |= set(xs)
    mean, lo, hi = _yerr([a.ppl_summary(corpus) for a in members])
    label = ', '.join(sorted({a.name for a in members})) if len(members) == 1 else (
        _series_label(members))
    ax.errorbar(xs, mean, yerr=[lo, hi], marker='o', capsize=3, color=f'C{i % 10}',
                label=label)
  _baseline_band(ax, baseline, corpus)
  if logx:
    _log_x(ax, sorted(xs_all))
  ax.set(title=caption, xlabel=xlabel, ylabel=f'test perplexity on {corpus}')
  ax.title.set_fontsize(8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _save_png(fig, path)
  plt.close(fig)


def _series_label(members: Sequence[analysis.Arm]) -> str:
  a = members[0]
  return f'SCONE, A_f {a.af_layers}L' if len({m.af_layers for m in members}) == 1 else (
      f'SCONE, S={a.num_fgrams}')


def draw_plots(runs: Sequence[Any], arms: Sequence[analysis.Arm],
               baseline: analysis.Arm | None, out_dir: str
               ) -> tuple[dict[str, str], dict[str, str]]:
  """Draws what the data supports; returns ({name: png path}, {name: caption})."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  pngs, captions = {}, {}

  def add(name: str, caption: str) -> str:
    pngs[name] = os.path.join(out_dir, f'{name}.png')
    captions[name] = caption
    return pngs[name]

  scone = [a for a in arms if a.has_fgram_side and a.finished]
  for corpus in analysis.test_corpora(runs):
    cov = analysis.coverage(runs, corpus)
    tag = f'{corpus} ({cov})'
    s_series = analysis.series(arms, 'S')
    # Arms without a mined table (hashed: S = 0) have no place on a log S axis.
    lone = [[a] for a in scone if a.num_fgrams and not any(a in m for m in s_series)]
    if s_series or (scone and baseline is not None):
      name = f'ppl_vs_num_fgrams-{_slug(corpus)}'
      _trend_plot(add(name, f'{tag}: perplexity vs number of f-grams S; {_BARS}'),
                  captions[name], 'number of f-grams S', s_series + lone,
                  lambda a: a.num_fgrams, baseline, corpus, logx=True)
    d_series = analysis.series(arms, 'A_f depth')
    if d_series:
      name = f'ppl_vs_af_depth-{_slug(corpus)}'
      _trend_plot(add(name, f'{tag}: perplexity vs A_f depth; {_BARS}'), captions[name],
                  'A_f layers', d_series, lambda a: a.af_layers, baseline, corpus,
                  logx=False)
    others = [a for a in scone if a is not baseline]
    if baseline is not None and others:
      name = f'paired_diff-{_slug(corpus)}'
      diffs = [stats.paired(a.values(corpus, 'perplexity'),
                            baseline.values(corpus, 'perplexity'))[0] for a in others]
      fig, ax = plt.subplots(figsize=(6.5, 0.7 + 0.4 * len(others)))
      mean, lo, hi = _yerr(diffs)
      ax.errorbar(mean, np.arange(len(others)), xerr=[lo, hi], fmt='o', capsize=3)
      ax.axvline(0.0, color='k', linewidth=1)
      ax.set_yticks(np.arange(len(others)), [a.name for a in others], fontsize=7)
      add(name, f'{tag}: arm minus {baseline.name} perplexity, paired per seed; {_BARS}')
      ax.set(title=captions[name],
             xlabel=f'perplexity difference (negative = better than {baseline.name})')
      ax.title.set_fontsize(8)
      ax.grid(alpha=0.3)
      _save_png(fig, pngs[name])
      plt.close(fig)
    finished = [a for a in arms if a.finished]
    if finished:
      name = f'ppl_vs_inference_flops-{_slug(corpus)}'
      fig, ax = plt.subplots(figsize=(6.5, 4.2))
      for i, a in enumerate(finished):
        mean, lo, hi = _yerr([a.ppl_summary(corpus)])
        ax.errorbar([inference_flops(a)], mean, yerr=[lo, hi],
                    marker='o' if a.has_fgram_side else 's', capsize=3, linestyle='none',
                    color=f'C{i % 10}', label=a.name)
      _log_x(ax, ())
      add(name, f'{tag}: perplexity vs inference FLOPs per token; {_BARS}')
      ax.set(title=captions[name], xlabel='inference FLOPs / token',
             ylabel=f'test perplexity on {corpus}')
      ax.title.set_fontsize(8)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6)
      _save_png(fig, pngs[name])
      plt.close(fig)
  curves = [a for a in arms if any(r.curve for r in a.runs)]
  if curves:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, a in enumerate(curves):
      steps, losses = mean_curve([r.curve for r in a.runs if r.curve])
      ax.plot(steps, losses, color=f'C{i % 10}', label=a.name,
              linestyle='-' if a.has_fgram_side else '--')
    add('training_curves', 'Training loss (mean over seeds; the training batches, not a '
        'held-out set)')
    ax.set(title=captions['training_curves'], xlabel='step', ylabel='train loss')
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    _save_png(fig, pngs['training_curves'])
    plt.close(fig)
  return pngs, captions


def inference_flops(arm: analysis.Arm) -> float:
  """The x of the perplexity-vs-inference-FLOPs plot: the arm's decode FLOPs per token,
  elementwise extras included (model/arm_accounting.py, as the dry run printed it)."""
  return arm.runs[0].accounting().infer_flops_per_token


def mean_curve(curves: Sequence[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
  """Mean loss over seeds at the steps every curve logged."""
  common = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
  by_step = [dict(c) for c in curves]
  return common, [float(np.mean([d[s] for d in by_step])) for s in common]
