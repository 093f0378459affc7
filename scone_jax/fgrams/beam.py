"""Exact f-gram mining as an Apache Beam pipeline: the same table as `mine_fgrams`.

One pipeline with one CombinePerKey(sum) pass per length n = 2..K over n-grams as tuple
keys. Scan n receives the kept (n-1)-grams as a side input (AsSingleton of a set) and
emits only n-grams whose (n-1)-prefix AND (n-1)-suffix are in it (Apriori, as in
mine.py). The kept grams of all lengths are written out and ranked on the launcher by
`mine.rank_fgrams`, the one ranking shared with the local miner, so both produce the same
table. apache_beam is imported only when this function runs.

Input: an iterable of documents (1-D integer arrays; fine for small corpora, they are
shipped with the pipeline), or one or more file patterns of text files with one document
per line as whitespace-separated token ids (what a distributed runner should read).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

import numpy as np

from scone_jax.fgrams import mine
from scone_jax.fgrams.table import FgramTable


def _parse_line(line: str) -> tuple[int, ...]:
  try:
    doc = tuple(int(t) for t in line.split())
  except ValueError as e:
    raise ValueError(f'token file line {line[:80]!r} is not whitespace-separated integer '
                     'token ids') from e
  if doc and (min(doc) < 0 or max(doc) >= mine.TOKEN_LIMIT):
    raise ValueError(f'token file line {line[:80]!r} has token ids outside [0, 2**31)')
  return doc


def _emit_grams(doc: tuple[int, ...], n: int, kept_shorter: frozenset | None):
  """(n-gram, 1) for each n-gram of `doc` whose prefix and suffix were kept."""
  for i in range(len(doc) - n + 1):
    gram = doc[i:i + n]
    if kept_shorter is None or (gram[:-1] in kept_shorter and gram[1:] in kept_shorter):
      yield gram, 1


def _read_json_lines(pattern: str) -> list[Any]:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  rows = []
  for match in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(match.path) as f:
      rows.extend(json.loads(line) for line in f.read().decode().splitlines() if line)
  return rows


def mine_fgrams_beam(docs_or_paths: Iterable[np.ndarray] | str | list[str],
                     max_len: int = 5, size: int = 100_000, min_count: int = 5,
                     runner: str = 'DirectRunner', pipeline_options: Any = None, *,
                     output_dir: str | None = None) -> FgramTable:
  """Mines the top `size` f-grams with Apache Beam; equal to `mine_fgrams` on the same docs.

  Args:
    docs_or_paths: documents (1-D integer arrays), or a file pattern (or list of them) of
      text files holding one document per line as whitespace-separated token ids.
    max_len: K, the longest f-gram (>= 2).
    size: S, the number of f-grams kept.
    min_count: the least count of a kept f-gram.
    runner: the Beam runner name.
    pipeline_options: a `PipelineOptions` (or None for defaults).
    output_dir: where the pipeline writes the kept grams (must be reachable by the
      workers and by this process, e.g. gs://... for Dataflow); default a local temp dir.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top

  class _SetCombineFn(beam.CombineFn):
    """The set of all elements (a side input for the Apriori filter)."""

    def create_accumulator(self):
      return set()

    def add_input(self, accumulator, element):
      accumulator.add(element)
      return accumulator

    def merge_accumulators(self, accumulators):
      return set().union(*accumulators)

    def extract_output(self, accumulator):
      return frozenset(accumulator)

  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  mine.check_args(max_len, size, min_count)
  with tempfile.TemporaryDirectory(prefix='scone_fgrams_beam_') as local_tmp:
    out = output_dir or local_tmp
    options = pipeline_options or PipelineOptions([])  # Not sys.argv.
    with beam.Pipeline(runner=runner, options=options) as pipeline:
      if _is_patterns(docs_or_paths):
        patterns = [docs_or_paths] if isinstance(docs_or_paths, str) else docs_or_paths
        docs = ([pipeline | f'Read{i}' >> beam.io.ReadFromText(p)
                 for i, p in enumerate(patterns)] | 'Files' >> beam.Flatten()
                | 'Parse' >> beam.Map(_parse_line))
      else:
        docs = pipeline | 'Docs' >> beam.Create(_validated_docs(docs_or_paths))
      (docs | 'Bigrams' >> beam.Map(lambda d: max(len(d) - 1, 0))
       | 'Total' >> beam.CombineGlobally(sum) | 'TotalJson' >> beam.Map(json.dumps)
       | 'WriteTotal' >> beam.io.WriteToText(os.path.join(out, 'total')))
      kept_all, kept_set = [], None
      for n in range(2, max_len + 1):
        side = beam.pvalue.AsSingleton(kept_set) if kept_set is not None else None
        kept = (docs | f'Grams{n}' >> beam.FlatMap(_emit_grams, n, side)
                | f'Count{n}' >> beam.CombinePerKey(sum)
                | f'Keep{n}' >> beam.Filter(lambda kv: kv[1] >= min_count))
        kept_all.append(kept)
        kept_set = (kept | f'Keys{n}' >> beam.Keys()
                    | f'Set{n}' >> beam.CombineGlobally(_SetCombineFn()))
      (kept_all | 'AllKept' >> beam.Flatten()
       | 'Json' >> beam.Map(lambda kv: json.dumps([list(kv[0]), kv[1]]))
       | 'Write' >> beam.io.WriteToText(os.path.join(out, 'kept')))
    total = sum(_read_json_lines(os.path.join(out, 'total*')))
    kept_rows = _read_json_lines(os.path.join(out, 'kept*'))
  if total == 0:
    raise ValueError('docs contain no n-gram of 2+ tokens (empty corpus, or only '
                     'documents of 0-1 tokens); pass tokenized documents')
  if not kept_rows:
    raise ValueError(f'no n-gram of 2..{max_len} tokens occurs min_count={min_count} times '
                     'in docs; lower min_count or mine a larger corpus')
  tokens_MxK = np.zeros((len(kept_rows), max_len), np.int32)
  for i, (gram, _) in enumerate(kept_rows):
    tokens_MxK[i, :len(gram)] = gram
  lengths_M = np.array([len(g) for g, _ in kept_rows], np.int32)
  counts_M = np.array([c for _, c in kept_rows], np.int64)
  top = mine.rank_fgrams(tokens_MxK, lengths_M, counts_M, size)
  return FgramTable(tokens_MxK[top], counts_M[top], lengths_M[top], max_len=max_len,
                    min_count=min_count)


def _is_patterns(docs_or_paths: Any) -> bool:
  return isinstance(docs_or_paths, str) or (
      isinstance(docs_or_paths, (list, tuple)) and bool(docs_or_paths) and
      all(isinstance(p, str) for p in docs_or_paths))


def _validated_docs(docs: Iterable[np.ndarray]) -> list[tuple[int, ...]]:
  out = []
  for i, doc in enumerate(docs):
    doc = np.asarray(doc)
    if doc.ndim != 1:
      raise ValueError(f'docs[{i}] has shape {doc.shape}; each document must be a 1-D '
                       'integer array')
    if doc.size:
      mine.check_tokens(doc, f'docs[{i}]')
    out.append(tuple(doc.tolist()))
  return out
