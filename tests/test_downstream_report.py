"""Downstream report tables and the embedded-corpus task builder."""

import pytest

from scone_jax.downstream import embedded, report
from scone_jax.downstream.tasks import TaskFileError


def _record(values, path='train'):
  return {'format_version': 1, 'paths': {path: {'tasks': {
      t: {'value': v, 'metric': 'acc_raw'} for t, v in values.items()}}}}


def test_tables_means_intervals_paper_average_and_paired_differences():
  six = dict.fromkeys(report.PAPER_TASKS, 0.5)
  records = {
      'baseline': {0: _record({**six, 'embedded': 0.30}), 1: _record({**six, 'embedded': 0.40})},
      'scone': {0: _record({**six, 'piqa': 0.62, 'embedded': 0.35}),
                1: _record({**six, 'piqa': 0.68, 'embedded': 0.45})},
  }
  md = report.tables(records, baseline='baseline')
  header = md.splitlines()[2]
  assert header.split(' | ')[1:3] == ['piqa', 'hellaswag']
  assert header.rstrip(' |').endswith('embedded | paper six-task avg')
  scone = next(ln for ln in md.splitlines() if ln.startswith('| scone'))
  # piqa mean 65.0; two seeds: t(0.975, 1) = 12.706, s = 0.0424 -> half-width 38.1 points.
  assert ' 65.0 [26.9, 103.1] (n=2) ' in scone
  cells = scone.split(' | ')
  assert cells[-1].startswith('52.5 [')  # (0.65 + 5 * 0.5) / 6 = 0.525 on average.
  diff = md.split('Paired difference vs baseline')[1]
  diff_scone = next(ln for ln in diff.splitlines() if ln.startswith('| scone'))
  assert diff_scone.split(' | ')[1].startswith('15.0 [')  # piqa: +12 and +18 points.
  assert diff_scone.split(' | ')[-2].startswith('5.0 [')  # embedded: +5, +5 -> zero width.


def test_one_seed_has_no_interval_and_missing_tasks_no_paper_average():
  md = report.tables({'scone': {0: _record({'piqa': 0.6})}})
  assert '60.0 (n=1)' in md and report.PAPER_AVERAGE not in md


def _records(modules=6, per_module=3):
  out = []
  for m in range(modules):
    for d in range(per_module):
      out.append({'source': f'mod{m}.py:{d}', 'text': f'Module {m} doc {d} starts here. '
                  f'Then it says thing {m}-{d} next. And more words follow here.'})
  return out


def test_embedded_task_is_deterministic_and_draws_wrong_choices_from_other_modules():
  docs = embedded.embedded_task(_records(), num_docs=10, num_choices=4, seed=3)
  assert docs == embedded.embedded_task(_records(), num_docs=10, num_choices=4, seed=3)
  assert len(docs) == 10 and len({d.id for d in docs}) == 10
  golds = set()
  for d in docs:
    module = d.id.split('.py')[0]
    m, k = module[3:], d.id.rsplit(':', 1)[1]
    assert d.context == f'Module {m} doc {k} starts here.'
    assert d.choices[d.gold] == f'Then it says thing {m}-{k} next.'
    wrong = [c for i, c in enumerate(d.choices) if i != d.gold]
    assert len(wrong) == 3 and not any(f'thing {m}-' in c or f'thing {m} ' in c
                                       for c in wrong)
    golds.add(d.gold)
  assert len(golds) > 1  # The right answer's position varies.


def test_embedded_task_needs_enough_modules():
  with pytest.raises(TaskFileError, match='needs >= 4 modules'):
    embedded.embedded_task(_records(modules=3), num_choices=4)
  assert embedded.sentences('Short. This one has enough words. ok') == [
      'This one has enough words.']
  assert embedded.sentences('A bit longer than twenty. Fits in twenty.', max_chars=20) == [
      'Fits in twenty.']
  docs = embedded.embedded_task(_records(), num_docs=5, max_chars=35)
  assert docs and all(len(c) <= 35 for d in docs for c in (d.context,) + d.choices)
