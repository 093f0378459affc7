"""scone_jax.demo: the verdict logic on fake runs; the micro demo sweep end to end (slow)."""

import os
import subprocess
import sys

import pytest

from scone_jax import config as config_lib
from scone_jax import demo
from scone_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(name, s, seed, ppl):
  overrides = {'train.seed': seed}
  if s == 0:
    overrides['fgram_model.num_layers'] = 0
  else:
    overrides['fgram.use_size'] = s
  cfg = config_lib.from_configdict({'fgram': {'size': 1000, 'use_size': s},
                                    'fgram_model': {'num_layers': 1 if s else 0},
                                    'train': {'seed': seed}})
  evals = {'c': {'perplexity': ppl}} if ppl is not None else {}
  return report.Run(name, '/nowhere', overrides, cfg, evals, [])


def runs_from(table):
  """{S: [ppl per seed]} -> runs."""
  return [fake_run(f'S{s}-seed{i}', s, i, p) for s, ppls in table.items()
          for i, p in enumerate(ppls)]


def test_verdict_scone_wins_and_falls_with_s():
  runs = runs_from({0: [30.0, 32.0], 100: [29.0, 30.0], 500: [28.0, 29.0], 1000: [27.0, 28.0]})
  v = demo.verdict(runs)
  assert v.scone_beats_baseline and v.ppl_falls_with_s
  assert 'Baseline perplexity 31.000' in v.lines[0] and 'BEAT' in v.lines[0]
  assert 'S=1000' in v.lines[0] and 'fell as S grew' in v.lines[1]
  best = demo.best_scone_run(runs)
  assert best.name == 'S1000-seed0'


def test_verdict_reports_when_the_data_disagrees():
  # Mean over seeds decides: S=100's best seed beats the baseline, its mean does not.
  runs = runs_from({0: [30.0, 30.0], 100: [29.0, 33.0], 1000: [31.5, 31.5]})
  v = demo.verdict(runs)
  assert v.scone_beats_baseline is False and v.ppl_falls_with_s is False
  assert 'did NOT beat' in v.lines[0] and '31.000 at S=100' in v.lines[0] and '+3.3%' in v.lines[0]
  assert 'did NOT fall monotonically' in v.lines[1]
  # Perplexity rising with S while still beating the baseline.
  v = demo.verdict(runs_from({0: [40.0], 100: [30.0], 1000: [35.0]}))
  assert v.scone_beats_baseline and not v.ppl_falls_with_s


def test_verdict_without_enough_runs():
  v = demo.verdict(runs_from({100: [30.0]}))
  assert v.scone_beats_baseline is None and 'Not enough' in v.lines[0]
  assert demo.best_scone_run(runs_from({0: [30.0], 100: [None]})) is None


@pytest.mark.slow
def test_micro_demo_end_to_end(tmp_path):
  """`make demo` on the micro sweep: 8 points x 3 steps, report, export, generate."""
  cmd = [sys.executable, '-m', 'scone_jax.demo', f'--workdir={tmp_path}',
         '--sweep=experiments/sweeps/demo_micro.py', '--parallel=2']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = out.stdout
  assert 'VERDICT' in text and 'SCONE' in text and 'as S grew' in text
  assert 'export + generate from the best SCONE run' in text
  sweep_dir = tmp_path / 'demo_micro'
  for name in ('results.csv', 'REPORT.md', 'ppl_vs_num_fgrams.png',
               'ppl_vs_inference_flops.png', 'training_curves.png'):
    assert (sweep_dir / name).stat().st_size > 0, name
    assert str(sweep_dir / name) in text
  runs = report.collect(str(sweep_dir))
  assert len(runs) == 8 and all(r.finished for r in runs)
  best = demo.best_scone_run(runs)
  assert (sweep_dir / best.name / 'export').is_dir()
  # Rerun: every point is skipped (finished), the report is rebuilt.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count(' skipped ') == 8
