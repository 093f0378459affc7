"""Downstream task files: validation with file and line, converters, presets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scone_jax.downstream import convert, presets
from scone_jax.downstream.tasks import Doc, TaskFileError, read_tasks, write_tasks
from scone_jax.errors import UserError

GOOD = {'id': 'q1', 'context': 'Why?', 'choices': ['a', 'b'], 'gold': 1}


def _write(tmp_path, lines, name='t.jsonl'):
  path = tmp_path / name
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return str(path)


def test_read_round_trip(tmp_path):
  docs = [Doc('1', 'ctx é', ('x', 'y', 'z'), 2), Doc('2', 'c', ('p', 'q'), 0, 'Answer:')]
  path = str(tmp_path / 'sub' / 'task.jsonl')
  assert write_tasks(path, docs) == 2
  assert read_tasks(path) == docs


@pytest.mark.parametrize('obj,match', [
    ({k: v for k, v in GOOD.items() if k != 'gold'}, r"missing field\(s\) \['gold'\]"),
    ({**GOOD, 'gold': 2}, r'gold=2 is not an index .* \[0, 2\)'),
    ({**GOOD, 'gold': True}, 'gold=True'),
    ({**GOOD, 'choices': ['only']}, '1 choice'),
    ({**GOOD, 'choices': ['a', '']}, 'empty choice'),
    ({**GOOD, 'label': 1}, r"unknown field\(s\) \['label'\]"),
    ({**GOOD, 'context': 3}, 'context must be a string'),
    ([1, 2], 'JSON object'),
])
def test_bad_lines_name_file_line_and_fix(tmp_path, obj, match):
  path = _write(tmp_path, [json.dumps(GOOD).encode(), json.dumps(obj).encode()])
  with pytest.raises(TaskFileError, match=match) as e:
    read_tasks(path)
  assert f'{path}:2:' in str(e.value)
  assert isinstance(e.value, UserError)


def test_invalid_utf8_duplicate_ids_and_bad_json(tmp_path):
  good = json.dumps(GOOD).encode()
  path = _write(tmp_path, [good, good.replace(b'Why?', b'Why\xff?')])
  with pytest.raises(TaskFileError, match=r':2: invalid UTF-8.*UTF-8'):
    read_tasks(path)
  path = _write(tmp_path, [good, b'', good])
  with pytest.raises(TaskFileError, match=r":3: id 'q1' already used on line 1"):
    read_tasks(path)
  path = _write(tmp_path, [b'{"id": 1,'])
  with pytest.raises(TaskFileError, match=':1: not valid JSON'):
    read_tasks(path)
  with pytest.raises(TaskFileError, match='does not exist'):
    read_tasks(str(tmp_path / 'missing.jsonl'))
  with pytest.raises(TaskFileError, match='no documents'):
    read_tasks(_write(tmp_path, [b'  ']))


# ---- converters: one tiny file in each dataset's shipped shape ------------------------

def _jsonl(tmp_path, name, rows):
  path = tmp_path / name
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(path)


def test_piqa_original_with_labels_file_and_hf_parquet(tmp_path):
  rows = [{'goal': 'Dry hair', 'sol1': 'use a towel', 'sol2': 'use water'},
          {'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'bite it'}]
  labels = tmp_path / 'valid-labels.lst'
  labels.write_text('0\n1\n')
  docs = convert.piqa(_jsonl(tmp_path, 'valid.jsonl', rows), str(labels))
  assert docs[1] == Doc('1', 'Open a jar', ('twist the lid', 'bite it'), 1)
  pq.write_table(pa.Table.from_pylist([{**r, 'label': i} for i, r in enumerate(rows)]),
                 tmp_path / 'piqa.parquet')
  assert convert.piqa(str(tmp_path / 'piqa.parquet')) == docs
  labels.write_text('0\n')
  with pytest.raises(TaskFileError, match='1 labels for the 2 rows'):
    convert.piqa(str(tmp_path / 'valid.jsonl'), str(labels))


def test_hellaswag_preprocessing_as_lm_eval(tmp_path):
  row = {'ind': 24, 'activity_label': 'Roof shingle removal',
         'ctx_a': 'A man is sitting on a roof.', 'ctx_b': 'he',
         'endings': ['is using wrap to wrap a pair of skis.', 'starts pulling up roofing '
                     '[title] on a roof.'], 'label': '1'}
  (doc,) = convert.hellaswag(_jsonl(tmp_path, 'hs.jsonl', [row]))
  assert doc.context == 'Roof shingle removal: A man is sitting on a roof. He'
  assert doc.choices[1] == 'starts pulling up roofing. on a roof.'
  assert doc.gold == 1 and doc.id == '24'


def test_arc_and_commonsense_qa_both_shapes(tmp_path):
  nested = {'id': 'Mercury_1', 'question': {'stem': 'Which is a gas?', 'choices': [
      {'label': 'A', 'text': 'ice'}, {'label': 'B', 'text': 'steam'},
      {'label': 'C', 'text': 'rock'}]}, 'answerKey': 'B'}
  flat = {'id': 'Mercury_1', 'question': 'Which is a gas?',
          'choices': {'label': ['1', '2', '3'], 'text': ['ice', 'steam', 'rock']},
          'answerKey': '2'}
  want = Doc('Mercury_1', 'Which is a gas?', ('ice', 'steam', 'rock'), 1)
  assert convert.arc(_jsonl(tmp_path, 'ARC-Easy-Test.jsonl', [nested])) == [want]
  pq.write_table(pa.Table.from_pylist([flat]), tmp_path / 'arc.parquet')
  assert convert.arc(str(tmp_path / 'arc.parquet')) == [want]
  assert convert.commonsense_qa(_jsonl(tmp_path, 'csqa.jsonl', [nested])) == [want]
  with pytest.raises(TaskFileError, match="answerKey 'E' is not one of"):
    convert.arc(_jsonl(tmp_path, 'bad.jsonl', [{**nested, 'answerKey': 'E'}]))
  with pytest.raises(TaskFileError, match="no field 'choices'.*ai2_arc"):
    convert.arc(_jsonl(tmp_path, 'bad2.jsonl', [{'id': 1, 'question': 'q'}]))


def test_mmlu_csv_glob_and_parquet(tmp_path):
  (tmp_path / 'mmlu').mkdir()
  (tmp_path / 'mmlu' / 'anatomy_test.csv').write_text(
      '"What is, here?",a,b,c,d,C\nSecond,e,f,g,h,A\n')
  (tmp_path / 'mmlu' / 'virology_test.csv').write_text('Q,w,x,y,z,D\n')
  docs = convert.mmlu(str(tmp_path / 'mmlu' / '*_test.csv'))
  assert [d.id for d in docs] == ['anatomy/0', 'anatomy/1', 'virology/0']
  assert docs[0] == Doc('anatomy/0', 'What is, here?', ('a', 'b', 'c', 'd'), 2)
  pq.write_table(pa.Table.from_pylist([{'question': 'What is, here?', 'subject': 'anatomy',
                                        'choices': ['a', 'b', 'c', 'd'], 'answer': 2}]),
                 tmp_path / 'mmlu.parquet')
  assert convert.mmlu(str(tmp_path / 'mmlu.parquet')) == docs[:1]
  (tmp_path / 'bad_test.csv').write_text('Q,a,b,E\n')
  with pytest.raises(TaskFileError, match='question, A, B, C, D, answer letter'):
    convert.mmlu(str(tmp_path / 'bad_test.csv'))


def test_convert_writes_a_task_file_and_rejects_unknown_tasks(tmp_path):
  src = _jsonl(tmp_path, 'hs.jsonl', [{'activity_label': 'A', 'ctx_a': 'b', 'ctx_b': 'c',
                                       'endings': ['d', 'e'], 'label': 0}])
  out = str(tmp_path / 'tasks' / 'hellaswag.jsonl')
  assert convert.convert('hellaswag', src, out) == 1
  assert read_tasks(out)[0].context == 'A: b C'
  with pytest.raises(TaskFileError, match='no converter for task'):
    convert.convert('winogrande', src, out)
  (tmp_path / 'bad.jsonl').write_bytes(b'{"goal": "\xff"}\n')
  with pytest.raises(TaskFileError, match=r'bad.jsonl:1: invalid UTF-8'):
    convert.piqa(str(tmp_path / 'bad.jsonl'))


# ---- presets ------------------------------------------------------------------------

DOCS = [Doc(str(i), f'q{i}', ('yes', 'no'), i % 2) for i in range(8)]


def test_olmo_preset_is_zero_shot_cloze():
  (r,) = presets.requests('olmo', 'arc_easy', DOCS[:1])
  assert r.context == 'Question: q0\nAnswer:'
  assert r.continuations == (' yes', ' no')
  assert r.unconditional == 'Answer:'
  (h,) = presets.requests('olmo', 'hellaswag', DOCS[:1])
  assert h.context == 'q0' and h.unconditional == ''
  assert presets.headline('olmo', 'arc_easy') == 'acc_raw'
  assert presets.headline('olmo', 'piqa') == 'acc_per_char'


def test_olmes_preset_takes_five_shots_from_dev_never_the_doc_itself():
  dev = DOCS[:6]
  r = presets.requests('olmes', 'commonsense_qa', [DOCS[2]], dev)[0]
  shots = r.context.split('\n\n')
  assert len(shots) == 6 and shots[-1] == 'Question: q2\nAnswer:'
  assert shots[:5] == [f'Question: q{i}\nAnswer: {DOCS[i].choices[DOCS[i].gold]}'
                       for i in (0, 1, 3, 4, 5)]
  assert presets.headline('olmes', 'commonsense_qa') == 'acc_pmi'
  with pytest.raises(TaskFileError, match='dev split'):
    presets.requests('olmes', 'piqa', DOCS, dev[:3])


def test_unknown_task_or_preset_and_own_unconditional_context():
  with pytest.raises(TaskFileError, match="unknown preset 'olmo2'"):
    presets.requests('olmo2', 'piqa', DOCS)
  with pytest.raises(TaskFileError, match="unknown task 'boolq'"):
    presets.headline('olmo', 'boolq')
  doc = Doc('x', 'q', ('a', 'b'), 0, unconditional_context='Reply:')
  assert presets.requests('olmo', 'piqa', [doc])[0].unconditional == 'Reply:'
