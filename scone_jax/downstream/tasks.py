"""The task file: multiple-choice documents as JSONL, read with validation before any scoring.

One JSON object per line (UTF-8):
  id                     str or int, unique within the file
  context                str: the question / sentence start as the task states it (the
                         preset adds its template, e.g. "Question: ...\\nAnswer:")
  choices                list of >= 2 str: the answers as the task states them (the preset
                         adds the delimiter, " " + choice)
  gold                   int in [0, len(choices)): the index of the right answer
  unconditional_context  optional str: the context PMI scores each choice under instead of
                         the preset's default ("Answer:" for question tasks)

`read_tasks` checks every line first and raises `TaskFileError` naming the file, the line
and the fix: nothing is scored from a file that is not valid to its last line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

from scone_jax import artifacts, paths
from scone_jax.errors import UserError

REQUIRED = ('id', 'context', 'choices', 'gold')
OPTIONAL = ('unconditional_context',)


class TaskFileError(UserError, ValueError):
  """A task file (or a raw dataset file given to a converter) that cannot be scored."""


@dataclasses.dataclass(frozen=True)
class Doc:
  """One multiple-choice question as the task states it (before a preset's template)."""
  id: str
  context: str
  choices: tuple[str, ...]
  gold: int
  unconditional_context: str | None = None

  def to_json(self) -> dict[str, Any]:
    out = {'id': self.id, 'context': self.context, 'choices': list(self.choices),
           'gold': self.gold}
    if self.unconditional_context is not None:
      out['unconditional_context'] = self.unconditional_context
    return out


def _fail(where: str, problem: str, fix: str) -> TaskFileError:
  return TaskFileError(f'{where}: {problem}; {fix}')


def parse_doc(obj: Any, where: str) -> Doc:
  """One decoded JSON line -> Doc; `where` ('file:line') prefixes every error."""
  if not isinstance(obj, dict):
    raise _fail(where, f'a line must be a JSON object, got {type(obj).__name__}',
                f'write one object per line with keys {list(REQUIRED)}')
  missing = [k for k in REQUIRED if k not in obj]
  if missing:
    raise _fail(where, f'missing field(s) {missing}',
                f'every line needs {list(REQUIRED)} (optional: {list(OPTIONAL)})')
  unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise _fail(where, f'unknown field(s) {unknown}',
                f'allowed fields are {list(REQUIRED + OPTIONAL)}')
  doc_id = obj['id']
  if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
    raise _fail(where, f'id must be a string or an integer, got {doc_id!r}',
                'give each line a unique id')
  if not isinstance(obj['context'], str):
    raise _fail(where, f'context must be a string, got {type(obj["context"]).__name__}',
                'write the question or sentence start as a string')
  choices = obj['choices']
  if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
    raise _fail(where, 'choices must be a list of strings', 'list the answers as strings')
  if len(choices) < 2:
    raise _fail(where, f'{len(choices)} choice(s); a multiple-choice question needs >= 2',
                'add the wrong answers or drop the line')
  if not all(choices):
    raise _fail(where, 'an empty choice has no tokens to score', 'drop or fill it')
  gold = obj['gold']
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise _fail(where, f'gold={gold!r} is not an index into the {len(choices)} choices',
                f'gold must be an integer in [0, {len(choices)})')
  uncond = obj.get('unconditional_context')
  if uncond is not None and not isinstance(uncond, str):
    raise _fail(where, 'unconditional_context must be a string',
                'drop it to use the preset\'s default')
  return Doc(str(doc_id), obj['context'], tuple(choices), gold, uncond)


def parse_lines(data: bytes, name: str) -> list[Doc]:
  """The docs of a task file's bytes; `name` is the file named in errors."""
  docs, seen = [], {}
  for lineno, raw in enumerate(data.split(b'\n'), start=1):
    if not raw.strip():
      continue
    where = f'{name}:{lineno}'
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise _fail(where, f'invalid UTF-8 at byte {e.start} of the line',
                  're-save the file as UTF-8') from e
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise _fail(where, f'not valid JSON ({e.msg} at column {e.colno})',
                  'write one JSON object per line') from e
    doc = parse_doc(obj, where)
    if doc.id in seen:
      raise _fail(where, f'id {doc.id!r} already used on line {seen[doc.id]}',
                  'give each line a unique id')
    seen[doc.id] = lineno
    docs.append(doc)
  if not docs:
    raise TaskFileError(f'{name} holds no documents; convert a dataset into it '
                        '(python -m scone_jax.downstream.convert)')
  return docs


def read_tasks(path: str) -> list[Doc]:
  """Reads and validates a task file (local or gs://)."""
  if not paths.isfile(path):
    raise TaskFileError(f'task file {path} does not exist; convert a dataset into it '
                        '(python -m scone_jax.downstream.convert) or fix --task_dir')
  return parse_lines(paths.read_bytes(path), path)


def file_fingerprint(path: str) -> str:
  """sha256 of a task file's bytes (what a resumed run checks its results against)."""
  return artifacts.sha256_bytes(paths.read_bytes(path))


def write_tasks(path: str, docs: Iterable[Doc]) -> int:
  """Writes docs as a task file (atomically: a temp file renamed, or one PUT on gs://);
  returns the number written. Every doc is validated as `read_tasks` would."""
  lines = []
  for i, doc in enumerate(docs):
    obj = doc.to_json()
    parse_doc(obj, f'{path}: document {i}')
    lines.append(json.dumps(obj, ensure_ascii=False))
  if not lines:
    raise TaskFileError(f'no documents to write to {path}: the input held none')
  data = ('\n'.join(lines) + '\n').encode('utf-8')
  paths.write_bytes(path, data)
  return len(lines)
