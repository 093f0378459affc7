"""What a sweep's results say: arms, per-corpus statistics over seeds, paired differences,
and verdict lines that claim an effect only when its interval excludes zero.

Reads `results.PointResult`s (scone_jax/sweeps/results.py) and, for a study, its study.json (which
names each arm's comparison runs at the chosen lr). Without a study, runs that differ only
in their seed form an arm. Test corpora and validation corpora ('valid.*') are kept apart:
results and verdicts are per TEST corpus; validation corpora only choose (the lr, and
which SCONE arm is "best"). Nothing here averages across corpora.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from scone_jax import config as config_lib
from scone_jax.downstream import report as downstream_report
from scone_jax.sweeps import stats
from scone_jax.sweeps import study

METRICS = ('loss', 'perplexity', 'bits_per_byte')
SEED_KEY = study.SEED_KEY
SERIES_AXES = {'S': 'fgram.use_size', 'A_f depth': 'fgram_model.num_layers'}


@dataclasses.dataclass
class Arm:
  """One compared configuration: its comparison runs (one per seed)."""
  name: str
  runs: list[Any]  # results.PointResult
  overrides: dict[str, Any]  # What defines the arm (seed excluded).
  lr: float | None = None  # The chosen lr (studies).

  @property
  def cfg(self) -> config_lib.Config:
    return self.runs[0].cfg

  @property
  def has_fgram_side(self) -> bool:
    return self.cfg.has_fgram_side

  @property
  def num_fgrams(self) -> int:
    return self.runs[0].num_fgrams

  @property
  def af_layers(self) -> int:
    return self.cfg.fgram_model.num_layers

  @property
  def side(self) -> str:
    """What computes the arm's input embeddings beyond T: 'none' (baseline), 'A_f',
    'table' or 'hashed', with the combine rule when it is not the paper's 'replace'."""
    fm = self.cfg.fgram_model
    if not self.has_fgram_side:
      return 'none'
    if fm.kind == 'hashed':
      return f'hashed n<={fm.hash_max_n}, m={fm.hash_buckets}'
    name = 'A_f' if fm.kind == 'network' else fm.kind
    return name if fm.combine == 'replace' else f'{name}, {fm.combine}'

  @property
  def finished(self) -> list[Any]:
    return [r for r in self.runs if r.finished]

  def values(self, corpus: str, metric: str) -> dict[int, float]:
    """seed -> the metric on `corpus` (finished runs that evaluated it)."""
    return {r.cfg.train.seed: float(r.eval[corpus][metric]) for r in self.finished
            if corpus in r.eval and metric in r.eval[corpus]}

  def summary(self, corpus: str, metric: str) -> stats.Summary:
    return stats.summarize(list(self.values(corpus, metric).values()))

  def ppl_summary(self, corpus: str) -> stats.Summary:
    """Perplexity over seeds as exp of the loss's summary (geometric mean and interval;
    std/min/max are of the per-seed perplexities)."""
    loss, ppl = self.summary(corpus, 'loss'), self.summary(corpus, 'perplexity')
    return stats.Summary(loss.n, math.exp(loss.mean), ppl.std, math.exp(loss.lo),
                         math.exp(loss.hi), ppl.min, ppl.max)

  def validation_loss(self) -> float:
    """Mean over seeds of the mean loss over validation corpora (nan if none)."""
    losses = [study.validation_loss(r.eval) for r in self.finished]
    losses = [x for x in losses if math.isfinite(x)]
    return sum(losses) / len(losses) if losses else math.nan


def arms_of(runs: Sequence[Any], study_record: dict[str, Any] | None
            ) -> tuple[list[Arm], Arm | None]:
  """(arms, baseline arm or None). A study names its arms; otherwise seeds are grouped."""
  if study_record:
    by_name = {r.name: r for r in runs}
    arms = []
    for name, seeds in study_record['compare_runs'].items():
      members = [by_name[n] for n in seeds.values() if n in by_name]
      if members:
        arms.append(Arm(name, members, dict(study_record['arms'][name]),
                        study_record['selection']['chosen'][name]))
    arms.sort(key=_arm_order)
    base = next((a for a in arms if a.name == study_record['baseline']), None)
    return arms, base
  groups: dict[tuple, list[Any]] = {}
  for r in runs:
    groups.setdefault(tuple(sorted((k, repr(v)) for k, v in r.overrides.items()
                                   if k != SEED_KEY)), []).append(r)
  # Names show only the keys that vary between arms: a key every run shares (e.g. a
  # --set data path or step count) says nothing about which arm is which.
  varying = {k for key in groups for k, v in key
             if any((k, v) not in other for other in groups)}
  arms = []
  for members in groups.values():
    own = {k: v for k, v in members[0].overrides.items() if k != SEED_KEY}
    name = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in sorted(own.items())
                     if k in varying) or 'base'
    arms.append(Arm(name, members, own))
  arms.sort(key=_arm_order)
  baselines = [a for a in arms if not a.has_fgram_side]
  return arms, baselines[0] if len(baselines) == 1 else None


def _arm_order(a: Arm) -> tuple:
  return (a.has_fgram_side, a.num_fgrams, a.af_layers, a.name)


def test_corpora(runs: Sequence[Any]) -> list[str]:
  return sorted({c for r in runs for c in r.eval if not config_lib.is_validation_corpus(c)})


def validation_corpora(runs: Sequence[Any]) -> list[str]:
  return sorted({c for r in runs for c in r.eval if config_lib.is_validation_corpus(c)})


def coverage(runs: Sequence[Any], corpus: str) -> str:
  """'41,230 tokens = 100.0% of the set' (a range if runs differ)."""
  got = [(r.eval[corpus].get('tokens', math.nan), r.eval[corpus].get('fraction_evaluated',
                                                                     math.nan))
         for r in runs if r.finished and corpus in r.eval]
  if not got:
    return 'not evaluated'
  toks, fracs = [g[0] for g in got], [g[1] for g in got]

  def span(xs, fmt):
    lo, hi = min(xs), max(xs)
    return fmt(lo) if lo == hi else f'{fmt(lo)}..{fmt(hi)}'
  return (f'{span(toks, lambda x: f"{x:,.0f}")} tokens = '
          f'{span(fracs, lambda x: f"{x:.1%}")} of the set')


def series(arms: Sequence[Arm], axis: str) -> list[list[Arm]]:
  """SCONE arms that differ only along `axis` ('S' or 'A_f depth'), sorted along it.

  The axis value is the resolved one (S as trained, A_f layers), so an arm that leaves a
  key at the preset's value lines up with one that sets it.
  """
  key = SERIES_AXES[axis]
  value = (lambda a: a.num_fgrams) if axis == 'S' else (lambda a: a.af_layers)
  out: dict[tuple, list[Arm]] = {}
  for a in arms:
    if a.has_fgram_side and a.finished:
      rest = tuple(sorted((k, repr(v)) for k, v in a.overrides.items()
                          if k not in (key, 'train.learning_rate')))
      out.setdefault(rest, []).append(a)
  found = []
  for members in out.values():
    if len({value(a) for a in members}) >= 2:
      found.append(sorted(members, key=value))
  return found


def fmt_interval(s: stats.Summary, digits: int = 3, signed: bool = True) -> str:
  """'mean [lo, hi]'; signed=True (differences) prints the signs."""
  if s.n == 0:
    return '-'
  if s.n < 2:
    return f'{s.mean:.{digits}f} (1 seed, no interval)'
  f = '+' if signed else ''
  return f'{s.mean:{f}.{digits}f} [{s.lo:{f}.{digits}f}, {s.hi:{f}.{digits}f}]'


def _spread_phrase(d: stats.Summary, better: str, worse: str) -> str:
  if d.n < 2:
    return 'not tested against the seed spread (fewer than 2 paired seeds)'
  if d.excludes_zero:
    return f'{better if d.mean < 0 else worse} beyond the seed spread (interval excludes 0)'
  return 'within the seed spread (the interval includes 0)'


def best_scone(arms: Sequence[Arm], corpus: str,
               exclude: Arm | None = None) -> tuple[Arm | None, str]:
  """The SCONE arm (other than `exclude`) with the lowest validation loss (else the
  lowest loss on the test corpus, said so)."""
  scone = [a for a in arms if a.has_fgram_side and a.finished and a is not exclude]
  if not scone:
    return None, ''
  by_valid = [(a.validation_loss(), a.name, a) for a in scone]
  if all(math.isfinite(v) for v, _, _ in by_valid):
    return min(by_valid)[2], 'chosen on the validation corpora'
  return (min(scone, key=lambda a: (a.summary(corpus, 'loss').mean, a.name)),
          'chosen on this test corpus (no validation corpora: an optimistic pick)')


def verdicts(arms: Sequence[Arm], baseline: Arm | None, runs: Sequence[Any]) -> list[str]:
  """Plain-English lines per test corpus: SCONE vs baseline, ppl vs S, A_f depth."""
  lines = []
  for corpus in test_corpora(runs):
    cov = coverage(runs, corpus)
    best, how = best_scone(arms, corpus, exclude=baseline)
    if best is None or baseline is None or not baseline.finished:
      lines.append(f'[{corpus}, {cov}] SCONE vs baseline: not enough finished runs (need a '
                   'baseline arm and a SCONE arm with eval results).')
    else:
      d, seeds = stats.paired(best.values(corpus, 'loss'), baseline.values(corpus, 'loss'))
      dp, _ = stats.paired(best.values(corpus, 'perplexity'),
                           baseline.values(corpus, 'perplexity'))
      b, s = baseline.ppl_summary(corpus), best.ppl_summary(corpus)
      ref = ('tuned baseline' if not baseline.has_fgram_side else
             f'reference arm {baseline.name}')
      lines.append(
          f'[{corpus}, {cov}] SCONE vs {ref}: best SCONE arm {best.name} ({how}) '
          f'perplexity {s.mean:.3f} vs {b.mean:.3f}; paired difference over '
          f'{len(seeds)} seed(s): perplexity {fmt_interval(dp)}, loss {fmt_interval(d, 4)} '
          f'nats: SCONE is {_spread_phrase(d, "better", "worse")}.')
    ranked = ranking_rows(arms, baseline, corpus)
    if len(ranked) >= 3:
      tied = [r['arm'] for r in ranked[1:] if r['tied with #1'] == 'yes']
      lines.append(f'[{corpus}, {cov}] ranking by mean loss: ' + ' < '.join(
          r['arm'] for r in ranked) + f'; #1 {ranked[0]["arm"]} is ' + (
              f'within the seed spread of {", ".join(tied)}' if tied else
              'separated from every other arm beyond the seed spread (each paired interval '
              'excludes 0)') + '.')
    for axis in ('S', 'A_f depth'):
      for members in series(arms, axis):
        lines.append(_trend_line(corpus, cov, axis, members))
  return lines


def _trend_line(corpus: str, cov: str, axis: str, members: Sequence[Arm]) -> str:
  value = (lambda a: a.num_fgrams) if axis == 'S' else (lambda a: a.af_layers)
  means = [(value(a), a.ppl_summary(corpus)) for a in members]
  listing = ', '.join(f'{axis}={v}: {s.mean:.3f}' for v, s in means)
  finite = [s.mean for _, s in means if math.isfinite(s.mean)]
  monotone = all(b <= a for a, b in zip(finite, finite[1:]))
  first, last = members[0], members[-1]
  d, seeds = stats.paired(last.values(corpus, 'loss'), first.values(corpus, 'loss'))
  what = 'non-increasing' if monotone else 'NOT non-increasing'
  return (f'[{corpus}, {cov}] perplexity vs {axis}: mean perplexity is {what} over {axis} '
          f'({listing}); {axis}={value(last)} minus {axis}={value(first)}, paired over '
          f'{len(seeds)} seed(s): loss {fmt_interval(d, 4)} nats, '
          f'{_spread_phrase(d, "lower", "higher")}.')


def paired_rows(arms: Sequence[Arm], baseline: Arm | None,
                corpus: str) -> list[dict[str, Any]]:
  """Per SCONE arm: the paired SCONE-minus-baseline difference of each metric."""
  if baseline is None:
    return []
  rows = []
  for a in arms:
    if a is baseline or not a.has_fgram_side:
      continue
    row: dict[str, Any] = {'arm': a.name}
    for metric in METRICS:
      d, seeds = stats.paired(a.values(corpus, metric), baseline.values(corpus, metric))
      row['paired seeds'] = len(seeds)
      row[f'd_{metric} [95% CI]'] = fmt_interval(d, 4 if metric != 'perplexity' else 3)
    d, _ = stats.paired(a.values(corpus, 'loss'), baseline.values(corpus, 'loss'))
    row['beyond seed spread'] = ('yes' if d.excludes_zero else 'no') if d.n >= 2 else 'n<2'
    rows.append(row)
  return rows


def summary_rows(arms: Sequence[Arm], corpus: str) -> list[dict[str, Any]]:
  """Per arm: S, A_f layers, lr, seeds, and mean / std / 95% CI of each metric."""
  rows = []
  for a in arms:
    row: dict[str, Any] = {'arm': a.name, 'side': a.side, 'S': a.num_fgrams,
                           'A_f layers': a.af_layers,
                           'lr': a.lr if a.lr is not None else a.cfg.train.learning_rate,
                           'seeds': f'{len(a.values(corpus, "loss"))}/{len(a.runs)}'}
    for metric in METRICS:
      s = a.summary(corpus, metric)
      short = {'loss': 'loss', 'perplexity': 'ppl', 'bits_per_byte': 'bpb'}[metric]
      if metric == 'perplexity':
        s = a.ppl_summary(corpus)
        short = 'ppl (geo)'
      row[f'{short} mean'] = s.mean
      row[f'{short.split()[0]} std'] = s.std
      row[f'{short} 95% CI'] = ('-' if s.n < 2 else
                                f'[{s.lo:.4g}, {s.hi:.4g}]')
    rows.append(row)
  return rows


def ranking_rows(arms: Sequence[Arm], baseline: Arm | None,
                 corpus: str) -> list[dict[str, Any]]:
  """Arms ranked by mean test loss on `corpus`, each against the top-ranked arm and the
  baseline by the paired per-seed difference of the loss.

  The rank is by mean only; 'tied with #1' says whether the paired interval against the
  first arm includes zero, so a reader sees which places the seeds actually separate.
  """
  done = [a for a in arms if a.values(corpus, 'loss')]
  done.sort(key=lambda a: (a.summary(corpus, 'loss').mean, a.name))
  rows = []
  for i, a in enumerate(done):
    row: dict[str, Any] = {'rank': i + 1, 'arm': a.name, 'side': a.side,
                           'ppl (geo) [95% CI]': fmt_interval(a.ppl_summary(corpus), 1,
                                                              signed=False)}
    if i == 0:
      row['d_loss vs #1 [95% CI]'], row['tied with #1'] = '-', '-'
    else:
      d, _ = stats.paired(a.values(corpus, 'loss'), done[0].values(corpus, 'loss'))
      row['d_loss vs #1 [95% CI]'] = fmt_interval(d, 4)
      row['tied with #1'] = ('no' if d.excludes_zero else 'yes') if d.n >= 2 else 'n<2'
    if baseline is not None and a is not baseline:
      d, _ = stats.paired(a.values(corpus, 'loss'), baseline.values(corpus, 'loss'))
      row['d_loss vs baseline [95% CI]'] = fmt_interval(d, 4)
    else:
      row['d_loss vs baseline [95% CI]'] = '-'
    rows.append(row)
  return rows


def exposure_rows(arms: Sequence[Arm]) -> list[dict[str, Any]]:
  """Per SCONE arm: how often training met its LEAST frequent f-gram (the S-th row).

  count = that f-gram's count in the train split (the mined table's counts); training
  tokens <= steps x batch x seq_len (packed rows, padding included), so the expected
  sightings count x training tokens / train split tokens are an upper estimate. Arms whose
  prepared artifacts are not readable here are left out.
  """
  rows = []
  for a in arms:
    if not a.has_fgram_side or not a.cfg.fgram_model.uses_fgram_table:
      continue
    adir = a.cfg.data.artifacts_dir
    try:
      counts = np.load(os.path.join(adir, 'fgrams', 'counts.npy'), mmap_mode='r')
      with open(os.path.join(adir, 'tokens', 'train', 'manifest.json')) as f:
        split_tokens = int(json.load(f)['num_tokens'])
    except (OSError, ValueError, KeyError):
      continue
    s = a.cfg.fgram.rows_used(len(counts))
    tc = a.cfg.train
    trained = tc.steps * tc.batch_size * tc.seq_len
    count = int(counts[s - 1])
    rows.append({'arm': a.name, 'S': s, 'count of the S-th f-gram': count,
                 'training tokens (<=)': trained, 'epochs (<=)': trained / split_tokens,
                 'sightings in training (<=)': count * trained / split_tokens})
  return rows


def downstream_tables(arms: Sequence[Arm], baseline: Arm | None) -> str:
  """REPORT.md's downstream accuracy tables (downstream/report.tables): each arm's runs'
  W/downstream.json by seed; '' when no run scored a task."""
  records = {a.name: {r.cfg.train.seed: r.downstream for r in a.runs
                      if r.downstream.get('paths')} for a in arms}
  records = {name: by_seed for name, by_seed in records.items() if by_seed}
  if not records:
    return ''
  return downstream_report.tables(records, baseline.name if baseline else None)
