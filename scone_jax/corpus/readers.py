"""Streaming corpus readers: plain text ('lines', 'blank_lines'), JSONL, Parquet and
ArrayRecord (columnar.py: the record layouts), from globs.

A corpus is re-iterable: each pass opens the files again and streams them line by line, so
a corpus larger than RAM works. Every `Document` carries its source ("file:line") so that
errors further down the pipeline (tokenizer training, sharding) can point at the input.
Before a text-format file is read, its first 64 KiB must look like its format
(`check_file_format`): a compressed, columnar or binary file, or JSONL read as 'lines', is
an error naming the file, what it looks like and the fix.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import os
import re
from typing import Iterator

from absl import logging

from scone_jax import artifacts, paths as paths_lib
from scone_jax.corpus import columnar, sft
from scone_jax.corpus.document import CorpusError, Document, json_lines

FORMATS = ('lines', 'blank_lines', 'jsonl', 'parquet', 'arrayrecord', 'arrayrecord_tokens',
           *sft.SFT_FORMATS)
TEXT_FORMATS = ('lines', 'blank_lines', 'jsonl', *sft.SFT_FORMATS)
JSON_FORMATS = ('jsonl', *sft.SFT_FORMATS)
# What a text reader must never read as text: (first bytes, what the file is, the fix).
_MAGIC = (
    (b'\x1f\x8b', 'gzip-compressed data', 'decompress it first (gunzip)'),
    (b'BZh', 'bzip2-compressed data', 'decompress it first (bunzip2)'),
    (b'\xfd7zXZ\x00', 'xz-compressed data', 'decompress it first (unxz)'),
    (b'\x28\xb5\x2f\xfd', 'zstd-compressed data', 'decompress it first (unzstd)'),
    (b'PK\x03\x04', 'a zip archive', 'extract it first (unzip)'),
    (b'PAR1', 'a Parquet file', 'set --config.data.format=parquet'),
    (b'\x83\xafp\xd1\r\x88J?', 'an ArrayRecord file',
     'set --config.data.format=arrayrecord (or arrayrecord_tokens for token ids)'),
)
SNIFF_BYTES = 1 << 16
# Above this share of U+FFFD per decoded character in the first 64 KiB, a file is not
# UTF-8 text (random bytes give ~40%; a UTF-8 file with a few bad bytes, far below 1%).
BAD_UTF8_SHARE = 0.1
_NAME_RE = re.compile(r'^[A-Za-z0-9_.-]+$')
_REPLACEMENT_UTF8 = '\ufffd'.encode()
_SURROGATE_RE = re.compile('[\ud800-\udfff]')


@dataclasses.dataclass
class ReadStats:
  """Counts of one pass over a corpus."""
  docs: int = 0
  bad_utf8_lines: int = 0
  bad_utf8_chars: int = 0  # U+FFFD characters inserted by on_bad_utf8='replace'.
  first_bad_utf8: str = ''


def expand_globs(spec: str, key: str) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated file paths (each glob must match).

  Args:
    spec: e.g. "/data/a*.txt,/data/b.jsonl".
    key: the config key the spec came from, named in errors.
  """
  paths: list[str] = []
  for pattern in (p.strip() for p in spec.split(',')):
    if not pattern:
      continue
    matches = paths_lib.glob(pattern)
    if not matches:
      if glob.has_magic(pattern):
        raise CorpusError(f'{key}: glob {pattern!r} matches no files; fix the pattern or '
                          'the path (globs are comma-separated)')
      raise CorpusError(f'{key}: file {pattern!r} does not exist; fix the path in {key}')
    paths.extend(m for m in matches if m not in paths)
  if not paths:
    raise CorpusError(f'{key} is empty; give comma-separated globs, e.g. '
                      f"--config.{key}='/data/*.txt'")
  return paths


def parse_named_globs(spec: str, key: str = 'data.eval_files') -> dict[str, list[str]]:
  """'name=glob,glob2' -> {name: paths}; an unnamed entry is named after its file stem.

  The stem is the glob's basename up to the first dot (wiki*.txt -> "wiki"), so a
  wildcard-only basename needs an explicit name.
  """
  named: dict[str, list[str]] = {}
  for entry in (e.strip() for e in spec.split(',')):
    if not entry:
      continue
    name, sep, pattern = entry.partition('=')
    if not sep:
      pattern = entry
      name = os.path.basename(pattern).split('.')[0].replace('*', '').replace('?', '')
    name, pattern = name.strip(), pattern.strip()
    if not _NAME_RE.match(name):
      raise CorpusError(f'{key}: cannot use {name!r} as the name of eval corpus {entry!r}; '
                        'name it explicitly as "name=glob" with letters, digits, _ . -')
    if name in named:
      raise CorpusError(f'{key}: two entries are named {name!r}; give them distinct names '
                        'as "name=glob"')
    named[name] = expand_globs(pattern, key)
  return named


class FileCorpus:
  """A re-iterable stream of `Document`s from text, JSONL, Parquet or ArrayRecord files.

  Iterating raises `CorpusError` for invalid JSON, a missing text field, invalid UTF-8
  under on_bad_utf8='error', and, at the end of a pass, for a corpus with no non-empty
  document. `stats` holds the counts of the latest pass.
  """

  def __init__(self, paths: list[str], fmt: str = 'lines', text_field: str = 'text',
               on_bad_utf8: str = 'replace', name: str = 'train',
               source_field: str = '', fingerprint: str = '', check_format: bool = True,
               chat_template: str = ''):
    """Creates the corpus; checks that every file exists.

    Args:
      paths: files, read in this order.
      fmt: one of FORMATS.
      text_field: JSONL key / Parquet column holding the document text.
      on_bad_utf8: 'replace' (U+FFFD, counted) or 'error'.
      name: the split's name, for messages.
      source_field: optional JSONL key holding the document's original source (used by
        the embedded corpus, whose sources are stdlib files).
      fingerprint: overrides the default fingerprint (paths, sizes, mtimes, options).
      check_format: refuse a text-format file whose first 64 KiB look like another format
        (`check_file_format`; config data.check_format).
      chat_template: fmt='chat': a Hugging Face jinja2 chat template ('' = the plain
        template; corpus/sft.py).
    """
    if fmt not in FORMATS:
      raise CorpusError(f'data.format={fmt!r} is not one of {list(FORMATS)}')
    if on_bad_utf8 not in ('replace', 'error'):
      raise CorpusError(f"data.on_bad_utf8={on_bad_utf8!r} must be 'replace' or 'error'")
    for p in paths:
      if not paths_lib.isfile(p):
        raise CorpusError(f'corpus {name!r}: file {p} does not exist; fix the path or glob')
    self.paths = list(paths)
    self.format = fmt
    self.text_field = text_field
    self.on_bad_utf8 = on_bad_utf8
    self.name = name
    self.source_field = source_field
    self._fingerprint = fingerprint
    self.check_format = check_format
    self.chat_template = chat_template
    self.stats = ReadStats()

  @property
  def fingerprint(self) -> str:
    if self._fingerprint:
      return self._fingerprint
    files = [_file_identity(p) for p in self.paths]
    # The template only when set: the fingerprints of existing corpora stay as they were.
    template = (self.chat_template,) if self.chat_template else ()
    return artifacts.fingerprint('file_corpus', self.format, self.text_field,
                                 self.on_bad_utf8, files, *template)

  @property
  def total_file_bytes(self) -> int:
    """Size of the input files: an upper bound on the corpus's UTF-8 text bytes."""
    if self.format == 'parquet':  # Compressed columns: read the uncompressed size.
      return sum(max(columnar.parquet_uncompressed_bytes(p), paths_lib.getsize(p))
                 for p in self.paths)
    return sum(paths_lib.getsize(p) for p in self.paths)

  def __iter__(self) -> Iterator[Document]:
    self.stats = ReadStats()
    read = {'lines': self._lines, 'blank_lines': self._blank_lines, 'jsonl': self._jsonl,
            'parquet': lambda p: columnar.parquet_documents(p, self.text_field),
            'arrayrecord': lambda p: columnar.arrayrecord_text_documents(p, self._decode),
            'arrayrecord_tokens': columnar.arrayrecord_token_documents,
            'sft': lambda p: sft.documents(self._decoded_lines(p), p, 'sft'),
            'chat': lambda p: sft.documents(self._decoded_lines(p), p, 'chat',
                                            self._template())}[self.format]
    for path in self.paths:
      if self.check_format:
        check_file_format(path, self.format)
      for doc in read(path):
        self.stats.docs += 1
        yield doc
    if self.stats.docs == 0:
      raise CorpusError(
          f'corpus {self.name!r} has no non-empty document in {len(self.paths)} file(s) '
          f'({", ".join(self.paths[:3])}{", ..." if len(self.paths) > 3 else ""}) under '
          f'data.format={self.format!r}; check the files or data.format / data.text_field')
    if self.stats.bad_utf8_lines:
      logging.warning('corpus %r: %d line(s) had invalid UTF-8; %d byte sequence(s) '
                      'replaced with U+FFFD (first at %s)', self.name,
                      self.stats.bad_utf8_lines, self.stats.bad_utf8_chars,
                      self.stats.first_bad_utf8)

  def _template(self):
    if not self.chat_template:
      return None
    render = sft.jinja_renderer(self.chat_template)
    return lambda messages: sft.template_spans(render, messages)

  def _decoded_lines(self, path: str) -> Iterator[tuple[int, str]]:
    with paths_lib.path(path).open('rb') as f:
      for lineno, raw in enumerate(f, 1):
        raw = raw.rstrip(b'\r\n')
        try:
          yield lineno, raw.decode('utf-8')
        except UnicodeDecodeError as e:
          yield lineno, self._bad_utf8(raw.decode('utf-8', errors='replace'),
                                       raw.count(_REPLACEMENT_UTF8), f'{path}:{lineno}', e)

  def _decode(self, raw: bytes, where: str) -> str:
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError as e:
      return self._bad_utf8(raw.decode('utf-8', errors='replace'),
                            raw.count(_REPLACEMENT_UTF8), where, e)

  def _bad_utf8(self, text: str, had_replacements: int, where: str, err: Exception) -> str:
    if self.on_bad_utf8 == 'error':
      raise CorpusError(f'{where}: invalid UTF-8 ({err}); fix the file or set '
                        "--config.data.on_bad_utf8=replace to replace bad bytes with U+FFFD")
    self.stats.bad_utf8_lines += 1
    self.stats.bad_utf8_chars += text.count('\ufffd') - had_replacements
    self.stats.first_bad_utf8 = self.stats.first_bad_utf8 or where
    return text

  def _lines(self, path: str) -> Iterator[Document]:
    for lineno, text in self._decoded_lines(path):
      if text.strip():
        yield Document(text, f'{path}:{lineno}')

  def _blank_lines(self, path: str) -> Iterator[Document]:
    block: list[str] = []
    start = 0
    for lineno, text in self._decoded_lines(path):
      if text.strip():
        start = start or lineno
        block.append(text)
      elif block:
        yield Document('\n'.join(block), f'{path}:{start}')
        block, start = [], 0
    if block:
      yield Document('\n'.join(block), f'{path}:{start}')

  def _jsonl(self, path: str) -> Iterator[Document]:
    for where, record in json_lines(self._decoded_lines(path), path, 'fix the line, or set '
                                    'data.format if the file is not JSONL'):
      if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f'{where}: no string field {self.text_field!r} (found {keys}); '
                          'set --config.data.text_field to the key holding the text')
      text = record[self.text_field]
      try:
        text.encode('utf-8')
      except UnicodeEncodeError as e:  # Lone surrogates from "\ud800"-style JSON escapes.
        text = self._bad_utf8(_SURROGATE_RE.sub('\ufffd', text), text.count('\ufffd'),
                              where, e)
      if text.strip():
        if self.source_field and isinstance(record.get(self.source_field), str):
          where = record[self.source_field]
        yield Document(text, where)


def check_file_format(path: str, fmt: str) -> None:
  """Raises CorpusError when a text-format file's first 64 KiB are not what `fmt` reads.

  Compressed, archived or columnar files (by their magic bytes), binary data (NUL bytes)
  and mostly-invalid UTF-8 would otherwise train on U+FFFD and noise, and a JSONL file read
  as 'lines' / 'blank_lines' would train on JSON syntax. These are errors, not warnings:
  the run's numbers would be meaningless. A corpus of JSON text on purpose opts out with
  data.check_format=False. Other formats are checked by their own readers.
  """
  if fmt not in TEXT_FORMATS:
    return
  with paths_lib.path(path).open('rb') as f:
    head = f.read(SNIFF_BYTES)
  where = f'{path} (data.format={fmt!r})'
  for magic, what, fix in _MAGIC:
    if head.startswith(magic):
      raise CorpusError(f'{where}: the file starts like {what}, not UTF-8 text; {fix}')
  if b'\x00' in head:
    raise CorpusError(f'{where}: NUL bytes in the first 64 KiB: binary data, not UTF-8 text;'
                      ' convert it to text, or set data.format to its format '
                      f'({", ".join(f for f in FORMATS if f not in TEXT_FORMATS)})')
  # Incremental decode: a character cut at the 64 KiB boundary is not an error.
  text = codecs.getincrementaldecoder('utf-8')('replace').decode(head, final=False)
  bad = text.count('\ufffd') - head.count(_REPLACEMENT_UTF8)
  if text and bad / len(text) > BAD_UTF8_SHARE:
    raise CorpusError(f'{where}: {bad / len(text):.0%} of the first 64 KiB is invalid UTF-8: '
                      'compressed, binary or another text encoding; decompress it, or '
                      'convert it to UTF-8 (iconv -f <encoding> -t utf-8)')
  if fmt not in JSON_FORMATS:
    lines = head.split(b'\n')
    if len(head) == SNIFF_BYTES:
      lines = lines[:-1]  # Cut at the boundary.
    lines = [line for line in lines if line.strip()]
    if lines and all(_is_json_object(line) for line in lines):
      raise CorpusError(f'{where}: every line of the first 64 KiB is a JSON object: this is '
                        f'JSONL, and data.format={fmt!r} would train on its JSON syntax; set '
                        '--config.data.format=jsonl (and --config.data.text_field to the '
                        'text key), or --config.data.check_format=False to train on the JSON '
                        'text as is')


def _is_json_object(line: bytes) -> bool:
  if not line.lstrip().startswith(b'{'):
    return False
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


def _file_identity(path: str) -> tuple[str, int, int]:
  """(location, size, mtime) of a corpus file: what its fingerprint changes with."""
  if paths_lib.is_remote(path):
    st = paths_lib.path(path).stat()
    return path, int(st.length), int(st.mtime)
  st = os.stat(path)
  return os.path.abspath(path), st.st_size, st.st_mtime_ns


def files_corpus(globs: str, key: str, fmt: str, text_field: str, on_bad_utf8: str,
                 name: str, check_format: bool = True, chat_template: str = '') -> FileCorpus:
  """A FileCorpus from comma-separated globs (the config's data.train_files form)."""
  return FileCorpus(expand_globs(globs, key), fmt, text_field, on_bad_utf8, name,
                    check_format=check_format, chat_template=chat_template)
