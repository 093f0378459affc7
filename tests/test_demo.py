"""scone_jax.demo: the verdict logic on fake runs; the micro demo sweep end to end (slow)."""

import math
import os
import subprocess
import sys

import pytest

from scone_jax import config as config_lib
from scone_jax import demo
from scone_jax.downstream import tasks
from scone_jax.sweeps import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(name, s, seed, ppl, valid=None):
  overrides = {'train.seed': seed}
  if s == 0:
    overrides['fgram_model.num_layers'] = 0
  else:
    overrides['fgram.use_size'] = s
  cfg = config_lib.from_configdict({'fgram': {'size': 1000, 'use_size': s},
                                    'fgram_model': {'num_layers': 1 if s else 0},
                                    'train': {'seed': seed}})
  evals = {}
  if ppl is not None:
    evals['c'] = {'perplexity': ppl, 'loss': math.log(ppl), 'tokens': 10.0,
                  'fraction_evaluated': 1.0}
    if valid is not None:
      evals['valid.c'] = {'loss': valid}
  return results.PointResult(name, '/nowhere', overrides, cfg, evals, [])


def runs_from(table, valid=None):
  """{S: [ppl per seed]} -> runs (validation loss per S from `valid`, if given)."""
  return [fake_run(f'S{s}-seed{i}', s, i, p, (valid or {}).get(s))
          for s, ppls in table.items() for i, p in enumerate(ppls)]


def test_verdict_scone_wins_and_falls_with_s():
  # SCONE is 1-3 below the baseline at every seed: beyond the seed spread, paired.
  runs = runs_from({0: [30.0, 32.0, 31.0], 100: [29.0, 31.0, 30.0],
                    500: [28.0, 30.0, 29.5], 1000: [27.0, 29.0, 28.0]})
  lines = demo.verdict_lines(runs)
  assert 'best SCONE arm use_size=1000' in lines[0]
  assert 'SCONE is better beyond the seed spread' in lines[0]
  assert 'ranking by mean loss: use_size=1000 < use_size=500' in lines[1]
  assert 'perplexity vs S: mean perplexity is non-increasing' in lines[2]
  assert demo.best_scone_run(runs).name == 'S1000-seed0'


def test_verdict_reports_when_the_data_disagrees():
  # S=100's mean is below the baseline's but one seed is above: within the spread.
  runs = runs_from({0: [30.0, 30.0, 30.0], 100: [29.0, 33.0, 27.0], 1000: [31.5, 31.5, 31.6]})
  lines = demo.verdict_lines(runs)
  assert 'within the seed spread' in lines[0] and 'beyond' not in lines[0]
  assert 'ranking by mean loss' in lines[1] and 'NOT non-increasing' in lines[2]


def test_best_arm_is_chosen_on_validation():
  # S=1000 is better on the test corpus, S=100 on validation: validation decides.
  runs = runs_from({0: [30.0, 31.0], 100: [29.0, 30.0], 1000: [27.0, 28.0]},
                   valid={0: 3.0, 100: 2.0, 1000: 2.5})
  assert 'best SCONE arm use_size=100 (chosen on the validation corpora)' in (
      demo.verdict_lines(runs)[0])
  assert demo.best_scone_run(runs).name.startswith('S100-')


def test_verdict_without_enough_runs():
  lines = demo.verdict_lines(runs_from({100: [30.0]}))
  assert 'not enough finished runs' in lines[0]
  assert demo.best_scone_run(runs_from({0: [30.0], 100: [None]})) is None


class FakeTokenizer:
  """One token per character."""

  def encode(self, texts):
    return [list(t) for t in texts]


def test_embedded_task_docs_fit_the_window_and_lines_show_chance():
  docs = [tasks.Doc(str(i), 'ctx', ('a' * n, 'b' * 3), 0) for i, n in enumerate((5, 20, 6))]
  # Window 16: BOS + 8 context tokens leave 7 for ' ' + choice.
  assert [d.id for d in demo.fitting_docs(docs, FakeTokenizer(), 16)] == ['0', '2']
  assert [d.id for d in demo.fitting_docs(docs, FakeTokenizer(), 16, limit=1)] == ['0']
  entry = {'metric': 'acc_pmi', 'value': 0.4, 'stderr': 0.035, 'chance': 0.25, 'n': 200}
  record = {'paths': {p: {'tasks': {demo.EMBEDDED: entry}} for p in ('train', 'store')}}
  assert demo.downstream_lines(record) == [
      '  path=train acc_pmi 0.400 +- 0.035 (chance 0.250, n=200)',
      '  path=store acc_pmi 0.400 +- 0.035 (chance 0.250, n=200)']


@pytest.mark.slow
def test_micro_demo_end_to_end(tmp_path):
  """`make demo` on the micro sweep: 8 points x 3 steps, report, export, generate."""
  cmd = [sys.executable, '-m', 'scone_jax.demo', f'--workdir={tmp_path}',
         '--sweep=experiments/sweeps/demo_micro.py', '--parallel=2']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = out.stdout
  assert 'VERDICT' in text and 'SCONE vs tuned baseline' in text and 'vs S' in text
  assert 'export + generate from the best SCONE run' in text
  # The embedded next-sentence task through both paths, against chance (1 / 4).
  assert 'downstream: the true next sentence of a held-out docstring among 4' in text
  for path in ('train', 'store'):
    line = next(ln for ln in text.splitlines() if ln.startswith(f'  path={path} acc_pmi '))
    assert '(chance 0.250, n=' in line
  sweep_dir = tmp_path / 'demo_micro'
  for name in ('results.csv', 'REPORT.md', 'ppl_vs_num_fgrams-stdlib.png',
               'paired_diff-stdlib.png', 'training_curves.png'):
    assert (sweep_dir / name).stat().st_size > 0, name
    assert str(sweep_dir / name) in text
  runs = results.collect(str(sweep_dir))
  assert len(runs) == 8 and all(r.finished for r in runs)
  best = demo.best_scone_run(runs)
  assert (sweep_dir / best.name / 'export').is_dir()
  # Rerun: every point is skipped (finished), the report is rebuilt.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count(' skipped ') == 8
