"""Converters: the files users download for the paper's six tasks -> task files (tasks.py).

  python -m scone_jax.downstream.convert --task=piqa --input=valid.jsonl \\
      --labels=valid-labels.lst --out=tasks/piqa.jsonl

Each task's public exports, in the shapes they ship:
  piqa           original JSONL {goal, sol1, sol2} + a labels .lst (one 0/1 per line), or
                 the Hugging Face Parquet/JSONL with a `label` column
  hellaswag      original JSONL {ctx_a, ctx_b, activity_label, endings, label, ind};
                 Hugging Face Parquet (label as a string)
  arc            ai2_arc JSONL {id, question: {stem, choices: [{label, text}]}, answerKey};
                 Hugging Face Parquet {id, question, choices: {label, text}, answerKey}
                 (arc_easy and arc_challenge are the same converter on the two files)
  commonsense_qa JSONL {id, question: {stem, choices}, answerKey} or Parquet {id, question,
                 choices: {label, text}, answerKey}
  mmlu           the original headerless CSVs (question, A, B, C, D, answer letter; the
                 subject from the file name) or Hugging Face Parquet {question, subject,
                 choices, answer (int)}

A document's `context` is the question as the dataset states it; HellaSwag's is
lm-eval's preprocessed "activity: ctx_a Ctx_b" (its bracketed WikiHow markers removed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
from absl import flags

from scone_jax import cli, paths
from scone_jax.downstream.tasks import Doc, TaskFileError, write_tasks

Row = dict[str, Any]


def read_rows(path: str) -> Iterator[tuple[str, Row]]:
  """(location 'file:line', row) of a .jsonl / .json / .parquet / .csv dataset file.

  A .json file is either one JSON array of rows or JSON Lines. CSV rows (headerless, as
  MMLU ships) come as {'columns': [...], 'file': path}.
  """
  if not paths.isfile(path):
    raise TaskFileError(f'dataset file {path} does not exist; pass the downloaded file')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.parquet':
    table = pq.read_table(io.BytesIO(paths.read_bytes(path)))
    for i, row in enumerate(table.to_pylist()):
      yield f'{path}:row {i}', row
    return
  data = paths.read_bytes(path)
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise TaskFileError(f'{path}:{line}: invalid UTF-8; re-download or re-save the file '
                        'as UTF-8') from e
  if ext == '.csv':
    for i, cols in enumerate(csv.reader(io.StringIO(text)), start=1):
      if cols:
        yield f'{path}:{i}', {'columns': cols, 'file': path}
    return
  if ext == '.json' and text.lstrip().startswith('['):
    for i, row in enumerate(json.loads(text)):
      yield f'{path}:item {i}', row
    return
  if ext not in ('.json', '.jsonl'):
    raise TaskFileError(f'{path}: unknown dataset file type {ext!r}; give .jsonl, .json, '
                        '.parquet or .csv')
  for i, line in enumerate(text.split('\n'), start=1):
    if line.strip():
      try:
        yield f'{path}:{i}', json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskFileError(f'{path}:{i}: not valid JSON ({e.msg}); is this the dataset\'s '
                            'JSONL file?') from e


def _field(row: Row, key: str, where: str, task: str) -> Any:
  if key not in row:
    raise TaskFileError(f'{where}: no field {key!r} (fields: {sorted(row)}); is this the '
                        f'{task} file?')
  return row[key]


def _int_label(value: Any, where: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError as e:
    raise TaskFileError(f'{where}: label {value!r} is not an integer') from e


def piqa(path: str, labels: str | None = None) -> list[Doc]:
  """PIQA: goal, sol1, sol2; the label in the row or, for the original release, in the
  labels file (one 0/1 per line, line i for row i)."""
  rows = list(read_rows(path))
  label_list = None
  if labels:
    label_list = [ln for ln in paths.read_text(labels).split('\n') if ln.strip()]
    if len(label_list) != len(rows):
      raise TaskFileError(f'{labels} has {len(label_list)} labels for the {len(rows)} rows '
                          f'of {path}; pass the labels file of the same split')
  docs = []
  for i, (where, row) in enumerate(rows):
    label = label_list[i] if label_list else _field(row, 'label', where, 'piqa (or pass '
                                                     '--labels)')
    docs.append(Doc(str(row.get('id', i)), _field(row, 'goal', where, 'piqa'),
                    (_field(row, 'sol1', where, 'piqa'), _field(row, 'sol2', where, 'piqa')),
                    _int_label(label, where)))
  return docs


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's HellaSwag text cleaning: WikiHow's ' [title]' becomes '. ', other bracketed
  markers are removed, double spaces collapsed."""
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(path: str, labels: str | None = None) -> list[Doc]:
  del labels
  docs = []
  for i, (where, row) in enumerate(read_rows(path)):
    ctx = (_field(row, 'ctx_a', where, 'hellaswag') + ' ' +
           _field(row, 'ctx_b', where, 'hellaswag').capitalize())
    context = hellaswag_preprocess(_field(row, 'activity_label', where, 'hellaswag') +
                                   ': ' + ctx)
    endings = tuple(hellaswag_preprocess(e) for e in _field(row, 'endings', where,
                                                            'hellaswag'))
    docs.append(Doc(str(row.get('ind', i)), context, endings,
                    _int_label(_field(row, 'label', where, 'hellaswag'), where)))
  return docs


def _lettered(row: Row, where: str, task: str) -> tuple[str, tuple[str, ...], int]:
  """(stem, choice texts, gold) of an ARC / CommonsenseQA row in either shape."""
  question = _field(row, 'question', where, task)
  if isinstance(question, dict):  # The original JSONL: choices nested in the question.
    stem = _field(question, 'stem', where, task)
    choices = _field(question, 'choices', where, task)
    labels, texts = [c['label'] for c in choices], [c['text'] for c in choices]
  else:  # Hugging Face: question is the stem, choices {label: [...], text: [...]}.
    stem, choices = question, _field(row, 'choices', where, task)
    labels, texts = list(choices['label']), list(choices['text'])
  key = str(_field(row, 'answerKey', where, task)).strip()
  if key not in labels:
    raise TaskFileError(f'{where}: answerKey {key!r} is not one of the choice labels '
                        f'{labels}')
  return stem, tuple(texts), labels.index(key)


def _lettered_converter(dataset: str) -> Callable[..., list[Doc]]:
  """A converter for a dataset of lettered choices and an answerKey (`_lettered`): ai2_arc
  and commonsense_qa ship the same layout."""
  def convert_file(path: str, labels: str | None = None) -> list[Doc]:
    del labels
    docs = []
    for i, (where, row) in enumerate(read_rows(path)):
      stem, texts, gold = _lettered(row, where, dataset)
      docs.append(Doc(str(row.get('id', i)), stem, texts, gold))
    return docs
  convert_file.__name__ = dataset
  return convert_file


arc = _lettered_converter('ai2_arc')
commonsense_qa = _lettered_converter('commonsense_qa')


def _mmlu_subject(file: str) -> str:
  """'abstract_algebra_test.csv' -> 'abstract_algebra'."""
  name = os.path.splitext(os.path.basename(file))[0]
  return re.sub(r'_(test|dev|val)$', '', name)


def mmlu(path: str, labels: str | None = None) -> list[Doc]:
  """MMLU: one CSV per subject (pass a glob for all of them) or the Parquet export."""
  del labels
  files = sorted(paths.glob(path)) if any(c in path for c in '*?[') else [path]
  if not files:
    raise TaskFileError(f'no MMLU files match {path}')
  docs = []
  for file in files:
    for i, (where, row) in enumerate(read_rows(file)):
      if 'columns' in row:
        cols = row['columns']
        if len(cols) != 6 or cols[5].strip() not in 'ABCD' or not cols[5].strip():
          raise TaskFileError(f'{where}: an MMLU CSV row is question, A, B, C, D, answer '
                              f'letter; got {len(cols)} columns')
        subject, question, choices = _mmlu_subject(file), cols[0], tuple(cols[1:5])
        gold = 'ABCD'.index(cols[5].strip())
      else:
        subject = row.get('subject', _mmlu_subject(file))
        question = _field(row, 'question', where, 'mmlu')
        choices = tuple(_field(row, 'choices', where, 'mmlu'))
        gold = _int_label(_field(row, 'answer', where, 'mmlu'), where)
      docs.append(Doc(f'{subject}/{i}', question, choices, gold))
  return docs


CONVERTERS: dict[str, Callable[..., list[Doc]]] = {
    'piqa': piqa, 'hellaswag': hellaswag, 'arc_easy': arc, 'arc_challenge': arc,
    'commonsense_qa': commonsense_qa, 'mmlu': mmlu,
}


def convert(task: str, input_path: str, out_path: str, labels: str | None = None) -> int:
  """Converts one dataset file into a task file; returns the number of documents."""
  if task not in CONVERTERS:
    raise TaskFileError(f'no converter for task {task!r}; known: {sorted(CONVERTERS)}')
  return write_tasks(out_path, CONVERTERS[task](input_path, labels))


FLAGS = flags.FlagValues()
_TASK = flags.DEFINE_enum('task', None, sorted(CONVERTERS), 'Which dataset the input is.',
                          required=True, flag_values=FLAGS)
_INPUT = flags.DEFINE_string('input', None, 'The downloaded file (MMLU: a glob of CSVs).',
                             required=True, flag_values=FLAGS)
_LABELS = flags.DEFINE_string('labels', None, "PIQA's labels .lst for the original release.",
                              flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'The task file to write (.jsonl).', required=True,
                           flag_values=FLAGS)


def main(argv):
  del argv
  n = convert(_TASK.value, _INPUT.value, _OUT.value, _LABELS.value)
  print(f'{_TASK.value}: {n} documents -> {_OUT.value}')


if __name__ == '__main__':
  cli.run('downstream.convert', main, FLAGS)
