"""scone_jax.report on a fake results directory: CSV, Markdown, plots."""

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from scone_jax import report
from scone_jax.sweeps import spec as sweep_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = os.path.join(REPO, 'experiments', 'tiny.py')
POINTS = ([{'fgram_model.num_layers': 0, 'train.seed': s} for s in (0, 1)] +
          [{'fgram.use_size': n, 'train.seed': s} for n in (100, 1000) for s in (0, 1)] +
          [{'fgram.use_size': 5000, 'train.seed': 0}])  # unfinished


def fake_ppl(overrides, corpus):
  """Deterministic fake results: more f-grams -> lower perplexity; seed adds noise."""
  base = 30.0 if overrides.get('fgram_model.num_layers') == 0 else 28.0
  base -= overrides.get('fgram.use_size', 0) / 1000
  return base + overrides['train.seed'] * 0.5 + (1.0 if corpus == 'b' else 0.0)


@pytest.fixture
def sweep(tmp_path):
  path = tmp_path / 'fake.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\ndef get_sweep():\n  return {POINTS!r}\n')
  sweep = sweep_spec.load_sweep(str(path), str(tmp_path / 'runs'))
  for p in sweep.points:
    sweep_spec.write_point_json(sweep, p)
    if p.overrides.get('fgram.use_size') == 5000:
      continue
    with open(os.path.join(p.workdir, 'eval.json'), 'w') as f:
      json.dump({'step': p.cfg.train.steps, 'corpora': {
          c: {'loss': 1.0, 'perplexity': fake_ppl(p.overrides, c), 'bits_per_byte': 1.5}
          for c in ('a', 'b')}}, f)
    with open(os.path.join(p.workdir, 'metrics.jsonl'), 'w') as f:
      for step in (10, 20, 30):
        f.write(json.dumps({'step': step, 'loss': 5.0 - step / 10 - p.overrides['train.seed'],
                            'lr': 1e-3}) + '\n')
      f.write('{"step": 40, "lo')  # a run killed mid-write
  return sweep


@pytest.fixture
def sweep_dir(sweep):
  return sweep.dir


def test_csv_and_markdown(sweep):
  sweep_dir = sweep.dir
  name = {repr(p.overrides): p.name for p in sweep.points}
  paths = report.write_report(sweep_dir)
  with open(paths['csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(POINTS)
  by_run = {r['run']: r for r in rows}
  for p in POINTS[:-1]:
    row = by_run[name[repr(p)]]
    want = (fake_ppl(p, 'a') + fake_ppl(p, 'b')) / 2
    assert float(row['perplexity']) == pytest.approx(want)
    assert float(row['a/perplexity']) == pytest.approx(fake_ppl(p, 'a'))
    assert float(row['final_train_loss']) == pytest.approx(2.0 - p['train.seed'])
    assert row['steps'] == '30'
    assert int(row['num_fgrams']) == (0 if p.get('fgram_model.num_layers') == 0
                                      else p['fgram.use_size'])
  assert by_run[name[repr(POINTS[-1])]]['perplexity'] == ''
  md = open(paths['markdown']).read()
  assert 'Unfinished runs' in md and name[repr(POINTS[-1])] in md
  # The grouped row for S=1000: mean/std/min/max over the two seeds.
  ppl = [(fake_ppl(p, 'a') + fake_ppl(p, 'b')) / 2 for p in POINTS if
         p.get('fgram.use_size') == 1000]
  groups = {g['S']: g for g in report.group_rows(report.collect(sweep_dir))}
  g = groups[1000]
  assert g['ppl_mean'] == pytest.approx(statistics.mean(ppl))
  assert g['ppl_std'] == pytest.approx(statistics.pstdev(ppl))
  assert (g['ppl_min'], g['ppl_max']) == pytest.approx((min(ppl), max(ppl)))
  assert g['seeds'] == '2/2' and groups[5000]['seeds'] == '0/1'
  assert f'| {report._fmt(g["ppl_mean"])} |' in md
  assert 'ppl_vs_num_fgrams.png' in md


def test_plots_exist_and_are_pngs(sweep_dir):
  paths = report.write_report(sweep_dir)
  for name in ('ppl_vs_num_fgrams', 'ppl_vs_inference_flops', 'training_curves'):
    with open(paths[name], 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert os.path.getsize(paths[name]) > 5000
  assert 'ppl_vs_af_size' not in paths  # A_f size does not vary in this sweep.
  assert not [f for f in os.listdir(sweep_dir) if f.startswith('.tmp-')]


def test_mean_curve_uses_common_steps():
  steps, losses = report._mean_curve([[(1, 4.0), (2, 3.0), (3, 2.0)], [(1, 2.0), (2, 1.0)]])
  assert steps == [1, 2] and losses == [3.0, 2.0]


def test_cli_and_missing_dir(sweep_dir, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'scone_jax.report', '--sweep=x/fake.py',
                        f'--root={os.path.dirname(sweep_dir)}'], capture_output=True,
                       text=True, cwd=REPO, check=True).stdout
  assert '# Sweep fake' in out and 'training_curves:' in out
  with pytest.raises(FileNotFoundError, match='run the sweep first'):
    report.collect(str(tmp_path / 'nothing'))
