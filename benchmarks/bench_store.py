"""Table and store benchmark: the f-gram table's open time and bytes per f-gram, the RAM
tier's load rate against a raw read of its own shards, gathers against np.take, and the
disk tier's gather latency, cold and warm. Every ratio is measured in the same run.

Usage (sizes as in BENCHMARKS.md; ~17 GB of disk at the defaults, removed at the end):
  python benchmarks/bench_store.py
  python benchmarks/bench_store.py --table_sizes=1e6 --ram_sizes=1e6 --disk_rows=1e6  # quick

Tables are synthetic (the layout's cost does not depend on which f-grams it holds): half
bigrams, half trigrams extending them, vocab 2**17, K=5. Store rows are random bits.
"Raw read" reads every shard file's row bytes, in order on one thread, into one fresh
numpy buffer: what `cat` of the shards into memory costs. "Cold" evicts the files from the
page cache first (posix_fadvise DONTNEED on our own files; nothing global is dropped).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numba
import numpy as np

from scone_jax import artifacts
from scone_jax.export import writer
from scone_jax.fgrams import FgramTable
from scone_jax.fgrams import index as index_lib
from scone_jax.serve import EmbeddingStore

VOCAB = 1 << 17


def _load() -> str:
  return 'load average %.1f %.1f %.1f' % os.getloadavg()


def synthetic_table(num: int) -> FgramTable:
  half = num // 2
  i = np.arange(half, dtype=np.uint64)
  j = np.arange(num - half, dtype=np.uint64)
  bigram_keys = ((np.uint64(index_lib.TOKEN_CODE) + i // np.uint64(VOCAB)) << np.uint64(31)
                 ) | (i % np.uint64(VOCAB))
  # Trigram j extends bigram j % half by token j // half: distinct keys, prefix earlier.
  trigram_keys = ((j % np.uint64(half)) << np.uint64(31)) | (j // np.uint64(half))
  keys = np.concatenate([bigram_keys, trigram_keys])
  lengths = np.repeat(np.array([2, 3], np.uint8), [half, num - half])
  counts = np.arange(num, 0, -1, dtype=np.int64) + 4
  return FgramTable.from_keys(keys, counts, lengths, max_len=5, min_count=5)


@numba.njit(nogil=True, cache=True)
def _probe_all(slots, limit, keys_Q):
  found = 0
  for q in range(keys_Q.size):
    found += index_lib.find(slots, limit, keys_Q[q]) >= 0
  return found


def _repeat(fn, args, reps: int) -> None:
  for _ in range(reps):
    fn(*args)


def _best(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def bench_tables(sizes: list[int], root: str) -> list[dict]:
  print(f'\n== f-gram table: open time and bytes per f-gram (K=5, vocab 2**17; {_load()})')
  print(f'{"S":>12} {"index build s":>14} {"save s":>8} {"open s":>10} '
        f'{"open+sha256 1st":>16} {"reopen (stat cache)":>20} {"B/f-gram":>9} '
        f'{"open/build":>11} {"probe ns":>9}')
  out = []
  for num in sizes:
    start = time.perf_counter()
    table = synthetic_table(num)
    build = time.perf_counter() - start  # Dominated by indexing: what a rebuild costs.
    path = os.path.join(root, f'table{num}')
    start = time.perf_counter()
    table.save(path)
    save = time.perf_counter() - start
    del table
    gc.collect()
    opened = _best(lambda: FgramTable.load(path, verify=False), 5)
    first = _best(lambda: FgramTable.load(path, verify='full'), 1)
    time.sleep(2.1)  # Files younger than 2 s are never stat-cached (artifacts.py).
    FgramTable.load(path, verify=True)  # Records the stat cache.
    reopen = _best(lambda: FgramTable.load(path, verify=True), 3)
    files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                if f.endswith('.npy'))
    table = FgramTable.load(path, verify=False)
    slots, limit = table.index
    queries = np.asarray(table.keys[np.random.default_rng(0).integers(0, num, 1 << 20)])
    _probe_all(slots, limit, queries[:10])
    probe = _best(lambda: _probe_all(slots, limit, queries), 3) / queries.size * 1e9
    print(f'{num:>12,} {build:>14.2f} {save:>8.2f} {opened:>10.5f} {first:>16.2f} '
          f'{reopen:>20.4f} {files / num:>9.1f} {opened / build:>11.1e} {probe:>9.0f}')
    out.append(dict(rows=num, build_s=build, save_s=save, open_s=opened, first_open_s=first,
                    reopen_s=reopen, bytes_per_fgram=files / num, probe_ns=probe))
    del table, slots, queries
    shutil.rmtree(path)
  return out


def _write_beam_parts(table: FgramTable, directory: str, rows_per_shard: int = 1 << 20,
                      range_slots: int = 1 << 20) -> None:
  """What mine_fgrams_beam's workers write for `table`: row shards, match-index ranges
  (index.range_kernel) and the manifest, so the launcher's step can be timed alone."""
  from scone_jax.fgrams import beam as beam_lib  # pylint: disable=g-import-not-at-top
  keys, counts, lengths = (np.asarray(a) for a in (table.keys, table.counts, table.lengths))
  num, num_slots = len(table), index_lib.capacity(len(table))
  os.makedirs(directory)

  def save(name, array):
    path = os.path.join(directory, name)
    np.save(path, array, allow_pickle=False)
    return {name: {'sha256': artifacts.sha256_file(path), 'bytes': os.path.getsize(path)}}

  shards = []
  for shard, lo in enumerate(range(0, num, rows_per_shard)):
    files = {}
    for name, array in (('keys', keys), ('counts', counts), ('lengths', lengths)):
      files.update(save(f'{name}-{shard:05d}.npy', array[lo:lo + rows_per_shard]))
    shards.append(dict(shard=shard, files=files))
  homes = index_lib.homes(keys, num_slots)
  part_of = homes // range_slots
  order = np.argsort(part_of, kind='stable')  # Rows ascending within each range.
  bounds = np.searchsorted(part_of[order], np.arange(part_of.max() + 2))
  ranges = []
  for part in range(bounds.size - 1):
    rows = order[bounds[part]:bounds[part + 1]]
    lo = part * range_slots
    slots = np.full((min(range_slots, num_slots - lo), 3), index_lib.EMPTY, np.uint32)
    spilled = np.zeros(rows.size, bool)
    index_lib.range_kernel(keys[rows], rows, homes[rows], lo, slots, spilled)
    ranges.append(dict(index_range=part, files=save(f'index-{part:05d}.npy', slots),
                       spills=[[int(r), int(keys[r])] for r in rows[spilled]]))
  plan = dict(rows=num, rows_per_shard=rows_per_shard, index_slots=num_slots,
              range_slots=range_slots, cutoff=int(counts[-1]))
  beam_lib._write_shards_manifest(  # pylint: disable=protected-access
      directory, shards, ranges, plan, table.max_len, table.min_count, {})


def _assemble_job(spec: dict) -> dict:
  """In a fresh process: the launcher's step after Beam, new (assemble the mapped layout
  from the workers' parts) or old (concatenate the shards, index them, save)."""
  from scone_jax.fgrams import beam as beam_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  if spec['how'] == 'assemble':
    table = beam_lib.load_table_shards(spec['parts'], verify=False, out_dir=spec['out'])
  else:
    manifest = artifacts.read_manifest(spec['parts'], beam_lib.SHARDS_KIND, verify=False)
    columns = [np.concatenate([np.load(os.path.join(spec['parts'], f'{name}-{i:05d}.npy'))
                               for i in range(manifest['num_shards'])])
               for name, _ in beam_lib._SHARD_ARRAYS]  # pylint: disable=protected-access
    table = FgramTable.from_keys(*columns, manifest['max_len'], manifest['min_count'])
    table.save(spec['out'])
  seconds = time.perf_counter() - start
  with open('/proc/self/status') as f:
    rss = [int(l.split()[1]) / 1024 for l in f if l.startswith('VmHWM:')][0]
  return dict(seconds=seconds, peak_rss_mb=rss, fingerprint=table.fingerprint)


def bench_assembly(sizes: list[int], root: str) -> list[dict]:
  """The launcher's O(S) step after Beam: assembling the workers' parts vs the old
  concatenate + index + save, each in a fresh process (its peak RSS is its own)."""
  print(f'\n== after Beam, on the launcher: assemble the workers\' parts vs concatenate + '
        f'index + save ({_load()})')
  print(f'{"S":>12} {"old s":>8} {"old peak RSS MB":>16} {"assemble s":>11} '
        f'{"peak RSS MB":>12} {"old / assemble":>15} {"same table":>11}')
  out = []
  for num in sizes:
    parts = os.path.join(root, f'parts{num}')
    _write_beam_parts(synthetic_table(num), parts)
    gc.collect()
    got = {}
    for how in ('old', 'assemble'):
      spec = dict(how=how, parts=parts, out=os.path.join(root, f'{how}{num}'))
      proc = subprocess.run([sys.executable, __file__, '--job', json.dumps(spec)],
                            capture_output=True, text=True, check=True)
      got[how] = json.loads(proc.stdout.strip().splitlines()[-1])
      shutil.rmtree(spec['out'])
    shutil.rmtree(parts)
    old, new = got['old'], got['assemble']
    row = dict(rows=num, old_s=old['seconds'], old_rss_mb=old['peak_rss_mb'],
               assemble_s=new['seconds'], assemble_rss_mb=new['peak_rss_mb'],
               same=old['fingerprint'] == new['fingerprint'])
    out.append(row)
    print(f'{num:>12,} {row["old_s"]:>8.2f} {row["old_rss_mb"]:>16,.0f} '
          f'{row["assemble_s"]:>11.2f} {row["assemble_rss_mb"]:>12,.0f} '
          f'{row["old_s"] / row["assemble_s"]:>15.2f} {str(row["same"]):>11}')
  return out


def _evict(paths: list[str]) -> None:
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _write_store(path: str, num: int, d_model: int, chunk_rows: int = 65536) -> list[str]:
  rng = np.random.default_rng(0)

  def rows(a, b):  # Random finite bf16: sign/exponent bits kept tame.
    bits = rng.integers(0, 1 << 14, (b - a, d_model), dtype=np.uint16) + np.uint16(0x3000)
    return bits.view(ml_dtypes.bfloat16)

  writer.write_store(path, num, d_model, 'bfloat16', chunk_rows, rows, {}, progress=False)
  return [os.path.join(path, writer.shard_file(i)) for i in range(-(-num // chunk_rows))]


def _raw_read(files: list[str], nbytes: int, shard_bytes: int) -> None:
  """Row bytes of every shard, in order, into one fresh buffer, on one thread."""
  buf = memoryview(np.empty(nbytes, np.uint8))
  pos = 0
  for f in files:
    with open(f, 'rb', buffering=0) as fh:
      end = min(pos + shard_bytes, nbytes)
      while pos < end:
        got = fh.readinto(buf[pos:end])
        if not got:
          raise OSError(f'{f} is shorter than its rows')
        pos += got


def bench_ram(sizes: list[int], d_model: int, root: str) -> tuple[list[dict], list[dict]]:
  print(f'\n== RAM tier: load vs raw read of its shards, gather vs np.take (d={d_model} '
        f'bf16, shards of 65,536 rows; {_load()})')
  print(f'{"S":>12} {"GB":>6} {"cache":>6} {"raw read GB/s":>14} {"load GB/s":>10} '
        f'{"load/raw":>9} {"load, no checks":>16} {"/raw":>6}')
  gathers, loads = [], []
  for num in sizes:
    path = os.path.join(root, f'store{num}')
    files = _write_store(path, num, d_model)
    nbytes = num * d_model * 2
    shard_bytes = 65536 * d_model * 2
    for cache in ('warm', 'cold'):
      raw, load, load_off = [], [], []
      for _ in range(2 if cache == 'cold' else 3):  # Interleaved: same load for both.
        for fn, out in ((lambda: _raw_read(files, nbytes, shard_bytes), raw),
                        (lambda: EmbeddingStore.open(path, 'ram'), load),
                        (lambda: EmbeddingStore.open(path, 'ram', shard_checks='off'),
                         load_off)):
          if cache == 'cold':
            _evict(files)
          else:
            _raw_read(files, nbytes, shard_bytes)  # Warm the page cache.
          gc.collect()
          out.append(_best(fn, 1))
      r, l, o = min(raw), min(load), min(load_off)
      print(f'{num:>12,} {nbytes / 1e9:>6.2f} {cache:>6} {nbytes / r / 1e9:>14.2f} '
            f'{nbytes / l / 1e9:>10.2f} {r / l:>9.2f} {nbytes / o / 1e9:>16.2f} '
            f'{r / o:>6.2f}')
      loads.append(dict(rows=num, gb=nbytes / 1e9, cache=cache, raw_gbps=nbytes / r / 1e9,
                        load_gbps=nbytes / l / 1e9, load_over_raw=r / l,
                        nochecks_over_raw=r / o))
    store = EmbeddingStore.open(path, 'ram')
    table = store._table  # pylint: disable=protected-access
    rng = np.random.default_rng(1)
    for batch, reps in ((16, 20000), (131072, 5)):
      rows = rng.integers(0, num, batch)
      store.gather(rows)
      # Each result is dropped before the next call, as a server's would be (keeping
      # 20,000 of them alive measured page faults on fresh memory, not the gather).
      t_take = _best(functools.partial(_repeat, np.take, (table, rows, 0), reps), 5) / reps
      t_ours = _best(functools.partial(_repeat, store.gather, (rows,), reps), 5) / reps
      gathers.append(dict(rows=num, batch=batch, take_s=t_take, gather_s=t_ours,
                          speed=t_take / t_ours))
    del store, table
    gc.collect()
    shutil.rmtree(path)
  print(f'\n{"gather, RAM tier":<22} {"rows":>8} {"np.take us":>11} {"gather us":>10} '
        f'{"gather/np.take speed":>21}')
  for g in gathers:
    print(f'{"S = " + format(g["rows"], ","):<22} {g["batch"]:>8,} {g["take_s"] * 1e6:>11.1f} '
          f'{g["gather_s"] * 1e6:>10.1f} {g["speed"]:>21.2f}')
  return loads, gathers


def bench_disk(num: int, d_model: int, root: str, steps: int) -> list[dict]:
  print(f'\n== disk tier (memmap of the zarr3 shards), S = {num:,} x d {d_model} bf16 '
        f'({num * d_model * 2 / 1e9:.1f} GB); {_load()}')
  path = os.path.join(root, 'disk_store')
  start = time.perf_counter()
  files = _write_store(path, num, d_model)
  print(f'written in {time.perf_counter() - start:.0f} s ({len(files)} shards)')
  out = []
  rng = np.random.default_rng(2)
  print(f'{"batch":>6} {"cache":>6} {"checks":>12} {"median ms":>10} {"p90 ms":>8} '
        f'{"per row us":>11}')
  for batch in (1, 16):
    # A first touch reads (and checksums) the whole shard: at batch 16 nearly every row
    # of a cold step lands in a new shard, so that row is measured at batch 1 only.
    for checks in ('off', 'first_touch') if batch == 1 else ('off',):
      store = EmbeddingStore.open(path, 'disk', shard_checks=checks)
      _evict(files)
      rows = [rng.integers(0, num, batch)
              for _ in range(steps if checks == 'off' else min(steps, 20))]
      for cache in ('cold', 'warm'):
        if checks == 'first_touch' and cache == 'warm':
          continue  # Same as 'off' once a shard is checked.
        lat = []
        for r in rows:
          t = time.perf_counter()
          store.gather(r)
          lat.append(time.perf_counter() - t)
        lat = np.array(lat) * 1e3
        print(f'{batch:>6} {cache:>6} {checks:>12} {np.median(lat):>10.3f} '
              f'{np.percentile(lat, 90):>8.3f} {np.median(lat) * 1e3 / batch:>11.1f}')
        out.append(dict(batch=batch, cache=cache, checks=checks,
                        median_ms=float(np.median(lat)),
                        p90_ms=float(np.percentile(lat, 90))))
      del store
  shutil.rmtree(path)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--table_sizes', default='1e6,1e7,1e8')
  parser.add_argument('--ram_sizes', default='1e6,1e7')
  parser.add_argument('--ram_d', type=int, default=256)
  parser.add_argument('--disk_rows', type=float, default=1e8)
  parser.add_argument('--disk_d', type=int, default=64)
  parser.add_argument('--disk_steps', type=int, default=200)
  parser.add_argument('--dir', default=None, help='scratch directory (default: temp)')
  parser.add_argument('--assembly_sizes', default='1e7,1e8')
  parser.add_argument('--only', default='table,assembly,ram,disk')
  parser.add_argument('--job', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.job:
    print(json.dumps(_assemble_job(json.loads(args.job))))
    return
  only = args.only.split(',')
  with tempfile.TemporaryDirectory(prefix='bench_store_', dir=args.dir) as root:
    if 'table' in only:
      bench_tables([int(float(s)) for s in args.table_sizes.split(',')], root)
    if 'assembly' in only:
      bench_assembly([int(float(s)) for s in args.assembly_sizes.split(',')], root)
    if 'ram' in only:
      bench_ram([int(float(s)) for s in args.ram_sizes.split(',')], args.ram_d, root)
    if 'disk' in only:
      bench_disk(int(args.disk_rows), args.disk_d, root, args.disk_steps)


if __name__ == '__main__':
  main()
