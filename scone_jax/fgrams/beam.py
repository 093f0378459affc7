"""Exact f-gram mining as an Apache Beam pipeline: the same table as `mine_fgrams`.

The pipeline holds no set of kept grams anywhere, so a worker's memory does not grow with
S or with the corpus (only with a bundle's partial counts and one key's group):

  read      token shards (a TokenShards directory) are split into document ranges that
            workers read in parallel from the memory-mapped files (or: text files of
            whitespace-separated token ids, or a small in-memory list of documents);
  count n   for n = 2..K: every n-gram of every document, CombinePerKey(sum) (combiner
            lifting sums per bundle before the shuffle), then count >= min_count;
  Apriori   for n >= 3 a keyed join, not a side input: CoGroupByKey of the counted
            n-grams keyed by their (n-1)-prefix with the kept (n-1)-grams, then the same
            by their (n-1)-suffix. (A gram's prefix and suffix count at least as often,
            so the join never drops a gram that reached min_count; it keeps the table
            closed under prefixes and suffixes by construction, as mine.py does.)
  top S     a histogram of the kept grams' counts (one small dict: distinct count
            values), from which the cutoff count c (the S-th largest) follows; only grams
            with count >= c are written, and the launcher makes the exact cut among them
            with the documented tie-break (`mine.rank_fgrams`).

Counting every n-gram before the join shuffles more keys than the local miner, which
prunes before it counts; combiner lifting keeps the shuffle to distinct grams per bundle.

Runs unchanged on any Beam runner. On Dataflow (token shards and output in a bucket):
  mine_fgrams_beam('gs://B/art/train_shards', runner='DataflowRunner',
                   pipeline_options=PipelineOptions(['--project=P', '--region=R',
                       '--temp_location=gs://B/tmp', '--max_num_workers=32',
                       '--setup_file=./setup.py']), output_dir='gs://B/tmp/fgrams')
(the launcher then reads the gs:// outputs; token-shard ranges are read through
FileSystems-compatible paths once the shards live in the bucket). Tests run it on the
DirectRunner in multi-process mode (direct_num_workers=2,
direct_running_mode='multi_processing').
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from typing import Any, Iterable

import numpy as np

from scone_jax.fgrams import mine
from scone_jax.fgrams.table import FgramTable

_DOCS_PER_RANGE = 4096


def _parse_line(line: str) -> tuple[int, ...]:
  try:
    doc = tuple(int(t) for t in line.split())
  except ValueError as e:
    raise ValueError(f'token file line {line[:80]!r} is not whitespace-separated integer '
                     'token ids') from e
  if doc and (min(doc) < 0 or max(doc) >= mine.TOKEN_LIMIT):
    raise ValueError(f'token file line {line[:80]!r} has token ids outside [0, 2**31)')
  return doc


def _read_range(spec: tuple[str, str, int, int]):
  """Documents lo..hi-1 of a TokenShards directory, as token tuples (mapped, not loaded)."""
  directory, dtype, lo, hi = spec
  offsets = np.load(os.path.join(directory, 'offsets.npy'), mmap_mode='r')
  tokens = np.memmap(os.path.join(directory, 'tokens.bin'), dtype=dtype, mode='r')
  bounds = np.asarray(offsets[lo:hi + 1])
  block = np.asarray(tokens[bounds[0]:bounds[-1]]).astype(np.int64)
  mine.check_tokens(block, f'{directory} documents {lo}..{hi - 1}')
  for a, b in zip(bounds[:-1] - bounds[0], bounds[1:] - bounds[0]):
    yield tuple(block[a:b].tolist())


def _ngrams(doc: tuple[int, ...], n: int):
  for i in range(len(doc) - n + 1):
    yield doc[i:i + n], 1


def _joined(keyed):
  """CoGroupByKey output -> the grams whose key (prefix or suffix) is a kept gram."""
  _, groups = keyed
  if groups['kept']:
    yield from groups['grams']


def _histogram_add(hist: dict, count: int) -> dict:
  hist[count] = hist.get(count, 0) + 1
  return hist


def _cutoff(hist: dict, size: int) -> int:
  """The size-th largest count (0 if fewer grams were kept): every gram above it is in
  the table, grams equal to it compete by the tie-break."""
  above = 0
  for count in sorted(hist, reverse=True):
    above += hist[count]
    if above >= size:
      return count
  return 0


def _read_json_lines(pattern: str) -> list[Any]:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  rows = []
  for match in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(match.path) as f:
      rows.extend(json.loads(line) for line in f.read().decode().splitlines() if line)
  return rows


def mine_fgrams_beam(docs_or_paths: Iterable[np.ndarray] | str | list[str] | Any,
                     max_len: int = 5, size: int = 100_000, min_count: int = 5,
                     runner: str = 'DirectRunner', pipeline_options: Any = None, *,
                     output_dir: str | None = None) -> FgramTable:
  """Mines the top `size` f-grams with Apache Beam; equal to `mine_fgrams` on the same docs.

  Args:
    docs_or_paths: a TokenShards (read by document ranges from its directory), a file
      pattern (or list of them) of text files holding one document per line as
      whitespace-separated token ids, or a list of documents (1-D integer arrays; shipped
      with the pipeline, for small corpora).
    max_len: K, the longest f-gram (>= 2).
    size: S, the number of f-grams kept.
    min_count: the least count of a kept f-gram.
    runner: the Beam runner name.
    pipeline_options: a `PipelineOptions` (or None for defaults).
    output_dir: where the pipeline writes the kept grams (must be reachable by the
      workers and by this process, e.g. gs://... for Dataflow); default a local temp dir.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  mine.check_args(max_len, size, min_count)
  with tempfile.TemporaryDirectory(prefix='scone_fgrams_beam_') as local_tmp:
    out = output_dir or local_tmp
    options = pipeline_options or PipelineOptions([])  # Not sys.argv.
    with beam.Pipeline(runner=runner, options=options) as pipeline:
      docs = _read_docs(beam, pipeline, docs_or_paths)
      (docs | 'Bigrams' >> beam.Map(lambda d: max(len(d) - 1, 0))
       | 'Total' >> beam.CombineGlobally(sum) | 'TotalJson' >> beam.Map(json.dumps)
       | 'WriteTotal' >> beam.io.WriteToText(os.path.join(out, 'total')))
      kept_all, kept = [], None
      for n in range(2, max_len + 1):
        counted = (docs | f'Grams{n}' >> beam.FlatMap(_ngrams, n)
                   | f'Count{n}' >> beam.CombinePerKey(sum)
                   | f'Frequent{n}' >> beam.Filter(lambda gc: gc[1] >= min_count))
        if kept is not None:
          shorter = kept | f'KeptKeys{n}' >> beam.Map(lambda gc: (gc[0], None))
          for side, cut in (('Prefix', lambda g: g[:-1]), ('Suffix', lambda g: g[1:])):
            counted = (
                {'grams': counted | f'By{side}{n}' >> beam.Map(
                    lambda gc, cut=cut: (cut(gc[0]), gc)),
                 'kept': shorter}
                | f'Join{side}{n}' >> beam.CoGroupByKey()
                | f'Apriori{side}{n}' >> beam.FlatMap(_joined))
        kept = counted
        kept_all.append(kept)
      every = kept_all | 'AllKept' >> beam.Flatten()
      cutoff = (every | 'Counts' >> beam.Map(lambda gc: gc[1])
                | 'Histogram' >> beam.CombineGlobally(_histogram_fn()())
                | 'Cutoff' >> beam.Map(_cutoff, size))
      (every | 'AboveCutoff' >> beam.Filter(lambda gc, c: gc[1] >= c,
                                            beam.pvalue.AsSingleton(cutoff))
       | 'Json' >> beam.Map(lambda gc: json.dumps([list(gc[0]), gc[1]]))
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


def _histogram_fn():
  """The CombineFn class of the count histogram (defined here: apache_beam is imported
  only when the Beam miner runs)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top

  class HistogramFn(beam.CombineFn):
    """{count: number of grams with that count}: distinct count values only."""

    def create_accumulator(self):
      return {}

    def add_input(self, accumulator, count):
      return _histogram_add(accumulator, count)

    def merge_accumulators(self, accumulators):
      merged = collections.Counter()
      for acc in accumulators:
        merged.update(acc)
      return dict(merged)

    def extract_output(self, accumulator):
      return accumulator

  return HistogramFn


def _read_docs(beam, pipeline, docs_or_paths):
  """The documents as a PCollection of token tuples (see mine_fgrams_beam's Args)."""
  if hasattr(docs_or_paths, 'directory') and hasattr(docs_or_paths, 'offsets'):
    shards = docs_or_paths
    num_docs = len(shards.offsets) - 1
    dtype = np.dtype(shards.tokens.dtype).str
    ranges = [(os.path.abspath(shards.directory), dtype, lo,
               min(lo + _DOCS_PER_RANGE, num_docs))
              for lo in range(0, num_docs, _DOCS_PER_RANGE)]
    return (pipeline | 'Ranges' >> beam.Create(ranges)
            | 'Spread' >> beam.Reshuffle()  # Ranges go to all workers.
            | 'ReadRanges' >> beam.FlatMap(_read_range))
  if _is_patterns(docs_or_paths):
    patterns = [docs_or_paths] if isinstance(docs_or_paths, str) else docs_or_paths
    return ([pipeline | f'Read{i}' >> beam.io.ReadFromText(p)
             for i, p in enumerate(patterns)] | 'Files' >> beam.Flatten()
            | 'Parse' >> beam.Map(_parse_line))
  return pipeline | 'Docs' >> beam.Create(_validated_docs(docs_or_paths))


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
