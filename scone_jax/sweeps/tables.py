"""Tables of a sweep's rows: Markdown (the dry run, REPORT.md) and CSV (results.csv)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

from scone_jax import paths


def fmt_cell(v: Any) -> str:
  """Table cell: big numbers with an SI suffix (419.2M, 2.73G), floats to 4 digits."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return str(v)
  if isinstance(v, float) and math.isnan(v):
    return '-'
  for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
    if abs(v) >= 10 * scale or (abs(v) >= scale and suffix != 'K'):
      return f'{v / scale:.4g}{suffix}'
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """A GitHub Markdown table over the union of the rows' keys (first-seen order)."""
  if not rows:
    return '(no rows)'
  cols = list(dict.fromkeys(k for r in rows for k in r))
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(fmt_cell(r.get(c, '')) for c in cols) + ' |' for r in rows]
  return '\n'.join(lines)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """`rows` as CSV over the union of their keys, written whole (temp + rename locally;
  one PUT in a bucket), so a reader never sees half a file."""
  buf = io.StringIO()
  cols = list(dict.fromkeys(k for r in rows for k in r))
  writer = csv.DictWriter(buf, fieldnames=cols)
  writer.writeheader()
  writer.writerows(rows)
  paths.write_bytes(path, buf.getvalue().encode())
