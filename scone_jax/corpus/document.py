"""The types every corpus reader shares: `Document` and `CorpusError`.

Their own module so that readers.py (the text formats and the dispatch) and columnar.py
(Parquet / ArrayRecord) each import it, and readers imports columnar, one way only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator

import numpy as np

from scone_jax.errors import UserError


class CorpusError(UserError, ValueError):
  """The corpus input is unusable; the message names the file (and line) and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  source: str  # "path:line" of the document's first line, for error messages.
  # Token ids (no BOS/EOS) of an already tokenized document (data.format=
  # 'arrayrecord_tokens'; text is then ''), else None.
  ids: np.ndarray | None = None
  # Supervised fine-tuning (corpus/sft.py): the (text, trained) pieces of `text` in order;
  # prepare stores a loss mask of 1 on the tokens of trained pieces. None = all trained.
  spans: tuple[tuple[str, bool], ...] | None = None


def json_lines(lines: Iterable[tuple[int, str]], path: str,
               hint: str) -> Iterator[tuple[str, Any]]:
  """('path:lineno', the parsed value) of each non-blank line of a JSONL file, from its
  decoded (line number, line)s; invalid JSON is a CorpusError naming the line, then
  `hint` (what to fix)."""
  for lineno, line in lines:
    if not line.strip():
      continue
    where = f'{path}:{lineno}'
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      raise CorpusError(f'{where}: invalid JSON ({e.msg} at column {e.colno}); {hint}') from e
