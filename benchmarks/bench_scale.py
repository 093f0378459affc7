"""The f-gram side at scale, in one run: mining, Beam, table, RAM tier, gathers, disk tier.

  python benchmarks/bench_scale.py --dir=/path/with/30GB      # the sizes of BENCHMARKS.md
  python benchmarks/bench_scale.py --quick                     # every section, small sizes

Every section prints its own table with the baseline measured in the same run (the np.sort
bound of the keys the miner counts; the 1-worker Beam run; the launcher's old concatenate +
index + save after Beam; a raw read of the store's own shards; np.take on the same matrix). The sections are those of benchmarks/bench_fgrams.py
(`--scaling`) and benchmarks/bench_store.py, called in one process so the numbers share one
machine state; the end prints every target with its measured value, and what one host of
this machine's RAM (and of a large RAM / NVMe host) serves per tier, from the measured
bytes per f-gram and lookup costs.

Disk: ~20 GB at the defaults under --dir (the S = 100M table, 3.6 GB, and the 100M x d 64
store, 12.8 GB; the 10M x d 256 RAM-tier store, 5.1 GB, needs as much free memory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import bench_fgrams
import bench_store

def _sizes(text: str) -> list[int]:
  return [int(float(s)) for s in text.split(',') if s]


def _mem_total_bytes() -> int:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemTotal:'):
        return int(line.split()[1]) * 1024
  raise OSError('no MemTotal in /proc/meminfo')


def _targets(results: dict) -> list[tuple[str, str, str, bool | None]]:
  """(item, target, measured, holds) for every issue-12 number this run measured."""
  out = []
  mining = results.get('mining') or []
  if mining:
    worst = max(r['seconds'] / r['sort_seconds'] for r in mining)
    out.append(('mining vs the np.sort bound of its keys', 'mine / sort <= 3 at every size',
                f'{worst:.2f} (worst size)', worst <= 3))
    per = [r['ns_per_token'] for r in mining]
    growth = per[-1] / per[0]
    spread = max(per) / min(per)
    out.append((f'mining ns/token, {mining[0]["tokens"] / 1e6:.2g}M -> '
                f'{mining[-1]["tokens"] / 1e6:.2g}M tokens',
                'flat (last / first <= 1.25)',
                f'{" / ".join(f"{p:.0f}" for p in per)} ns: last/first {growth:.2f}, '
                f'max/min {spread:.2f}', growth <= 1.25))
  beam = results.get('beam') or []
  if beam:
    same = all(r['same_table'] for r in beam)
    out.append(('Beam table == local miner', 'same fingerprint', str(same), same))
    for size in sorted({r['size'] for r in beam}):
      two = [r for r in beam if r['size'] == size and r['workers'] == 2][0]
      out.append((f'Beam 2 workers / 1 worker, S = {size:,}', '> 1 (scales with workers)',
                  f'{two["speedup"]:.2f}x', two['speedup'] > 1))
    rss = [r['worker_peak_rss_mb'] for r in beam if r['workers'] == 1]
    rows = [r['rows'] for r in beam if r['workers'] == 1]
    out.append(('Beam worker peak RSS vs S', 'does not grow with S',
                ' / '.join(f'{m:.0f} MB at {n:,} rows' for m, n in zip(rss, rows)),
                max(rss) <= 1.2 * min(rss)))
  assembly = results.get('assembly') or []
  if assembly:
    rss = [r['assemble_rss_mb'] for r in assembly]
    out.append(('launcher after Beam: assemble the parts', 'memory flat in S; same table',
                ' / '.join(f'{r["assemble_s"]:.1f} s, {r["assemble_rss_mb"]:.0f} MB at '
                           f'{r["rows"]:,}' for r in assembly) +
                f' (old: {assembly[-1]["old_s"]:.1f} s, {assembly[-1]["old_rss_mb"]:,.0f} MB)',
                max(rss) <= 1.2 * min(rss) and all(r['same'] for r in assembly)))
  for r in results.get('table') or []:
    out.append((f'table, S = {r["rows"]:,}', '<= 40 B / f-gram; O(1) open',
                f'{r["bytes_per_fgram"]:.1f} B; open {r["open_s"] * 1e3:.2f} ms '
                f'(index build {r["build_s"]:.1f} s)', r['bytes_per_fgram'] <= 40))
  loads, gathers = results.get('ram') or ([], [])
  for r in loads:
    out.append((f'RAM-tier load, S = {r["rows"]:,}, {r["cache"]} cache',
                '>= 0.8x raw read', f'{r["load_over_raw"]:.2f}x ({r["load_gbps"]:.2f} vs '
                f'{r["raw_gbps"]:.2f} GB/s)', r['load_over_raw'] >= 0.8))
  for g in gathers:
    out.append((f'gather, S = {g["rows"]:,}, {g["batch"]:,} rows', '>= 0.8x np.take speed',
                f'{g["speed"]:.2f}x ({g["gather_s"] * 1e6:.1f} vs {g["take_s"] * 1e6:.1f} '
                'us)', g['speed'] >= 0.8))
  for r in results.get('disk') or []:
    if r['checks'] == 'off':
      out.append((f'disk tier, batch {r["batch"]}, {r["cache"]}', 'paper, batch 1: 1.1 / 2.3 '
                  'ms', f'median {r["median_ms"]:.3f} ms, p90 '
                  f'{r["p90_ms"]:.3f} ms', None))
  return out


def _serving(results: dict, d_models=(256, 2048)) -> None:
  """S one host serves per tier, from this run's bytes per f-gram."""
  tables = results.get('table') or []
  if not tables:
    return
  per_fgram = max(r['bytes_per_fgram'] for r in tables)  # Table + index, mapped by every host.
  mem = _mem_total_bytes()
  hosts = [(f'this machine, {mem / 2**30:.0f} GiB RAM', mem, None),
           ('1 TiB RAM host', 2**40, None), ('1 TiB RAM + 8 TB NVMe host', 2**40, 8e12)]
  print(f'\n== what one host serves (bytes / f-gram: 2 d for a bf16 row on its tier + '
        f'{per_fgram:.1f} for the table and index in RAM; RAM usable = total - max(8 GiB, '
        '12%))')
  print(f'{"host":<34} {"tier":<5} ' + ' '.join(f'{"S at d=" + str(d):>14}' for d in d_models))
  for name, ram, nvme in hosts:
    usable = ram - max(8 * 2**30, 0.12 * ram)
    if nvme is None:
      cells = [usable / (2 * d + per_fgram) for d in d_models]
      tier = 'RAM'
    else:  # Rows on NVMe (7% kept free); the table and index must stay in RAM.
      cells = [min(0.93 * nvme / (2 * d), usable / per_fgram) for d in d_models]
      tier = 'disk'
    print(f'{name:<34} {tier:<5} ' + ' '.join(f'{c / 1e6:>13,.0f}M' for c in cells))
  print('A pod of N hosts with the row-sharded store serves N x the RAM rows (each host '
        'maps the whole table and index, and holds 1/N of the rows); each decode step adds '
        'one exchange: ~RTT + B (N-1)/N 2d / bandwidth (docs in ARCHITECTURE.md).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default=None, help='scratch directory (default: temp)')
  parser.add_argument('--quick', action='store_true', help='small sizes: a smoke run')
  parser.add_argument('--mining_tokens', default='1e6,5e6,2e7,5e7')
  parser.add_argument('--repeats', type=int, default=3, help='mining: best of this many')
  parser.add_argument('--beam_tokens', type=int, default=300_000)
  parser.add_argument('--beam_sizes', default='1e5,1e3')
  parser.add_argument('--table_sizes', default='1e6,1e7,1e8')
  parser.add_argument('--assembly_sizes', default='1e7,1e8')
  parser.add_argument('--ram_sizes', default='1e6,1e7')
  parser.add_argument('--ram_d', type=int, default=256)
  parser.add_argument('--disk_rows', type=float, default=1e8)
  parser.add_argument('--disk_d', type=int, default=64)
  parser.add_argument('--disk_steps', type=int, default=200)
  parser.add_argument('--only', default='mining,beam,table,assembly,ram,disk')
  args = parser.parse_args()
  if args.quick:
    args.mining_tokens, args.repeats, args.beam_tokens = '2e5,1e6', 1, 50_000
    args.beam_sizes, args.table_sizes, args.ram_sizes = '1e3', '1e5', '2e5'
    args.assembly_sizes = '1e5,2e5'
    args.disk_rows, args.disk_steps = 2e5, 20
  only = args.only.split(',')
  print(f'bench_scale {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; '
        f'{os.cpu_count()} CPUs, {_mem_total_bytes() / 2**30:.0f} GiB RAM; '
        f'{bench_store._load()}')  # pylint: disable=protected-access
  results = {}
  with tempfile.TemporaryDirectory(prefix='bench_scale_', dir=args.dir) as root:
    if 'mining' in only or 'beam' in only:
      corpus = os.path.join(root, 'corpus')
      os.makedirs(corpus)
      mining_sizes = _sizes(args.mining_tokens)
      info = bench_fgrams.build_corpus(corpus, max(mining_sizes + [args.beam_tokens]))
      print(f'\n== mining corpus: Python stdlib .py paragraphs, {info["base_tokens"]:,} '
            f'tokens per copy, {info["copies"]} copies (fresh ids per copy)')
      if 'mining' in only:
        results['mining'] = bench_fgrams.mining_scaling(corpus, mining_sizes, args.repeats)
      if 'beam' in only:
        results['beam'] = bench_fgrams.beam_scaling(corpus, args.beam_tokens,
                                                    _sizes(args.beam_sizes))
    if 'table' in only:
      results['table'] = bench_store.bench_tables(_sizes(args.table_sizes), root)
    if 'assembly' in only:
      results['assembly'] = bench_store.bench_assembly(_sizes(args.assembly_sizes), root)
    if 'ram' in only:
      results['ram'] = bench_store.bench_ram(_sizes(args.ram_sizes), args.ram_d, root)
    if 'disk' in only:
      results['disk'] = bench_store.bench_disk(int(args.disk_rows), args.disk_d, root,
                                               args.disk_steps)
  rows = _targets(results)
  print(f'\n== targets ({bench_store._load()})')  # pylint: disable=protected-access
  width = max(len(r[0]) for r in rows) if rows else 10
  for item, target, measured, holds in rows:
    verdict = {True: 'holds', False: 'MISSED', None: ''}[holds]
    print(f'{item:<{width}}  {target:<34}  {measured:<48}  {verdict}')
  _serving(results)


if __name__ == '__main__':
  main()
