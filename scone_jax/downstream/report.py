"""Per-task accuracy tables over seeds for REPORT.md, from W/downstream.json records.

`tables(results_by_arm, baseline)` returns markdown: per scoring path, one table of each
arm's headline metric per task (mean and 95% Student-t interval over seeds,
scone_jax.sweeps.stats), the paper's six-task average (PIQA, HellaSwag, ARC-E, ARC-C,
CommonsenseQA, MMLU; Table 1 of arXiv 2502.01637) under its own label when an arm has all
six, and a second table of paired differences (arm minus baseline, per seed).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from scone_jax.sweeps import stats

PAPER_TASKS = ('piqa', 'hellaswag', 'arc_easy', 'arc_challenge', 'commonsense_qa', 'mmlu')
PAPER_AVERAGE = 'paper six-task avg'
Records = Mapping[str, Mapping[int, Mapping[str, Any]]]  # arm -> seed -> downstream.json


def _values(records: Records, path: str) -> dict[str, dict[str, dict[int, float]]]:
  """arm -> column (task or PAPER_AVERAGE) -> seed -> headline value."""
  out: dict[str, dict[str, dict[int, float]]] = {}
  for arm, by_seed in records.items():
    cols = out.setdefault(arm, {})
    for seed, record in by_seed.items():
      tasks = record.get('paths', {}).get(path, {}).get('tasks', {})
      for task, r in tasks.items():
        cols.setdefault(task, {})[seed] = float(r['value'])
      if all(t in tasks for t in PAPER_TASKS):
        cols.setdefault(PAPER_AVERAGE, {})[seed] = (
            sum(float(tasks[t]['value']) for t in PAPER_TASKS) / len(PAPER_TASKS))
  return out


def _cell(s: stats.Summary) -> str:
  if s.n == 0:
    return '-'
  if s.n < 2 or math.isnan(s.lo):
    return f'{100 * s.mean:.1f} (n=1)'
  return f'{100 * s.mean:.1f} [{100 * s.lo:.1f}, {100 * s.hi:.1f}] (n={s.n})'


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def tables(records: Records, baseline: str | None = None) -> str:
  """Markdown tables of downstream accuracy (%) per path; see the module docstring."""
  paths_seen = sorted({p for by_seed in records.values() for r in by_seed.values()
                       for p in r.get('paths', {})})
  parts = []
  for path in paths_seen:
    values = _values(records, path)
    columns = sorted({c for cols in values.values() for c in cols if c != PAPER_AVERAGE},
                     key=lambda t: (t not in PAPER_TASKS, PAPER_TASKS.index(t)
                                    if t in PAPER_TASKS else 0, t))
    if any(PAPER_AVERAGE in cols for cols in values.values()):
      columns.append(PAPER_AVERAGE)
    rows = [[arm] + [_cell(stats.summarize(list(cols.get(c, {}).values())))
                     for c in columns] for arm, cols in sorted(values.items())]
    parts.append(f'Downstream accuracy (%), path={path}: headline metric per task, mean '
                 f'[95% interval] over seeds ({stats.METHOD.split(";")[0]})\n\n' +
                 _table(['arm'] + columns, rows))
    if baseline in values:
      diff_rows = []
      for arm, cols in sorted(values.items()):
        if arm == baseline:
          continue
        diff_rows.append([arm] + [_cell(stats.paired(cols.get(c, {}),
                                                     values[baseline].get(c, {}))[0])
                                  for c in columns])
      parts.append(f'Paired difference vs {baseline} (percentage points, paired by seed), '
                   f'path={path}\n\n' + _table(['arm'] + columns, diff_rows))
  return '\n\n'.join(parts)
