"""Cross-host store benchmark: the row-sharded store's per-step exchange latency at P
processes beside the latency model of ARCHITECTURE.md, with that model's terms measured in
the same run.

Usage (sizes as in BENCHMARKS.md):
  python benchmarks/bench_store_exchange.py --rows=16384 --verify   # P = 1, 2 and 4
  python benchmarks/bench_store_exchange.py --processes=2 --steps=50 --verify   # quick

P local processes (one CPU device each, gloo collectives over loopback TCP) each open
their shards of one synthetic store (`ShardedStore`, tier 'ram') and run `--steps`
gathers of B ids drawn Zipf-like over the rows (a step's exchange: the all-gather of the
ids, the local answer, the all-to-all of the rows, the assembly). `--verify` checks every
step's rows bitwise against the single-host `EmbeddingStore.gather`. P = 1 runs the same
two collectives on one device: the software floor (two jitted dispatches and transfers).

The model: t = t_gather(B/P) + RTT + B (P-1)/P * row_bytes / BW (at P = 1 no other process
is asked: t_gather(B) alone), each term measured here:
t_gather is `EmbeddingStore.gather` of B/P rows (RAM tier), RTT and BW a raw TCP
ping-pong and bulk send between two processes on loopback (no jax, no gloo): the fastest
honest exchange on this machine. The machine may be shared: the load average is printed.
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

import numpy as np


def _load() -> str:
  return 'load average %.1f %.1f %.1f' % os.getloadavg()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _rows(start: int, stop: int, d_model: int) -> np.ndarray:
  """Deterministic rows: any slice can be recomputed."""
  r = np.arange(start, stop, dtype=np.float32)[:, None]
  return np.sin(r * 0.37 + np.arange(d_model, dtype=np.float32)[None] * 1.3)


def write_store(path: str, num_rows: int, d_model: int, chunk_rows: int) -> str:
  from scone_jax.export import writer  # pylint: disable=import-outside-toplevel
  return writer.write_store(path, num_rows, d_model, 'bfloat16', chunk_rows,
                            lambda a, b: _rows(a, b, d_model), {}, inner_rows=16,
                            progress=False)


def step_ids(num_rows: int, batch: int, process: int, step: int) -> np.ndarray:
  """A step's B ids of one process: Zipf-like over the rows (frequent f-grams are low
  rows), a quarter -1 (no match)."""
  rng = np.random.default_rng([process, step])
  ids = np.minimum(rng.zipf(1.2, batch) - 1, num_rows - 1)
  ids[rng.random(batch) < 0.25] = -1
  return ids.astype(np.int64)


def worker(args) -> None:
  """One process of the exchange: P of these run in lockstep."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  from scone_jax.serve import EmbeddingStore  # pylint: disable=import-outside-toplevel
  from scone_jax.serve.sharded_store import ShardedStore  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}',
                             num_processes=args.num_processes, process_id=args.process_id)
  store = ShardedStore.open(args.store)
  whole = EmbeddingStore.open(args.store, 'disk') if args.verify else None
  num_rows = store.num_rows
  for step in range(args.warmup):
    store.gather(step_ids(num_rows, args.batch, args.process_id, args.steps + step))
  store.seconds[:] = 0
  store.calls = 0
  per_step, mismatched, cpu = [], 0, 0.0
  for step in range(args.steps):
    ids = step_ids(num_rows, args.batch, args.process_id, step)
    c0, t0 = time.process_time(), time.perf_counter()
    rows = store.gather(ids)
    per_step.append(time.perf_counter() - t0)
    cpu += time.process_time() - c0
    if whole is not None:
      mismatched += int(not np.array_equal(rows.view(np.uint16),
                                           whole.gather(ids).view(np.uint16)))
  result = {'process': args.process_id, 'median_ms': 1e3 * float(np.median(per_step)),
            'p90_ms': 1e3 * float(np.percentile(per_step, 90)),
            'parts_ms': (1e3 * store.seconds / max(store.calls, 1)).tolist(),
            'cpu_ms': 1e3 * cpu / args.steps,
            'owned_bytes': store.nbytes, 'verified_steps': args.steps if whole else 0,
            'mismatched_steps': mismatched}
  with open(args.out, 'w') as f:
    json.dump(result, f)


def run_processes(store: str, num_processes: int, batch: int, steps: int, warmup: int,
                  verify: bool, timeout: float = 600) -> list[dict]:
  """Runs `num_processes` workers over `store`; their results, process order."""
  port = _free_port()
  with tempfile.TemporaryDirectory(prefix='exchange_') as out_dir:
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + ['--xla_force_host_platform_device_count=1'])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
    procs = []
    for i in range(num_processes):
      cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'--store={store}',
             f'--port={port}', f'--num_processes={num_processes}', f'--process_id={i}',
             f'--batch={batch}', f'--steps={steps}', f'--warmup={warmup}',
             f'--out={os.path.join(out_dir, f"{i}.json")}'] + (['--verify'] if verify else [])
      procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True))
    errors = []
    for p in procs:
      try:
        errors.append(p.communicate(timeout=timeout)[1])
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        raise
    for p, err in zip(procs, errors):
      if p.returncode:
        raise RuntimeError(f'exchange worker failed (exit {p.returncode}):\n{err[-4000:]}')
    results = []
    for i in range(num_processes):
      with open(os.path.join(out_dir, f'{i}.json')) as f:
        results.append(json.load(f))
  return results


# --- the model's terms, measured --------------------------------------------------------

def _echo_server(port_file: str, size: int, reps: int) -> None:
  with socket.socket() as srv:
    srv.bind(('127.0.0.1', 0))
    srv.listen(1)
    with open(port_file + '.tmp', 'w') as f:
      f.write(str(srv.getsockname()[1]))
    os.rename(port_file + '.tmp', port_file)
    conn, _ = srv.accept()
    with conn:
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      for _ in range(reps):  # Ping-pong: 8 bytes back and forth.
        _recv_exact(conn, 8)
        conn.sendall(b'x' * 8)
      _recv_exact(conn, size)  # Bulk: one large send, one byte back.
      conn.sendall(b'y')


def _recv_exact(conn, n: int) -> None:
  buf = bytearray(n)
  view = memoryview(buf)
  while n:
    got = conn.recv_into(view, n)
    if not got:
      raise ConnectionError('peer closed')
    view, n = view[got:], n - got


def loopback_rtt_bw(reps: int = 2000, size: int = 256 << 20) -> tuple[float, float]:
  """(median round trip seconds, bytes/s) of raw TCP between two processes here."""
  with tempfile.TemporaryDirectory() as d:
    port_file = os.path.join(d, 'port')
    code = (f'import bench_store_exchange as b; '
            f'b._echo_server({port_file!r}, {size}, {reps})')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.abspath(__file__)),
                    os.environ.get('PYTHONPATH', '')) if p))
    server = subprocess.Popen([sys.executable, '-c', code], env=env)
    while not os.path.exists(port_file):
      time.sleep(0.01)
    with open(port_file) as f:
      port = int(f.read())
    with socket.create_connection(('127.0.0.1', port)) as conn:
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        conn.sendall(b'p' * 8)
        _recv_exact(conn, 8)
        times.append(time.perf_counter() - t0)
      payload = bytes(size)
      t0 = time.perf_counter()
      conn.sendall(payload)
      _recv_exact(conn, 1)
      bw = size / (time.perf_counter() - t0)
    server.wait()
  return float(np.median(times)), bw


def local_gather_seconds(store_path: str, rows: int, reps: int = 2000) -> float:
  """Median seconds of one RAM-tier `EmbeddingStore.gather` of `rows` rows."""
  from scone_jax.serve import EmbeddingStore  # pylint: disable=import-outside-toplevel
  store = EmbeddingStore.open(store_path, 'ram')
  ids = step_ids(store.num_rows, max(rows, 1), 0, 0)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    store.gather(ids)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', default='1,2,4')
  parser.add_argument('--rows', type=int, default=1 << 16)
  parser.add_argument('--d_model', type=int, default=2048)
  parser.add_argument('--chunk_rows', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=16, help='B: ids per process per step')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--verify', action='store_true')
  parser.add_argument('--rtt_reps', type=int, default=2000, help='raw TCP ping-pongs')
  parser.add_argument('--bulk_mb', type=int, default=256, help='raw TCP bulk send size')
  parser.add_argument('--dir', default=None, help='scratch directory (default: temp)')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  for name in ('store', 'out'):
    parser.add_argument(f'--{name}', help=argparse.SUPPRESS)
  for name in ('port', 'num_processes', 'process_id'):
    parser.add_argument(f'--{name}', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  row_bytes = 2 * args.d_model
  with tempfile.TemporaryDirectory(prefix='bench_exchange_', dir=args.dir) as root:
    store = write_store(os.path.join(root, 'export'), args.rows, args.d_model,
                        args.chunk_rows)
    rtt, bw = loopback_rtt_bw(args.rtt_reps, args.bulk_mb << 20)
    print(f'{_load()}; {os.cpu_count()} CPUs; store {args.rows} rows x d={args.d_model} '
          f'bf16, B={args.batch} ids per process per step, {args.steps} steps')
    print(f'raw TCP loopback: RTT {1e6 * rtt:.1f} us, bulk {bw / 1e9:.2f} GB/s')
    print('| P | measured ms/step (median, slowest process) | p90 | requests | '
          'local answer+assemble | rows exchange (the three: mean ms) | CPU ms/step (all '
          'threads) | model ms | measured / model | verified |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for p in [int(x) for x in args.processes.split(',')]:
      results = run_processes(store, p, args.batch, args.steps, args.warmup, args.verify)
      t_gather = local_gather_seconds(store, -(-args.batch // p))
      # One process exchanges with no one: no round trip, no bytes.
      model = t_gather + (rtt + args.batch * (p - 1) / p * row_bytes / bw if p > 1 else 0.0)
      slow = max(results, key=lambda r: r['median_ms'])
      parts = slow['parts_ms']
      bad = sum(r['mismatched_steps'] for r in results)
      verified = (f'{sum(r["verified_steps"] for r in results)} steps, {bad} differ'
                  if args.verify else 'no')
      print(f'| {p} | {slow["median_ms"]:.3f} | {slow["p90_ms"]:.3f} | {parts[0]:.3f} | '
            f'{parts[1]:.3f} | {parts[2]:.3f} | {slow["cpu_ms"]:.3f} | {1e3 * model:.3f} | '
            f'{slow["median_ms"] / (1e3 * model):.1f} | {verified} |', flush=True)
      if bad:
        raise SystemExit(f'{bad} steps returned rows other than the single-host store')
    print(_load())


if __name__ == '__main__':
  main()
