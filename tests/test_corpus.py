"""Corpus readers (each format, globs, names, bad input) and the embedded stdlib corpus."""

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import zipfile

import pytest

from scone_jax import artifacts
from scone_jax.corpus import (CorpusError, FileCorpus, build_embedded, embedded,
                              expand_globs, files_corpus, open_embedded, parse_named_globs)


def _write(path, data):
  with open(path, 'wb') as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return str(path)


def _texts(corpus):
  return [(d.text, d.source) for d in corpus]


def test_lines_format_skips_blank_lines_and_names_sources(tmp_path):
  p = _write(tmp_path / 'a.txt', 'first doc\n\n  \nsecond doc\r\nthird\n')
  assert _texts(FileCorpus([p], 'lines')) == [
      ('first doc', f'{p}:1'), ('second doc', f'{p}:4'), ('third', f'{p}:5')]


def test_blank_lines_format_joins_paragraph_lines(tmp_path):
  p = _write(tmp_path / 'a.txt', '\n\npara one\nstill one\n\n\n\npara two\n  \nthree')
  assert _texts(FileCorpus([p], 'blank_lines')) == [
      ('para one\nstill one', f'{p}:3'), ('para two', f'{p}:8'), ('three', f'{p}:10')]


def test_jsonl_format_reads_text_field(tmp_path):
  p = _write(tmp_path / 'a.jsonl', '\n'.join([
      json.dumps({'body': 'héllo\nworld', 'id': 1}), '', json.dumps({'body': ''}),
      json.dumps({'body': 'two'})]))
  assert _texts(FileCorpus([p], 'jsonl', text_field='body')) == [
      ('héllo\nworld', f'{p}:1'), ('two', f'{p}:4')]


def test_bad_jsonl_names_file_and_line(tmp_path):
  p = _write(tmp_path / 'a.jsonl', '{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(CorpusError, match=f'{p}:2: invalid JSON'):
    list(FileCorpus([p], 'jsonl'))
  q = _write(tmp_path / 'b.jsonl', '{"text": "ok"}\n{"content": "x"}\n')
  with pytest.raises(CorpusError, match=f"{q}:2: no string field 'text'.*data.text_field"):
    list(FileCorpus([q], 'jsonl'))


def test_globs_sorted_deduplicated_and_multiple(tmp_path):
  for name in ('b.txt', 'a.txt', 'c.log'):
    _write(tmp_path / name, name + '\n')
  spec = f'{tmp_path}/*.txt, {tmp_path}/a.txt,{tmp_path}/c.log'
  paths = expand_globs(spec, 'data.train_files')
  assert [os.path.basename(p) for p in paths] == ['a.txt', 'b.txt', 'c.log']
  corpus = files_corpus(spec, 'data.train_files', 'lines', 'text', 'replace', 'train')
  assert [d.text for d in corpus] == ['a.txt', 'b.txt', 'c.log']


def test_glob_matching_nothing_and_missing_file_are_clear(tmp_path):
  with pytest.raises(CorpusError, match=r'data.train_files: glob .*nope\*.txt.* matches no'):
    expand_globs(f'{tmp_path}/nope*.txt', 'data.train_files')
  with pytest.raises(CorpusError, match=r'file .*missing.txt.* does not exist'):
    expand_globs(f'{tmp_path}/missing.txt', 'data.train_files')
  with pytest.raises(CorpusError, match='does not exist'):
    FileCorpus([str(tmp_path / 'gone.txt')])


def test_named_eval_entries(tmp_path):
  _write(tmp_path / 'wiki.1.txt', 'x\n')
  _write(tmp_path / 'wiki.2.txt', 'y\n')
  _write(tmp_path / 'code.jsonl', '{}\n')
  named = parse_named_globs(f'{tmp_path}/wiki.*.txt,src={tmp_path}/code.jsonl')
  assert list(named) == ['wiki', 'src']
  assert [os.path.basename(p) for p in named['wiki']] == ['wiki.1.txt', 'wiki.2.txt']
  with pytest.raises(CorpusError, match="two entries are named 'wiki'"):
    parse_named_globs(f'{tmp_path}/wiki.1.txt,wiki={tmp_path}/code.jsonl')
  with pytest.raises(CorpusError, match='name it explicitly'):
    parse_named_globs(f'{tmp_path}/*.txt')


def test_bad_utf8_replace_counts_and_error_names_line(tmp_path):
  p = _write(tmp_path / 'a.txt', b'good\nbad \xff\xfe here\nok \xef\xbf\xbd kept\n')
  corpus = FileCorpus([p], 'lines', on_bad_utf8='replace')
  assert [d.text for d in corpus] == ['good', 'bad \ufffd\ufffd here', 'ok \ufffd kept']
  assert (corpus.stats.bad_utf8_lines, corpus.stats.bad_utf8_chars) == (1, 2)
  assert corpus.stats.first_bad_utf8 == f'{p}:2'
  with pytest.raises(CorpusError, match=f'{p}:2: invalid UTF-8.*on_bad_utf8=replace'):
    list(FileCorpus([p], 'lines', on_bad_utf8='error'))


def test_jsonl_lone_surrogate_is_bad_utf8(tmp_path):
  p = _write(tmp_path / 'a.jsonl', '{"text": "a\\ud800b"}\n')
  corpus = FileCorpus([p], 'jsonl')
  assert [d.text for d in corpus] == ['a\ufffdb']
  assert corpus.stats.bad_utf8_chars == 1
  with pytest.raises(CorpusError, match=f'{p}:1: invalid UTF-8'):
    list(FileCorpus([p], 'jsonl', on_bad_utf8='error'))


def test_empty_corpus_is_an_error(tmp_path):
  p = _write(tmp_path / 'a.txt', '\n   \n\n')
  with pytest.raises(CorpusError, match="corpus 'train' has no non-empty document"):
    list(FileCorpus([p], 'lines'))


def test_streams_without_reading_whole_files(tmp_path):
  p = _write(tmp_path / 'a.txt', ''.join(f'doc {i}\n' for i in range(1000)))
  it = iter(FileCorpus([p], 'lines'))
  assert next(it).text == 'doc 0'
  # A pass is lazy: the file is still open mid-iteration, consumed line by line.
  assert next(it).text == 'doc 1'


def test_fingerprint_tracks_file_changes(tmp_path):
  p = _write(tmp_path / 'a.txt', 'one\n')
  fp = FileCorpus([p]).fingerprint
  assert FileCorpus([p]).fingerprint == fp
  assert FileCorpus([p], 'blank_lines').fingerprint != fp
  _write(p, 'one two\n')
  assert FileCorpus([p]).fingerprint != fp


def test_normalise_and_module_names():
  assert embedded.normalise('  a\n   b  \n\n\n  c\td \n') == 'a b\n\nc d'
  assert embedded.module_name(os.path.join('json', '__init__.py')) == 'json'
  assert embedded.module_name(os.path.join('json', 'decoder.py')) == 'json.decoder'
  src = b'"""Mod."""\nclass A:\n  """Cls\n\n  doc."""\n  def f(self):\n    """Fn."""\n'
  assert list(embedded.docstrings(src)) == [(1, 'Mod.'), (2, 'Cls\n\ndoc.'), (6, 'Fn.')]


# Building from the first files keeps the fixture fast; the full build takes ~3 s.
_SUBSET = 120


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp('emb')
  return build_embedded(str(out / 'corpus'), 0.2, max_files=_SUBSET)


def test_embedded_split_is_by_module_and_disjoint(built):
  files = embedded.stdlib_files(max_files=_SUBSET)
  train = [json.loads(line) for line in open(os.path.join(built.directory, 'train.jsonl'))]
  held = [json.loads(line) for line in open(os.path.join(built.directory, 'eval.jsonl'))]
  module_of = lambda r: embedded.module_name(r['source'].rsplit(':', 1)[0])
  train_mods, held_mods = {module_of(r) for r in train}, {module_of(r) for r in held}
  assert train_mods and held_mods and not train_mods & held_mods
  expected_held = {embedded.module_name(f) for f, _ in files
                   if embedded.is_eval_module(embedded.module_name(f), 0.2)}
  assert held_mods <= expected_held
  for split, records in (('train', train), ('eval', held)):
    assert built.sizes[split]['documents'] == len(records)
    assert built.sizes[split]['chars'] == sum(len(r['text']) for r in records)
    assert built.sizes[split]['bytes'] == sum(len(r['text'].encode()) for r in records)
  assert [d.text for d in built.split('eval')] == [r['text'] for r in held]
  # Sources point into the stdlib for error messages.
  assert next(iter(built.split('train'))).source == train[0]['source']


def test_embedded_is_deterministic_and_cached(built, tmp_path):
  again = build_embedded(str(tmp_path / 'corpus'), 0.2, max_files=_SUBSET)
  assert again.fingerprint == built.fingerprint
  for name in ('train.jsonl', 'eval.jsonl'):
    with open(os.path.join(built.directory, name), 'rb') as a, \
        open(os.path.join(again.directory, name), 'rb') as b:
      assert a.read() == b.read()
  mtime = os.path.getmtime(os.path.join(again.directory, 'train.jsonl'))
  build_embedded(str(tmp_path / 'corpus'), 0.2, max_files=_SUBSET)  # Cache hit.
  assert os.path.getmtime(os.path.join(again.directory, 'train.jsonl')) == mtime
  assert open_embedded(again.directory, 0.2, max_files=_SUBSET).sizes == again.sizes
  with pytest.raises(artifacts.ArtifactError, match='fingerprint'):
    open_embedded(again.directory, 0.3, max_files=_SUBSET)


def test_embedded_skips_tests_and_unparsable(tmp_path):
  root = tmp_path / 'stdlib'
  for rel, text in (('good.py', '"""Good."""'), ('bad.py', 'def (:\n'),
                    ('test/t.py', '"""No."""'), ('pkg/tests/t.py', '"""No."""'),
                    ('site-packages/x.py', '"""No."""'), ('pkg/__init__.py', '"""Pkg."""')):
    os.makedirs(os.path.dirname(root / rel), exist_ok=True)
    _write(root / rel, text)
  assert [f for f, _ in embedded.stdlib_files(str(root))] == [
      'bad.py', 'good.py', os.path.join('pkg', '__init__.py')]
  u = {m: int(hashlib.sha256(m.encode()).hexdigest()[:12], 16) / 2**48
       for m in ('good', 'pkg')}
  fraction = sum(u.values()) / 2  # The lower-hashed module is held out.
  held, kept = sorted(u, key=u.get)
  assert embedded.is_eval_module(held, fraction)
  assert not embedded.is_eval_module(kept, fraction)
  built = build_embedded(str(tmp_path / 'out'), fraction, root=str(root))
  docs = {'good': 'Good.', 'pkg': 'Pkg.'}
  assert [d.text for d in built.split('train')] == [docs[kept]]
  assert [d.text for d in built.split('eval')] == [docs[held]]
  manifest = artifacts.read_manifest(built.directory, embedded.KIND)
  assert manifest['unparsable_files'] == ['bad.py']


# --- a file must look like its data.format (readers.check_file_format) ------------------


def _compressed(kind, data):
  if kind == 'gzip':
    return gzip.compress(data)
  if kind == 'bzip2':
    return bz2.compress(data)
  if kind == 'xz':
    return lzma.compress(data)
  if kind == 'zip':
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
      z.writestr('train.txt', data)
    return buf.getvalue()
  raise ValueError(kind)


_TEXT = ('the quick brown fox jumps over the lazy dog\n' * 400).encode()


@pytest.mark.parametrize('kind,names', [('gzip', 'gzip-compressed'),
                                        ('bzip2', 'bzip2-compressed'),
                                        ('xz', 'xz-compressed'), ('zip', 'zip archive')])
@pytest.mark.parametrize('fmt', ['lines', 'jsonl'])
def test_compressed_files_are_named_not_read_as_text(tmp_path, kind, names, fmt):
  p = _write(tmp_path / 'train.txt', _compressed(kind, _TEXT))
  with pytest.raises(CorpusError, match=rf'{p}.*starts like .*{names}.*(decompress|extract) '
                     'it first'):
    list(FileCorpus([p], fmt))


def test_columnar_and_zstd_magic_name_the_format(tmp_path):
  from scone_jax.corpus import columnar
  ar = str(tmp_path / 'data.ar')
  columnar.write_arrayrecord(ar, [b'hello world'] * 3)
  with pytest.raises(CorpusError, match='ArrayRecord file.*data.format=arrayrecord'):
    list(FileCorpus([ar], 'lines'))
  pq = _write(tmp_path / 'x.txt', b'PAR1' + bytes(range(256)) * 4)
  with pytest.raises(CorpusError, match='Parquet file.*data.format=parquet'):
    list(FileCorpus([pq], 'blank_lines'))
  zst = _write(tmp_path / 'y.txt', b'\x28\xb5\x2f\xfd' + b'x' * 100)
  with pytest.raises(CorpusError, match='zstd-compressed.*unzstd'):
    list(FileCorpus([zst], 'lines'))


def test_binary_and_non_utf8_text_are_refused(tmp_path):
  nul = _write(tmp_path / 'nul.txt', b'some text\n\x00\x01\x02 binary\n')
  with pytest.raises(CorpusError, match=f'{nul}.*NUL bytes.*binary data'):
    list(FileCorpus([nul], 'lines'))
  rng = random.Random(0)
  noise = bytes(rng.randrange(128, 256) for _ in range(5000)).replace(b'\n', b' ')
  bad = _write(tmp_path / 'latin.txt', b'ok line\n' + noise)
  with pytest.raises(CorpusError, match=r'\d+% of the first 64 KiB is invalid UTF-8.*iconv'):
    list(FileCorpus([bad], 'lines'))
  # A few bad bytes in a text file stay what they were: replaced and counted.
  few = _write(tmp_path / 'few.txt', _TEXT + b'caf\xe9\n')
  corpus = FileCorpus([few], 'lines')
  assert len(list(corpus)) == 401 and corpus.stats.bad_utf8_chars == 1


def test_jsonl_read_as_lines_is_refused_unless_opted_out(tmp_path):
  rows = [json.dumps({'text': f'document {i} body', 'id': i}) for i in range(50)]
  p = _write(tmp_path / 'train.txt', '\n'.join(rows) + '\n')
  for fmt in ('lines', 'blank_lines'):
    with pytest.raises(CorpusError, match='is a JSON object.*data.format=jsonl'):
      list(FileCorpus([p], fmt))
  assert [d.text for d in FileCorpus([p], 'jsonl')][:1] == ['document 0 body']
  # JSON text on purpose: check_format=False reads the lines as they are.
  assert len(list(FileCorpus([p], 'lines', check_format=False))) == 50
  # One plain line among the JSON ones: a text file that quotes JSON is left alone.
  mixed = _write(tmp_path / 'mixed.txt', 'a plain line\n' + '\n'.join(rows) + '\n')
  assert len(list(FileCorpus([mixed], 'lines'))) == 51


def test_format_check_reads_only_the_head(tmp_path):
  # A long text file whose 64 KiB boundary cuts a multi-byte character and a line.
  body = ('naïve café über ' * 20 + '\n').encode() * 400
  assert len(body) > 2 * 65536
  p = _write(tmp_path / 'long.txt', body)
  corpus = FileCorpus([p], 'lines')
  assert len(list(corpus)) == 400 and corpus.stats.bad_utf8_chars == 0
