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
  top S     on the workers: a histogram of the kept grams' counts (one small dict of
            distinct count values) gives the cutoff count c (the S-th largest) and, per
            count, the first row of its grams. Grams with count >= c are grouped by
            (count, length, first token); a per-count histogram of those groups gives
            each group's first row, and one worker sorts one group by its tokens: every
            gram gets its row in the documented order (mine.py) and rows >= S are cut.
            No step holds more than one such group, one count's histogram or one shard.
  write     each gram's key needs its prefix's row: a CoGroupByKey of the ranked grams
            on their prefix; rows are grouped into shards of `_ROWS_PER_SHARD` and each
            worker writes its shards (keys, counts, lengths .npy: the table layout of
            table.py, cut by rows) to a temp name and renames them.
  index     the match index is built by range of slots: keys are grouped by the range
            of `_INDEX_RANGE_SLOTS` their home slot falls in, and one worker builds one
            range (index.range_kernel) and writes it; the few keys that run past a
            range's end go to the manifest as spills.
  manifest  the launcher checks that every shard is there and writes the manifest last
            (`SHARDS_KIND`), so a half-written table is never read as complete.
            `load_table_shards` assembles the memory-mapped table from the parts: a copy
            of O(S) bytes, one shard in memory at a time, and the spills placed; nothing
            is sorted, counted or indexed on the launcher.

Counting every n-gram before the join shuffles more keys than the local miner, which
prunes before it counts; combiner lifting keeps the shuffle to distinct grams per bundle.

Runs unchanged on any Beam runner. On Dataflow (token shards and output in a bucket):
  mine_fgrams_beam('gs://B/art/train_shards', runner='DataflowRunner',
                   pipeline_options=PipelineOptions(['--project=P', '--region=R',
                       '--temp_location=gs://B/tmp', '--max_num_workers=32',
                       '--setup_file=./setup.py']), output_dir='gs://B/tmp/fgrams')
(the table shards land in gs://B/tmp/fgrams/table, which `load_table_shards` reads;
token-shard ranges are read through FileSystems-compatible paths once the shards live in
the bucket). Each worker reports its peak RSS (VmHWM) as the Beam distribution metric
fgrams/worker_peak_rss_kb; the largest lands in the table's meta. Tests run it on the
DirectRunner in multi-process mode (direct_num_workers=2,
direct_running_mode='multi_processing').
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Iterable

import numpy as np

from scone_jax import artifacts, paths
from scone_jax.fgrams import index as index_lib
from scone_jax.fgrams import mine
from scone_jax.fgrams import table as table_lib
from scone_jax.fgrams.table import FgramTable

_DOCS_PER_RANGE = 4096
_ROWS_PER_SHARD = 1 << 20  # A shard writer holds this many rows (~40 MB as tuples).
_INDEX_RANGE_SLOTS = 1 << 20  # Index slots one worker builds: 12 MB for ~680k keys,
# about as many as a shard has rows.
SHARDS_KIND = 'fgram_table_shards'
_SHARD_ARRAYS = (('keys', np.uint64), ('counts', np.int64), ('lengths', np.uint8))


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


def _peak_rss_kb() -> int:
  """This process's peak RSS (VmHWM; ru_maxrss would carry a forking parent's peak)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1])
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _note_rss() -> None:
  from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top
  Metrics.distribution('fgrams', 'worker_peak_rss_kb').update(_peak_rss_kb())


def _plan(hist: dict, size: int, rows_per_shard: int, range_slots: int) -> dict:
  """From the count histogram: the cutoff, the table's rows, the first row of each count
  >= the cutoff (rows rank by count first), the shard size, and the match index's slots
  and the slots per worker-built range."""
  cutoff = _cutoff(hist, size)
  first_row, above = {}, 0
  for count in sorted((c for c in hist if c >= cutoff), reverse=True):
    first_row[count] = above
    above += hist[count]
  rows = min(size, above)
  return dict(cutoff=cutoff, rows=rows, first_row=first_row, rows_per_shard=rows_per_shard,
              index_slots=index_lib.capacity(rows), range_slots=range_slots)


def _group_starts(count_hist, plan: dict):
  """(count, {(length, first token): n}) -> ((count, length, first token), first row):
  within one count, grams rank by length, then tokens (mine.py)."""
  count, hist = count_hist
  row = plan['first_row'][count]
  for length, first in sorted(hist):
    if row >= plan['rows']:
      return  # Every later group is cut.
    yield (count, length, first), row
    row += hist[(length, first)]


def _rank_group(keyed, plan: dict):
  """One (count, length, first token) group, sorted by tokens -> (gram, row, count) for
  the rows < S."""
  (count, _, _), groups = keyed
  _note_rss()
  if not groups['start']:
    return  # The whole group lies beyond row S.
  row = groups['start'][0]
  for gram in sorted(groups['grams']):
    if row >= plan['rows']:
      return
    yield gram, row, count
    row += 1


def _table_row(ranked) -> tuple[int, int, int, int]:
  """(row, key, count, length) of a bigram: its key needs no prefix row (index.py)."""
  gram, row, count = ranked
  return row, ((index_lib.TOKEN_CODE + gram[0]) << index_lib.TOKEN_BITS) | gram[-1], count, 2


def _keyed_rows(keyed):
  """CoGroupByKey on a prefix -> (row, key, count, length) of each ranked extension."""
  prefix, groups = keyed
  _note_rss()
  if not groups['ext']:
    return
  if len(groups['row']) != 1:
    raise ValueError(f'f-gram prefix {prefix} is not a row of the table: a ranked table is '
                     'prefix-closed (mine.py), so the pipeline lost or duplicated a gram')
  code = groups['row'][0]
  for gram, row, count in groups['ext']:
    yield row, (code << index_lib.TOKEN_BITS) | gram[-1], count, len(gram)


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def _write_shard(keyed, table_dir: str, plan: dict) -> dict:
  """Writes one shard's rows (temp name, then rename); returns its manifest entry."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  shard, rows = keyed
  rows = sorted(rows)
  lo = shard * plan['rows_per_shard']
  hi = min(lo + plan['rows_per_shard'], plan['rows'])
  if [r[0] for r in rows] != list(range(lo, hi)):
    raise ValueError(f'table shard {shard} got rows {rows[0][0]}..{rows[-1][0]} '
                     f'({len(rows)}), expected {lo}..{hi - 1}: a row was lost or duplicated')
  files = {}
  for column, (name, dtype) in enumerate(_SHARD_ARRAYS, start=1):
    files.update(_write_npy(table_dir, f'{name}-{shard:05d}.npy',
                            np.array([r[column] for r in rows], dtype)))
  _note_rss()
  return dict(shard=shard, lo=lo, hi=hi, files=files, peak_rss_kb=_peak_rss_kb())


def _write_npy(table_dir: str, name: str, array: np.ndarray) -> dict:
  """Writes one array (temp name, then rename); returns its manifest entry."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  data = _npy_bytes(array)
  final = FileSystems.join(table_dir, name)
  tmp = final + f'.tmp-{os.getpid()}-{time.monotonic_ns()}'
  with FileSystems.create(tmp) as f:
    f.write(data)
  FileSystems.rename([tmp], [final])  # A retried bundle writes the same bytes.
  return {name: {'sha256': hashlib.sha256(data).hexdigest(), 'bytes': len(data)}}


def _index_range(row, plan: dict):
  """(row, key, count, length) -> (index range, (row, key, home slot))."""
  home = int(index_lib.home(np.uint64(row[1]), plan['index_slots']))
  return home // plan['range_slots'], (row[0], row[1], home)


def _write_index_range(keyed, table_dir: str, plan: dict) -> dict:
  """Builds one range of the match index (index.range_kernel) and writes it; returns
  its manifest entry with the keys that spilled past its end, for the launcher."""
  part, items = keyed
  rows_N, keys_N, homes_N = (np.array(c, dtype) for c, dtype in zip(
      zip(*sorted(items)), (np.int64, np.uint64, np.int64)))
  lo = part * plan['range_slots']
  slots = np.full((min(plan['range_slots'], plan['index_slots'] - lo), 3), index_lib.EMPTY,
                  np.uint32)
  spilled = np.zeros(rows_N.size, bool)
  duplicate = index_lib.range_kernel(keys_N, rows_N, homes_N, lo, slots, spilled)
  if duplicate >= 0:
    raise ValueError(f'rows {rows_N[duplicate]} and another have the same key: the pipeline '
                     'duplicated an f-gram')
  files = _write_npy(table_dir, f'index-{part:05d}.npy', slots)
  _note_rss()
  return dict(index_range=part, files=files, peak_rss_kb=_peak_rss_kb(),
              spills=[[int(r), int(k)] for r, k in zip(rows_N[spilled], keys_N[spilled])])


def load_table_shards(table_dir: str, verify: bool | str = True,
                      out_dir: str | None = None) -> FgramTable:
  """The FgramTable of a sharded table written by `mine_fgrams_beam`, memory-mapped.

  The manifest is written last, so a table without one (or missing a shard) is refused.
  This host assembles the memory-mapped layout (table.py) into `out_dir` (default: a temp
  dir, removed once mapped): it copies the row shards and the match-index ranges the
  workers built into the layout's files one shard at a time, and places the few keys that
  spilled past a range's end (index.py). That is O(S) bytes copied, but no O(S) compute
  and O(one shard) memory: the index is never rebuilt here.
  """
  manifest = artifacts.read_manifest(table_dir, SHARDS_KIND, verify=verify)
  base = None
  if out_dir is None:
    base = tempfile.mkdtemp(prefix='scone_fgram_table_')
    out_dir = os.path.join(base, 'table')
  try:
    with artifacts.atomic_dir(out_dir) as tmp:
      _assemble(table_dir, manifest, tmp)
    return FgramTable.load(out_dir, verify=False)  # Mapped: the files may go now.
  finally:
    if base:
      shutil.rmtree(base, ignore_errors=True)


def _read_part(table_dir: str, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
  path = paths.join(table_dir, name)
  array = np.load(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path,
                  allow_pickle=False)
  if array.dtype != dtype or array.shape != shape:
    raise artifacts.ArtifactError(f'{table_dir}/{name} is {array.dtype}{list(array.shape)}, '
                                  f'expected {np.dtype(dtype)}{list(shape)}; rebuild the '
                                  'table')
  return array


_CHUNK_BYTES = 64 << 20  # Reads of an assembled file, for its checks and fingerprint.


def _npy_file(path: str, dtype, shape: tuple[int, ...]):
  """An open .npy file with its header written: the data is appended in order."""
  f = open(path, 'wb')  # pylint: disable=consider-using-with
  np.lib.format.write_array_header_1_0(f, {
      'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
      'shape': shape})
  return f


def _npy_chunks(path: str, dtype, rows_per_chunk: int):
  """The array of a C-order .npy file in chunks of rows, read with plain file reads (no
  mapping: the pages stay out of this process)."""
  with open(path, 'rb') as f:
    np.lib.format.read_magic(f)
    shape, _, _ = np.lib.format.read_array_header_1_0(f)
    width = int(np.prod(shape[1:], dtype=np.int64))
    for lo in range(0, shape[0], rows_per_chunk):
      n = min(rows_per_chunk, shape[0] - lo)
      yield np.fromfile(f, dtype, n * width).reshape((n,) + tuple(shape[1:]))


def _assemble(table_dir: str, manifest: dict, out: str) -> None:
  """Writes the table layout's files and manifest (table.py) into local dir `out`, one
  shard or index range in memory at a time."""
  num, per = manifest['size'], manifest['rows_per_shard']
  num_slots, per_range = manifest['index_slots'], manifest['index_range_slots']
  files = [_npy_file(os.path.join(out, f'{name}.npy'), dtype, (num,))
           for name, dtype in _SHARD_ARRAYS]
  # The fingerprint hashes keys, then lengths, then counts: the keys as they are written,
  # the other two read back below.
  fingerprint = table_lib.fingerprint_hasher(manifest['max_len'], manifest['min_count'])
  last_count = None
  with files[0], files[1], files[2]:
    for shard in range(manifest['num_shards']):
      lo, hi = shard * per, min(shard * per + per, num)
      parts = [_read_part(table_dir, f'{name}-{shard:05d}.npy', dtype, (hi - lo,))
               for name, dtype in _SHARD_ARRAYS]
      _, counts, lengths = parts
      if (np.any(np.diff(counts) > 0) or (last_count is not None and counts[0] > last_count)
          or np.any(lengths < 2) or np.any(lengths > manifest['max_len'])):
        raise artifacts.ArtifactError(f'{table_dir} shard {shard}: counts not in rank order '
                                      f'or lengths outside [2, {manifest["max_len"]}]; '
                                      'rebuild the table')
      last_count = int(counts[-1])
      fingerprint.update(parts[0].data)
      for f, part in zip(files, parts):
        part.tofile(f)
  index_path = os.path.join(out, 'index.npy')
  built = set(manifest['index_ranges'])
  used = 0  # Slots holding a row: the ranges' as written, then one per placed spill.
  with _npy_file(index_path, np.uint32, (num_slots, 3)) as f:
    for part in range(-(-num_slots // per_range)):
      lo, hi = part * per_range, min(part * per_range + per_range, num_slots)
      slots = (_read_part(table_dir, f'index-{part:05d}.npy', np.uint32, (hi - lo, 3))
               if part in built else np.full((hi - lo, 3), index_lib.EMPTY, np.uint32))
      used += int((slots[:, 2] != index_lib.EMPTY).sum())
      slots.tofile(f)
  spills = np.array(manifest['index_spills'], np.uint64).reshape(-1, 2)
  slots = np.load(index_path, mmap_mode='r+')  # Touches only the pages spills land in.
  duplicate = index_lib.place_kernel(slots, spills[:, 1], spills[:, 0].astype(np.int64))
  slots.flush()
  del slots
  if duplicate >= 0 or used + len(spills) != num:
    raise artifacts.ArtifactError(f'{table_dir}: the index ranges do not hold each of the '
                                  f'{num} rows once; rebuild the table')
  for name, dtype in (('lengths', np.uint8), ('counts', np.int64)):
    for chunk in _npy_chunks(os.path.join(out, f'{name}.npy'), dtype,
                             _CHUNK_BYTES // np.dtype(dtype).itemsize):
      fingerprint.update(chunk.data)
  table_lib.write_manifest(out, max_len=manifest['max_len'], size=num,
                           min_count=manifest['min_count'], cutoff_count=last_count or 0,
                           fingerprint=fingerprint.hexdigest()[:16], index_slots=num_slots,
                           meta=manifest.get('meta') or {})


def _write_shards_manifest(table_dir: str, shards: list[dict], ranges: list[dict],
                           plan: dict, max_len: int, min_count: int, meta: dict) -> None:
  """The sharded table's manifest, written last once every shard is present."""
  shards = sorted(shards, key=lambda e: e['shard'])
  want = -(-plan['rows'] // plan['rows_per_shard'])
  if [e['shard'] for e in shards] != list(range(want)):
    raise ValueError(f'the pipeline wrote shards {[e["shard"] for e in shards]}, expected '
                     f'0..{want - 1}')
  ranges = sorted(ranges, key=lambda e: e['index_range'])  # Ranges no key homes in: none.
  manifest = {'kind': SHARDS_KIND, 'format_version': artifacts.FORMAT_VERSION,
              'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
              'files': {name: info for e in shards + ranges
                        for name, info in e['files'].items()},
              'size': plan['rows'], 'num_shards': want, 'rows_per_shard': plan['rows_per_shard'],
              'index_slots': plan['index_slots'], 'index_range_slots': plan['range_slots'],
              'index_ranges': [e['index_range'] for e in ranges],
              'index_spills': sorted(s for e in ranges for s in e['spills']),
              'max_len': max_len, 'min_count': min_count, 'cutoff_count': plan['cutoff'],
              'meta': meta}
  paths.write_bytes(paths.join(table_dir, artifacts.MANIFEST),
                    json.dumps(manifest, indent=1).encode())


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
    table_dir = paths.join(out, 'table')
    options = pipeline_options or PipelineOptions([])  # Not sys.argv.
    pipeline = beam.Pipeline(runner=runner, options=options)
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
    plan = (every | 'Counts' >> beam.Map(lambda gc: gc[1])
            | 'Histogram' >> beam.CombineGlobally(_histogram_fn()())
            | 'Plan' >> beam.Map(_plan, size, _ROWS_PER_SHARD, _INDEX_RANGE_SLOTS))
    (plan | 'PlanJson' >> beam.Map(json.dumps)
     | 'WritePlan' >> beam.io.WriteToText(os.path.join(out, 'plan')))
    plan_si = beam.pvalue.AsSingleton(plan)
    selected = every | 'AboveCutoff' >> beam.Filter(lambda gc, p: gc[1] >= p['cutoff'],
                                                    plan_si)
    # Ranking on the workers: one (count, length, first token) group per key.
    groups = selected | 'ByGroup' >> beam.Map(lambda gc: ((gc[1], len(gc[0]), gc[0][0]),
                                                          gc[0]))
    starts = (selected | 'GroupOfCount' >> beam.Map(lambda gc: (gc[1], (len(gc[0]),
                                                                         gc[0][0])))
              | 'GroupHistogram' >> beam.CombinePerKey(_histogram_fn()())
              | 'GroupStarts' >> beam.FlatMap(_group_starts, plan_si))
    ranked = ({'grams': groups, 'start': starts} | 'JoinStarts' >> beam.CoGroupByKey()
              | 'Rank' >> beam.FlatMap(_rank_group, plan_si))
    # Keys: a bigram's from its tokens, a longer gram's from its prefix's row.
    bigram_rows = (ranked | 'Bigram' >> beam.Filter(lambda r: len(r[0]) == 2)
                   | 'BigramRows' >> beam.Map(_table_row))
    longer_rows = (
        {'row': ranked | 'Prefixes' >> beam.Filter(lambda r: len(r[0]) < max_len)
                | 'RowOf' >> beam.Map(lambda r: (r[0], r[1])),
         'ext': ranked | 'Longer' >> beam.Filter(lambda r: len(r[0]) > 2)
                | 'ByPrefix' >> beam.Map(lambda r: (r[0][:-1], r))}
        | 'JoinPrefixRows' >> beam.CoGroupByKey() | 'Keys' >> beam.FlatMap(_keyed_rows))
    rows = (bigram_rows, longer_rows) | 'Rows' >> beam.Flatten()
    (rows
     | 'ByShard' >> beam.Map(lambda r, p: (r[0] // p['rows_per_shard'], r), plan_si)
     | 'Shards' >> beam.GroupByKey()
     | 'WriteShard' >> beam.Map(_write_shard, table_dir, plan_si)
     | 'ShardJson' >> beam.Map(json.dumps)
     | 'WriteShardList' >> beam.io.WriteToText(os.path.join(out, 'shards')))
    (rows
     | 'ByIndexRange' >> beam.Map(_index_range, plan_si)
     | 'IndexRanges' >> beam.GroupByKey()
     | 'WriteIndexRange' >> beam.Map(_write_index_range, table_dir, plan_si)
     | 'IndexRangeJson' >> beam.Map(json.dumps)
     | 'WriteIndexRangeList' >> beam.io.WriteToText(os.path.join(out, 'index_ranges')))
    result = pipeline.run()
    result.wait_until_finish()
    total = sum(_read_json_lines(os.path.join(out, 'total*')))
    if total == 0:
      raise ValueError('docs contain no n-gram of 2+ tokens (empty corpus, or only '
                       'documents of 0-1 tokens); pass tokenized documents')
    plan = _read_json_lines(os.path.join(out, 'plan*'))[0]
    if plan['rows'] == 0:
      raise ValueError(f'no n-gram of 2..{max_len} tokens occurs min_count={min_count} '
                       'times in docs; lower min_count or mine a larger corpus')
    meta = {'beam_worker_peak_rss_mb': _worker_peak_rss_kb(result) / 1024}
    _write_shards_manifest(table_dir, _read_json_lines(os.path.join(out, 'shards*')),
                           _read_json_lines(os.path.join(out, 'index_ranges*')), plan,
                           max_len, min_count, meta)
    return load_table_shards(table_dir)


def _worker_peak_rss_kb(result) -> float:
  """The largest peak RSS any worker reported (fgrams/worker_peak_rss_kb), 0 if none."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
  peak = 0
  found = result.metrics().query(MetricsFilter().with_name('worker_peak_rss_kb'))
  for metric in found['distributions']:
    for value in (metric.committed, metric.attempted):
      if value is not None and value.count:
        peak = max(peak, value.max)
  return peak


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
