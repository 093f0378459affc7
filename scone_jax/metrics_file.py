"""The one reader of a run's W/metrics.jsonl (what train logs, one JSON object a line).

Read through scone_jax/paths.py, so a gs:// run reads like a local one. The trainer
appends lines while readers (a sweep's progress line, the report, generate's accounting)
may be reading, and a killed run leaves a partial last line: every line that is not a
complete JSON object is skipped, never an error.
"""

from __future__ import annotations

import json
import math
from typing import Any

from scone_jax import paths

METRICS_FILE = 'metrics.jsonl'
# Bytes `last` reads from the end of the file: several log lines, so the latest complete
# record with the wanted key is almost always inside.
_TAIL_BYTES = 8192


def _records(text: str) -> list[dict[str, Any]]:
  records = []
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # A partial line: a run killed, or still writing, mid-line.
    if isinstance(rec, dict):
      records.append(rec)
  return records


def read(workdir: str) -> list[dict[str, Any]]:
  """Every complete record of W/metrics.jsonl in order ([] when the run logged none)."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.exists(path):
    return []
  return _records(paths.read_text(path))


def last(workdir: str, key: str) -> dict[str, Any] | None:
  """The latest record holding `key`, reading only the file's tail (a sweep's progress
  line polls this for every running point); None when there is none."""
  path = paths.join(workdir, METRICS_FILE)
  try:
    size = paths.getsize(path)
    with paths.path(path).open('rb') as f:
      f.seek(max(0, size - _TAIL_BYTES))
      tail = f.read().decode(errors='replace')
  except OSError:
    return None  # Not written yet.
  return next((rec for rec in reversed(_records(tail)) if key in rec), None)


def mean(records: list[dict[str, Any]], key: str) -> float | None:
  """Mean of the finite numbers logged under `key` (None when there are none)."""
  values = [float(r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return sum(values) / len(values) if values else None


def curve(records: list[dict[str, Any]], key: str = 'loss') -> list[tuple[int, float]]:
  """(step, value) for every record with both a step and `key` (the training curve)."""
  return [(int(r['step']), float(r[key])) for r in records if 'step' in r and key in r]
