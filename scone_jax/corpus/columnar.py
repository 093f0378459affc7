"""Parquet and ArrayRecord corpus files (OpenWebText / FineWeb / Dolma exports, grain's format).

Record layouts (data.format):
  * 'parquet': one document per row, its text in the string column `data.text_field`
    (e.g. 'text'); null rows and empty strings are skipped. Files are streamed in record
    batches of at most `PARQUET_BATCH_ROWS` rows, one row group at a time, so memory is
    bounded by a batch, not by the file.
  * 'arrayrecord': one document per record, the record's bytes are its UTF-8 text.
  * 'arrayrecord_tokens': one document per record, already tokenized: the record's bytes are
    its token ids as little-endian uint32 (`np.asarray(ids, '<u4').tobytes()`), without
    BOS/EOS (the packer adds BOS). The ids must come from the tokenizer named in
    tokenizer.model_file; prepare checks every id against its vocab size and decodes the
    documents once to count their bytes (for bits per byte).
Sources in messages are "path:row N" / "path:record N" (0-based).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from scone_jax.corpus.document import CorpusError, Document

PARQUET_BATCH_ROWS = 1024
ARRAYRECORD_BATCH = 1024
TOKEN_DTYPE = np.dtype('<u4')


def parquet_documents(path: str, text_field: str) -> Iterator[Document]:
  """Documents of one Parquet file, streamed by row group."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise CorpusError(f'{path}: not a readable Parquet file ({e}); fix the file or set '
                      'data.format to its format') from e
  names = pf.schema_arrow.names
  if text_field not in names:
    raise CorpusError(f'{path}: no column {text_field!r} (columns: {names}); set '
                      '--config.data.text_field to the column holding the text')
  field_type = pf.schema_arrow.field(text_field).type
  if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
    raise CorpusError(f'{path}: column {text_field!r} has type {field_type}, not string; set '
                      '--config.data.text_field to the text column')
  row = 0
  for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
    for text in batch.column(0).to_pylist():
      if text and text.strip():
        yield Document(text, f'{path}:row {row}')
      row += 1


def parquet_uncompressed_bytes(path: str) -> int:
  """Uncompressed size of a Parquet file's row groups (all columns), from its footer.

  The file size understates the text of a compressed file several-fold, and the tokenizer's
  sampling rate (train_chars / corpus bytes) needs an upper bound on the text bytes.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  meta = pq.ParquetFile(path).metadata
  return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def _arrayrecord_records(path: str) -> Iterator[tuple[int, bytes]]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except (RuntimeError, ValueError, OSError) as e:
    raise CorpusError(f'{path}: not a readable ArrayRecord file ({e}); fix the file or set '
                      'data.format to its format') from e
  try:
    n = reader.num_records()
    for start in range(0, n, ARRAYRECORD_BATCH):
      for i, record in enumerate(reader.read(start, min(start + ARRAYRECORD_BATCH, n))):
        yield start + i, record
  finally:
    reader.close()


def arrayrecord_text_documents(path: str,
                               decode: Callable[[bytes, str], str]) -> Iterator[Document]:
  """Documents of one ArrayRecord file of UTF-8 records.

  Args:
    path: the file.
    decode: (record bytes, source) -> text; applies data.on_bad_utf8.
  """
  for i, record in _arrayrecord_records(path):
    where = f'{path}:record {i}'
    text = decode(record, where)
    if text.strip():
      yield Document(text, where)


def arrayrecord_token_documents(path: str) -> Iterator[Document]:
  """Documents of one ArrayRecord file of little-endian uint32 token-id records."""
  for i, record in _arrayrecord_records(path):
    where = f'{path}:record {i}'
    if len(record) % TOKEN_DTYPE.itemsize:
      raise CorpusError(f'{where}: {len(record)} bytes is not a whole number of uint32 token '
                        "ids; records of data.format='arrayrecord_tokens' are little-endian "
                        "uint32 arrays (use data.format='arrayrecord' for UTF-8 text)")
    if record:
      yield Document('', where, ids=np.frombuffer(record, TOKEN_DTYPE))


def write_arrayrecord(path: str, records: list[bytes]) -> None:
  """Writes records to an ArrayRecord file (for tests and small conversions)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()
