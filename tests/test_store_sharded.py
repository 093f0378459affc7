"""The row-sharded store (serve/sharded_store.py): P processes' routing in one process
returns the single-host store's rows; 2 and 4 real gloo processes (slow) do too."""

import os
import subprocess
import sys

import numpy as np
import pytest

from scone_jax.export import writer
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.sharded_store import Ownership, ShardedStore
from scone_jax.serve.store import open_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, D, CHUNK = 1000, 8, 128  # 8 shards, the last one partial (104 rows).


@pytest.fixture(scope='module')
def store_path(tmp_path_factory):
  def rows(start, stop):
    r = np.arange(start, stop, dtype=np.float32)[:, None]
    return np.sin(r * 0.37 + np.arange(D, dtype=np.float32)[None] * 1.3) * (1 + r / S)
  return writer.write_store(str(tmp_path_factory.mktemp('sharded') / 'export'), S, D,
                            'bfloat16', CHUNK, rows, {'checkpoint_step': 3},
                            inner_rows=16, progress=False)


def test_ownership_is_round_robin_by_shard():
  own = Ownership(num_rows=S, chunk_rows=CHUNK, process_count=3)
  assert [list(own.shards(p)) for p in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
  rows = np.array([-1, 0, 127, 128, 383, 384, 999])
  np.testing.assert_array_equal(own.owner(rows), [-1, 0, 0, 1, 2, 0, 1])
  np.testing.assert_array_equal(own.local(rows[1:])[0], [0, 0, 0, 0, 1, 2])
  np.testing.assert_array_equal(own.local(rows[1:])[1], [0, 127, 0, 127, 0, 103])
  # C: the most rows one process owns in one request, rounded up to a power of two, at
  # most N: 2 (process 0 owns two of each request), 4 (three), 3 (three, N = 3).
  assert own.capacity(own.owner(np.array([[0, 1, -1, -1], [5, 400, 130, -1]]))) == 2
  assert own.capacity(own.owner(np.array([[0, 1, 2, -1], [5, 400, 130, -1]]))) == 4
  assert own.capacity(own.owner(np.array([[0, 1, 2]]))) == 3
  assert own.capacity(np.full((2, 4), -1)) == 1


@pytest.mark.parametrize('processes,tier', [(1, 'ram'), (3, 'ram'), (4, 'disk')])
def test_routing_returns_the_single_host_rows(store_path, processes, tier):
  """Every process's answer routed to its requester, as the all-to-all does, assembles
  into exactly what one host's store gathers, for requests with misses and repeats."""
  whole = EmbeddingStore.open(store_path, 'ram')
  parts = [ShardedStore(store_path, p, processes, tier, expect={'checkpoint_step': 3})
           for p in range(processes)]
  assert sum(part.nbytes for part in parts) == whole.nbytes  # Each row held once.
  rng = np.random.default_rng(processes)
  for _ in range(3):
    ids_PxN = rng.integers(-1, S, (processes, 16))
    ids_PxN[:, :3] = [S - 1, 0, 0]  # The partial last shard; a repeated row.
    sends = [part.answer(ids_PxN) for part in parts]
    for q, part in enumerate(parts):
      recv = np.stack([sends[p][q] for p in range(processes)])
      got = part.assemble(ids_PxN, recv)
      np.testing.assert_array_equal(got.view(np.uint16), whole.gather(ids_PxN[q]).view(
          np.uint16))


def test_bad_use_is_a_clear_error(store_path):
  part = ShardedStore(store_path, 0, 2)
  with pytest.raises(ValueError, match='no exchange'):
    part.gather(np.array([1, 2]))
  with pytest.raises(ValueError, match=r'process_index=2 must be in \[0, process_count=2\)'):
    ShardedStore(store_path, 2, 2)
  with pytest.raises(IndexError, match=r'row ids must be in \[-1, 1000\)'):
    part._check(np.array([3, S]))  # pylint: disable=protected-access
  with pytest.raises(Exception, match='checkpoint_step'):
    open_shards(store_path, [0], expect={'checkpoint_step': 4})


def _bench(processes: str) -> str:
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_store_exchange.py'),
       f'--processes={processes}', '--rows=4096', '--d_model=64', '--chunk_rows=256',
       '--steps=20', '--warmup=2', '--verify', '--rtt_reps=50', '--bulk_mb=4'],
      capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow  # Two gloo processes: ~1 min on a loaded 2-core machine.
def test_two_processes_return_the_single_host_rows():
  out = _bench('2')
  assert '| 2 |' in out and '40 steps, 0 differ' in out, out


@pytest.mark.slow  # Four gloo processes.
def test_four_processes_return_the_single_host_rows():
  out = _bench('4')
  assert '| 4 |' in out and '80 steps, 0 differ' in out, out
