"""Export across processes: rows/s of `export_embeddings` on 1 process vs N processes over
the same global devices (gloo on CPU), beside a hand-written minimal loop (jit A_f over
the same batches, results copied to the host, nothing written): the fastest honest
reference for the compute. Every number comes from the same run, including the peak that
A_f's FLOP/s are a fraction of: a 2048^3 float32 jnp.dot split over the same devices, in a
fresh process with the same threads (and, on an accelerator, model/flops.py's data-sheet
PEAK_FLOPS for its device kind).

Usage:
  python benchmarks/bench_export.py           # S = 16,384, d 128, 2 devices, 1 vs 2 processes
  python benchmarks/bench_export.py --quick   # S = 4,096, d 64: a smoke run

Each configuration runs in fresh processes (this script with --worker), so each pays
A_f's compilation inside its timed export, as a real export does (JAX's start-up and the
model's init are outside the timing); the minimal loop pays its compilation too. Each
runs --repeats times and the fastest is kept; CPU seconds (all threads, summed over the
processes) show the work done whatever the machine's other load. The table is
synthetic (bench_store.synthetic_table: half bigrams, half trigrams; vocab 2**17, K = 5):
A_f's cost does not depend on which f-grams it runs. A_f and the backbone are random (`init='random'`), seed 0, built sharded
on the global mesh (data = every device), so every process holds the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', type=int, default=16384, help='S, f-grams exported')
  p.add_argument('--d_model', type=int, default=128)
  p.add_argument('--af_layers', type=int, default=1)
  p.add_argument('--batch_size', type=int, default=1024, help='export.batch_size')
  p.add_argument('--chunk_rows', type=int, default=4096, help='export.chunk_rows')
  p.add_argument('--devices', type=int, default=2, help='global devices, split over processes')
  p.add_argument('--processes', type=int, default=2, help='the multi-process run')
  p.add_argument('--repeats', type=int, default=3, help='runs per configuration (best kept)')
  p.add_argument('--quick', action='store_true', help='S = 4,096 and d 64')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # export|minimal|peak
  p.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--port', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--out', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _worker(args) -> None:
  """One process of one configuration: prints one JSON line (process 0)."""
  # pylint: disable=g-import-not-at-top  (JAX must see the environment the parent set)
  import jax
  import numpy as np
  from flax import nnx
  from scone_jax import config
  from scone_jax import mesh as mesh_lib
  from scone_jax.config import DistributedConfig, ExportConfig, MeshConfig
  from scone_jax.export import export_embeddings
  from scone_jax.model import SconeLM, create_sharded, flops
  from bench_store import VOCAB, synthetic_table

  if args.worker == 'peak':
    print(json.dumps(_matmul_peak()))
    return
  num = args.processes if args.worker == 'export' and args.port else 1
  if num > 1:
    mesh_lib.maybe_initialize_distributed(DistributedConfig(
        mode='explicit', coordinator_address=f'127.0.0.1:{args.port}', num_processes=num,
        process_id=args.process_id))
  d, layers = (64, args.af_layers) if args.quick else (args.d_model, args.af_layers)
  cfg = config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 1, 'model.d_model': d, 'model.num_heads': max(1, d // 64),
      'model.mlp_dim': 4 * d, 'model.max_seq_len': 16, 'train.seq_len': 16,
      'fgram_model.num_layers': layers, 'fgram.max_len': 5, 'fgram_model.init': 'random',
      'tokenizer.vocab_size': VOCAB})
  table = synthetic_table(args.rows)
  mesh = mesh_lib.make_mesh(MeshConfig())
  lm = create_sharded(lambda: SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=5,
                                      vocab_size=VOCAB, rngs=nnx.Rngs(0)), mesh)
  flops_per_row = flops.flops_per_token(cfg, VOCAB).fgram_forward_per_fgram
  started, cpu_started = time.perf_counter(), time.process_time()
  if args.worker == 'export':
    export_embeddings(lm, table, args.out, ExportConfig(
        dtype='bfloat16', batch_size=args.batch_size, chunk_rows=args.chunk_rows),
                      {'bench': True}, mesh=mesh, progress=False)
  else:  # The minimal loop: A_f on each batch, copied to the host, on one process.
    graphdef, state = nnx.split(lm.fgram_model)
    af = jax.jit(lambda state, t, n: nnx.merge(graphdef, state)(t, n))
    rows_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    for lo in range(0, args.rows, args.batch_size):
      ids = np.arange(lo, min(lo + args.batch_size, args.rows))
      tokens = np.zeros((args.batch_size, 5), np.int32)
      lens = np.zeros(args.batch_size, np.int32)
      tokens[:ids.size], lens[:ids.size] = table.tokens_of(ids), table.lengths[ids]
      np.asarray(af(state, jax.device_put(tokens, rows_sh), jax.device_put(lens, rows_sh)))
  # Every process reports: the parent sums CPU seconds (all threads) over processes.
  print(json.dumps({'seconds': time.perf_counter() - started,
                    'cpu_seconds': time.process_time() - cpu_started, 'rows': args.rows,
                    'flops_per_row': flops_per_row}))


def _matmul_peak(n: int = 2048, tries: int = 5) -> dict:
  """The devices' float32 matmul FLOP/s: an n^3 jnp.dot with its rows split over every
  device of the mesh the export uses (MeshConfig(): data = every device), jitted, best of
  `tries` after a warm-up. The ceiling A_f's dense layers could reach on these devices."""
  # pylint: disable=g-import-not-at-top  (JAX must see the environment the parent set)
  import jax
  import numpy as np
  from scone_jax import mesh as mesh_lib
  from scone_jax.config import MeshConfig
  from scone_jax.model import flops
  mesh = mesh_lib.make_mesh(MeshConfig())
  rows_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(0)
  a_NxN = jax.device_put(rng.standard_normal((n, n), np.float32), rows_sh)
  b_NxN = jax.device_put(rng.standard_normal((n, n), np.float32),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  dot = jax.jit(jax.numpy.dot, out_shardings=rows_sh)
  dot(a_NxN, b_NxN).block_until_ready()
  best = float('inf')
  for _ in range(tries):
    started = time.perf_counter()
    dot(a_NxN, b_NxN).block_until_ready()
    best = min(best, time.perf_counter() - started)
  kind = jax.devices()[0].device_kind
  # An accelerator's data-sheet peak for all the devices; None on CPU (not in the table).
  sheet = flops.peak_flops_per_device(kind)
  return {'flops_per_s': 2 * n**3 / best, 'device_kind': kind, 'devices': jax.device_count(),
          'sheet_flops_per_s': sheet and sheet * jax.device_count(), 'seconds': best}


def _run(args, worker: str, processes: int) -> dict:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep +
             os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_'
                        f'count={args.devices // processes}').strip())
  out = tempfile.mkdtemp(prefix='bench_export_')
  common = [sys.executable, os.path.abspath(__file__), f'--worker={worker}',
            f'--rows={args.rows}', f'--d_model={args.d_model}', f'--af_layers={args.af_layers}',
            f'--batch_size={args.batch_size}', f'--chunk_rows={args.chunk_rows}',
            f'--processes={processes}', f'--out={os.path.join(out, "export")}'] + (
                ['--quick'] if args.quick else [])
  procs = [subprocess.Popen(common + [f'--process_id={i}'] + (
      [f'--port={port}'] if processes > 1 else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outputs = [p.communicate() for p in procs]
  subprocess.run(['rm', '-rf', out], check=True)
  for p, (_, err) in zip(procs, outputs):
    if p.returncode:
      raise SystemExit(f'{worker} worker failed:\n{err[-3000:]}')
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  if worker == 'peak':
    return reports[0]
  return {**reports[0], 'seconds': max(r['seconds'] for r in reports),
          'cpu_seconds': sum(r['cpu_seconds'] for r in reports)}


def _best(args, worker: str, processes: int) -> dict:
  """The fastest of --repeats runs (the machine is shared: slower runs waited for it)."""
  return min((_run(args, worker, processes) for _ in range(args.repeats)),
             key=lambda r: r['seconds'])


def main() -> None:
  args = _flags()
  if args.quick:
    args.rows = 4096
  if args.worker:
    _worker(args)
    return
  if args.devices % args.processes:  # Each process gets devices / processes of them.
    raise SystemExit(f'--devices={args.devices} does not split equally over '
                     f'--processes={args.processes}')
  print(f'export of S = {args.rows:,} rows, batch {args.batch_size}, shards of '
        f'{args.chunk_rows}, {args.devices} CPU devices in all; '
        'load average %.1f %.1f %.1f (this machine is shared)' % os.getloadavg())
  # The peak in a fresh process on the same devices (threads) as the 1-process runs; the
  # fastest of --repeats processes, like the runs it divides.
  peak = min((_run(args, 'peak', 1) for _ in range(args.repeats)), key=lambda r: r['seconds'])
  sheet = peak['sheet_flops_per_s']
  print(f'measured float32 matmul peak: {peak["flops_per_s"] / 1e9:.1f} GFLOP/s (2048^3 '
        f'jnp.dot over the {peak["devices"]} {peak["device_kind"]} devices, best of 5 x '
        f'{args.repeats} processes); data-sheet peak: ' + (
            f'{sheet / 1e12:.0f} TFLOP/s' if sheet else 'none for this device kind'))
  runs = {'minimal loop, 1 process': _best(args, 'minimal', 1),
          'export, 1 process': _best(args, 'export', 1),
          f'export, {args.processes} processes': _best(args, 'export', args.processes)}
  base = None
  for name, r in runs.items():
    rate = r['rows'] / r['seconds']
    base = base or rate
    af = rate * r['flops_per_row']
    print(f'{name:>26}: {r["seconds"]:7.2f} s  {rate:9,.0f} rows/s  '
          f'{rate / base:5.2f}x the minimal loop  {r["cpu_seconds"]:6.1f} CPU s  '
          f'({af / 1e9:.2f} GFLOP/s of A_f = {af / peak["flops_per_s"]:.1%} of the measured '
          'peak' + (f', {af / sheet:.2%} of the data sheet)' if sheet else ')'))
  one, many = (runs['export, 1 process'], runs[f'export, {args.processes} processes'])
  print(f'{args.processes} processes / 1 process: {one["seconds"] / many["seconds"]:.2f}x '
        'rows/s (same global devices)')
  print('load average after: %.1f %.1f %.1f' % os.getloadavg())


if __name__ == '__main__':
  main()
