"""A sweep's results as they lie on disk: one `PointResult` per point a sweep started.

Reads W/point.json (the point's overrides and resolved config, written by
scone_jax/sweeps/spec.py), W/eval.json (final results only), W/run.json (the mined
table's real rows), W/downstream.json (through downstream/runner.read_results) and
W/metrics.jsonl (through RunDir.metrics, the one reader), under a
sweep dir, local or gs://. scone_jax/report.py and scone_jax/demo.py read sweeps through
`collect`; scone_jax/sweeps/analysis.py groups the results into arms.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from scone_jax import config as config_lib
from scone_jax import metrics_file
from scone_jax import paths
from scone_jax import run as run_lib
from scone_jax.downstream import runner as downstream_runner
from scone_jax.model import arm_accounting
from scone_jax.model import flops


@dataclasses.dataclass
class PointResult:
  """One sweep point's results (eval and curve are empty when it has not finished)."""
  name: str
  workdir: str
  overrides: dict[str, Any]
  cfg: config_lib.Config
  eval: dict[str, dict[str, float]]  # final eval.json 'corpora': name -> {perplexity, ...}
  curve: list[tuple[int, float]]  # (step, train loss)
  # The mined table's rows (W/run.json fgram_table_rows); None before train recorded it.
  table_rows: int | None = None
  # W/downstream.json ({'paths': {path: {'step', 'tasks': {task: {...}}}}}); no paths
  # when the point scored no downstream task.
  downstream: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def finished(self) -> bool:
    return bool(self.eval)

  @property
  def num_fgrams(self) -> int:
    """S as trained: cfg.fgram.rows_used of the real table once train recorded its rows
    (else what the config requests); 0 for the baseline and hashed (no mined table)."""
    return flops.num_fgrams(self.cfg, self.table_rows)

  def accounting(self) -> arm_accounting.ArmAccounting:
    """The point's parameters, memory and FLOPs (model/arm_accounting.py), at its real S."""
    return arm_accounting.account(self.cfg, table_rows=self.table_rows)


def _read_json(path: str) -> Any:
  try:
    return json.loads(paths.read_text(path))
  except (OSError, json.JSONDecodeError):
    return None


def collect(sweep_dir: str) -> list[PointResult]:
  """Every point under sweep_dir that has a point.json, sorted by name."""
  if not paths.isdir(sweep_dir):
    raise FileNotFoundError(f'{sweep_dir} does not exist: run the sweep first '
                            '(python -m scone_jax.sweeps --sweep=FILE --root=ROOT)')
  results = []
  for name in sorted(p.name for p in paths.path(sweep_dir).iterdir()):
    workdir = os.path.join(sweep_dir, name)
    point = _read_json(os.path.join(workdir, 'point.json'))
    if not isinstance(point, dict) or 'config' not in point:
      continue
    cfg = config_lib.from_configdict(point['config'])
    result = _read_json(os.path.join(workdir, run_lib.EVAL_FILE))
    final = isinstance(result, dict) and result.get('step', -1) >= cfg.train.steps
    info = _read_json(os.path.join(workdir, run_lib.RUN_FILE))
    rows = info.get('fgram_table_rows') if isinstance(info, dict) else None
    results.append(PointResult(
        name, workdir, point['overrides'], cfg,
        result.get('corpora', {}) if final else {},
        metrics_file.curve(run_lib.RunDir(workdir).metrics()),
        int(rows) if rows else None,  # 0: a run without a mined table.
        downstream_runner.read_results(workdir)))
  return results


def varying_keys(results: Sequence[PointResult]) -> list[str]:
  """Override keys whose value differs across points (a missing key counts as a value)."""
  keys = sorted({k for r in results for k in r.overrides})
  return [k for k in keys if len({repr(r.overrides.get(k)) for r in results}) > 1]
