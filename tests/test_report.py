"""scone_jax.report on fake results: per-corpus intervals, paired differences, coverage,
labelled macro-averages only, verdicts, the study's lr table, plots."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from scone_jax import report
from scone_jax.downstream import report as downstream_report
from scone_jax.sweeps import analysis
from scone_jax.sweeps import results
from scone_jax.sweeps import spec as sweep_spec
from scone_jax.sweeps import study
from scone_jax.sweeps import tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')
SEEDS = (0, 1, 2)
POINTS = ([{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS] +
          [{'fgram.use_size': n, 'train.seed': s} for n in (100, 1000) for s in SEEDS] +
          [{'fgram.use_size': 5000, 'train.seed': 0}])  # unfinished
T975_DF2 = 4.302652729749464  # Student t quantile, two-sided 95%, 2 degrees of freedom.


def fake_loss(overrides, corpus):
  """More f-grams -> lower loss; the seed shifts every arm alike (paired seeds cancel);
  corpus b is harder and S=100 is noisy on it."""
  seed = overrides['train.seed']
  base = 3.0 if overrides.get('fgram_model.num_layers') == 0 else 2.9
  base -= overrides.get('fgram.use_size', 0) / 10000
  if corpus == 'b':
    base += 0.5 + (0.3 * (seed - 1) if overrides.get('fgram.use_size') == 100 else 0.0)
  if corpus == 'valid.v':
    base += 0.1
  return base + 0.2 * seed


def fake_downstream(overrides):
  """W/downstream.json (downstream/runner.py's format): the paper's six tasks at 0.5,
  piqa 0.60 (baseline) / 0.65 (S=1000) + 0.01 per seed; S=100 scored no mmlu, so it has
  no six-task average."""
  seed, size = overrides['train.seed'], overrides.get('fgram.use_size')
  values = {t: 0.5 for t in downstream_report.PAPER_TASKS}
  values['piqa'] = (0.65 if size == 1000 else 0.60) + 0.01 * seed
  if size == 100:
    del values['mmlu']
  return {'format_version': 1, 'paths': {'train': {'step': 300, 'tasks': {
      t: {'preset': 'olmo', 'metric': 'acc_per_char', 'value': v, 'stderr': 0.01, 'n': 100}
      for t, v in values.items()}}}}


def make_sweep(tmp_path, fraction=1.0):
  path = tmp_path / 'fake.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\ndef get_sweep():\n  return {POINTS!r}\n')
  sweep = sweep_spec.load_sweep(str(path), str(tmp_path / 'runs'))
  for p in sweep.points:
    sweep_spec.write_point_json(sweep, p)
    if p.overrides.get('fgram.use_size') == 5000:
      continue
    corpora = {}
    for c in ('a', 'b', 'valid.v'):
      loss = fake_loss(p.overrides, c)
      corpora[c] = {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_byte': loss / 2,
                    'tokens': 4000 * fraction, 'fraction_evaluated': fraction}
    with open(os.path.join(p.workdir, 'eval.json'), 'w') as f:
      json.dump({'step': p.cfg.train.steps, 'corpora': corpora}, f)
    with open(os.path.join(p.workdir, 'downstream.json'), 'w') as f:
      json.dump(fake_downstream(p.overrides), f)
    with open(os.path.join(p.workdir, 'metrics.jsonl'), 'w') as f:
      for step in (10, 20, 30):
        f.write(json.dumps({'step': step, 'loss': 5.0 - step / 10 - p.overrides['train.seed'],
                            'lr': 1e-3}) + '\n')
      f.write('{"step": 40, "lo')  # a run killed mid-write
  return sweep


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """The fake sweep with its report written once (plots are the slow part)."""
  sweep = make_sweep(tmp_path_factory.mktemp('report'))
  return sweep, report.write_report(sweep.dir)


@pytest.fixture
def sweep(written):
  return written[0]


def test_csv_has_every_corpus_with_coverage_and_no_cross_corpus_mean(written):
  sweep, paths = written
  name = {repr(p.overrides): p.name for p in sweep.points}
  with open(paths['csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(POINTS)
  by_run = {r['run']: r for r in rows}
  for p in POINTS[:-1]:
    row = by_run[name[repr(p)]]
    for c in ('a', 'b', 'valid.v'):
      assert float(row[f'{c}/loss']) == pytest.approx(fake_loss(p, c))
      assert float(row[f'{c}/fraction_evaluated']) == 1.0 and float(row[f'{c}/tokens']) == 4000
    assert float(row['final_train_loss']) == pytest.approx(2.0 - p['train.seed'])
    assert row['steps'] == '30'
  assert not [k for k in rows[0] if k in ('perplexity', 'loss', 'ppl_mean')]


def test_per_corpus_means_and_t_intervals(written):
  sweep, paths = written
  runs = results.collect(sweep.dir)
  arms, baseline = analysis.arms_of(runs, None)
  assert baseline is not None and not baseline.has_fgram_side
  s1000 = next(a for a in arms if a.num_fgrams == 1000)
  losses = [fake_loss({'fgram.use_size': 1000, 'train.seed': s}, 'a') for s in SEEDS]
  got = s1000.summary('a', 'loss')
  half = T975_DF2 * statistics.stdev(losses) / math.sqrt(3)
  assert got.n == 3 and got.mean == pytest.approx(statistics.mean(losses))
  assert got.std == pytest.approx(statistics.stdev(losses))
  assert (got.lo, got.hi) == pytest.approx((got.mean - half, got.mean + half))
  md = open(paths['markdown']).read()
  assert '## Test corpus `a`' in md and '## Test corpus `b`' in md
  assert '## Test corpus `valid.v`' not in md  # validation is not a result.
  assert f'[{got.lo:.4g}, {got.hi:.4g}]' in md
  assert 'Student-t' in md and 'Unfinished runs' in md


def test_paired_differences_and_verdicts(sweep):
  runs = results.collect(sweep.dir)
  arms, baseline = analysis.arms_of(runs, None)
  lines = analysis.verdicts(arms, baseline, runs)
  by_corpus = {c: [l for l in lines if l.startswith(f'[{c},')] for c in ('a', 'b')}
  # On a, every seed's SCONE-minus-baseline difference is the same: beyond the spread.
  head_a = by_corpus['a'][0]
  assert 'best SCONE arm use_size=1000' in head_a  # chosen on validation (valid.v).
  assert 'better beyond the seed spread (interval excludes 0)' in head_a
  # On b, S=100's extra noise does not hide S=1000's consistent gain either; but the S
  # trend from 100 to 1000 on b is within the noise.
  trend_b = next(l for l in by_corpus['b'] if 'perplexity vs S' in l)
  assert 'within the seed spread' in trend_b and 'non-increasing' in trend_b
  trend_a = next(l for l in by_corpus['a'] if 'perplexity vs S' in l)
  assert 'lower beyond the seed spread' in trend_a
  rows = analysis.paired_rows(arms, baseline, 'a')
  row = next(r for r in rows if r['arm'].endswith('1000'))
  assert row['paired seeds'] == 3 and row['beyond seed spread'] == 'yes'
  assert row['d_loss [95% CI]'].startswith('-0.2000 [')  # 2.9 - 0.1 - 3.0, exactly per seed
  for line in lines:  # "beyond" is said only next to an interval that excludes 0.
    assert ('beyond the seed spread' in line) == ('interval excludes 0' in line)


def test_ranking_per_corpus_says_which_places_the_seeds_separate(written):
  sweep, paths = written
  runs = results.collect(sweep.dir)
  arms, baseline = analysis.arms_of(runs, None)
  a = analysis.ranking_rows(arms, baseline, 'a')
  assert [r['arm'] for r in a] == ['use_size=1000', 'use_size=100', 'num_layers=0']
  assert [r['side'] for r in a] == ['A_f', 'A_f', 'none']
  # On a every paired difference is constant over seeds: all places are separated.
  assert [r['tied with #1'] for r in a] == ['-', 'no', 'no']
  assert a[1]['d_loss vs #1 [95% CI]'].startswith('+0.0900 [')
  assert a[2]['d_loss vs baseline [95% CI]'] == '-'
  # On b, S=100's seed noise (+-0.3) puts it within the spread of S=1000.
  b = analysis.ranking_rows(arms, baseline, 'b')
  assert [r['tied with #1'] for r in b] == ['-', 'yes', 'no']
  lines = [l for l in analysis.verdicts(arms, baseline, runs) if 'ranking' in l]
  assert len(lines) == 2 and 'within the seed spread of use_size=100' in lines[1]
  assert 'beyond the seed spread (each paired interval excludes 0)' in lines[0]
  assert 'Ranking on `a`' in open(paths['markdown']).read()


def test_never_averages_across_corpora_without_the_label(written):
  sweep, paths = written
  md = open(paths['markdown']).read()
  runs = results.collect(sweep.dir)
  arms, _ = analysis.arms_of(runs, None)
  sections = md.split('\n## ')
  macro = [s for s in sections if s.startswith('Macro-average')]
  assert len(macro) == 1 and 'LABELLED' in macro[0]
  for arm in arms:
    if not arm.finished:
      continue
    avg = statistics.mean(arm.ppl_summary(c).mean for c in ('a', 'b'))
    cell = f'| {tables.fmt_cell(avg)} |'
    # The cross-corpus number appears in the labelled section and nowhere else.
    assert cell in macro[0]
    assert all(cell not in s for s in sections if not s.startswith('Macro-average'))
  # One test corpus: no macro-average at all.
  one = [l for l in md.splitlines() if 'Macro' in l]
  assert len(one) == 1


def test_limited_eval_coverage_shows_in_every_output(tmp_path):
  sweep = make_sweep(tmp_path, fraction=0.25)
  paths = report.write_report(sweep.dir)
  md = open(paths['markdown']).read()
  cov = '1,000 tokens = 25.0% of the set'
  assert f'## Test corpus `a` ({cov})' in md and f'`valid.v` ({cov})' in md
  runs = results.collect(sweep.dir)
  arms, baseline = analysis.arms_of(runs, None)
  lines = analysis.verdicts(arms, baseline, runs)
  assert lines and all(cov in l for l in lines)
  assert all(f'* {l}' in md for l in lines)
  captions = [l for l in md.splitlines() if l.startswith('![') and 'Training loss' not in l]
  assert captions and all(cov in c for c in captions)
  with open(paths['csv']) as f:
    assert all(float(r['a/fraction_evaluated']) == 0.25 for r in csv.DictReader(f)
               if r['a/fraction_evaluated'])
  from scone_jax import evaluate
  record = {'step': 3, 'corpora': {'a': {
      'loss': 1.0, 'perplexity': 2.7, 'bits_per_byte': 1.0, 'tokens': 1000.0,
      'fraction_evaluated': 0.25}}}
  assert '1000 tokens = 25.0% of the set' in evaluate.format_eval(record)[0]


def test_plots_exist_and_are_pngs(written):
  sweep, paths = written
  for name in ('ppl_vs_num_fgrams-a', 'ppl_vs_num_fgrams-b', 'paired_diff-a',
               'ppl_vs_inference_flops-b', 'training_curves'):
    with open(paths[name], 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert os.path.getsize(paths[name]) > 5000
  assert not [k for k in paths if k.startswith('ppl_vs_af_depth')]  # depth does not vary.
  assert not [f for f in os.listdir(sweep.dir) if f.startswith('.tmp-')]


def test_study_report_shows_grid_and_chosen_lrs(tmp_path):
  sweep = make_sweep(tmp_path)
  runs = results.collect(sweep.dir)
  by_arm = {}
  for r in runs:
    arm = 'base' if not r.cfg.has_fgram_side else f'S={r.num_fgrams}'
    by_arm.setdefault(arm, {})[str(r.cfg.train.seed)] = r.name
  record = {
      'arms': {a: {} for a in by_arm}, 'baseline': 'base', 'learning_rates': [1e-3, 2e-3],
      'seeds': list(SEEDS), 'tune_seeds': [0], 'compare_runs': by_arm,
      'selection': {'metric': 'mean validation loss', 'validation_corpora': ['valid.v'],
                    'chosen': {a: 2e-3 for a in by_arm}, 'at_edge': {a: True for a in by_arm},
                    'grid': {a: [{'lr': 1e-3, 'valid_loss': 3.5, 'valid_std': 0.125},
                                 {'lr': 2e-3, 'valid_loss': 3.25}] for a in by_arm}}}
  # An arm the study has not reached yet (a run cut short): in the grid, not chosen.
  record['selection']['grid']['S=9999'] = [{'lr': 1e-3, 'valid_loss': float('nan')}]
  with open(os.path.join(sweep.dir, study.STUDY_JSON), 'w') as f:
    json.dump(record, f)
  md = open(report.write_report(sweep.dir)['markdown']).read()
  assert '## Learning rates' in md and '3.2500 *' in md and '(grid edge)' in md
  assert '3.5000 ± 0.1250 |' in md  # the spread over tuning seeds, where recorded.
  assert '| S=1000 |' in md and 'widened' in md
  assert '| S=9999 | no result |' in md and 'not chosen yet |' in md


def test_mean_curve_uses_common_steps():
  from scone_jax.sweeps import plots
  steps, losses = plots.mean_curve([[(1, 4.0), (2, 3.0), (3, 2.0)], [(1, 2.0), (2, 1.0)]])
  assert steps == [1, 2] and losses == [3.0, 2.0]


def test_downstream_accuracy_tables_and_csv_columns(written):
  sweep, paths = written
  md = open(paths['markdown']).read()
  section = md.split('## Downstream accuracy')[1].split('\n## ')[0]
  table, diff = section.split('Paired difference vs ')
  rows = {ln.split(' | ')[0].lstrip('| '): ln.split(' | ') for ln in table.splitlines()
          if ln.startswith('| ')}
  header = rows.pop('arm')
  assert header[1:3] == ['piqa', 'hellaswag']
  assert header[-1].rstrip(' |') == downstream_report.PAPER_AVERAGE
  # piqa 0.65/0.66/0.67: mean 66.0, half-width t(0.975, 2) * 0.01 / sqrt(3) = 2.5 points.
  assert rows['use_size=1000'][1] == f'66.0 [{66 - 2.48:.1f}, {66 + 2.48:.1f}] (n=3)'
  assert rows['num_layers=0'][1].startswith('61.0 [')
  assert rows['use_size=100'][-1].rstrip(' |') == '-'  # No mmlu: no six-task average.
  assert rows['use_size=1000'][-1].startswith(f'{100 * (0.66 + 2.5) / 6:.1f} [')
  assert diff.startswith('num_layers=0 (percentage points, paired by seed)')
  paired = next(ln for ln in diff.splitlines() if ln.startswith('| use_size=1000'))
  assert paired.split(' | ')[1].startswith('5.0 [')  # +5 points on every seed.
  assert 'num_layers=0 |' not in diff  # The baseline is not compared with itself.
  with open(paths['csv']) as f:
    csv_rows = {r['run']: r for r in csv.DictReader(f)}
  point = next(p for p in sweep.points if p.overrides.get('fgram.use_size') == 1000
               and p.overrides['train.seed'] == 2)
  assert float(csv_rows[point.name]['downstream_train/piqa/acc_per_char']) == 0.67


def test_cli_and_missing_dir(sweep, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'scone_jax.report', '--sweep=x/fake.py',
                        f'--root={os.path.dirname(sweep.dir)}'], capture_output=True,
                       text=True, cwd=REPO, check=True).stdout
  assert '# Sweep fake' in out and 'training_curves:' in out
  assert '## Downstream accuracy' in out and downstream_report.PAPER_AVERAGE in out
  with pytest.raises(FileNotFoundError, match='run the sweep first'):
    results.collect(str(tmp_path / 'nothing'))
