"""The row-sharded store (serve/sharded_store.py): P processes' routing in one process
returns the single-host store's rows; 2 and 4 real gloo processes (slow) do too, and 2
processes decoding their own prompts through it generate what one host does.

Run as a script (`--serve_worker`), this file is one process of that decode."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from scone_jax.export import writer
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.sharded_store import Ownership, ShardedStore
from scone_jax.serve.store import open_shards
from phrase_fixtures import table  # noqa: F401  (the table fixture)

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


# -- decoding through the sharded store, one process per host ----------------------------
# Each process decodes its own prompts (different lengths: the padded prompt length is
# agreed across processes); greedy, 6 new tokens.
SERVE_PROMPTS = [[[5, 6, 7], [30, 31]], [[9, 10, 11, 40, 12, 13, 20, 21, 22, 23] * 2, [12]]]


def _serve_setup():
  """The model the test and its workers build alike (same config, same seed)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import test_decode  # pylint: disable=import-outside-toplevel
  from phrase_fixtures import K, V  # pylint: disable=import-outside-toplevel
  from scone_jax.model import SconeLM  # pylint: disable=import-outside-toplevel
  cfg = test_decode._cfg(1)  # pylint: disable=protected-access
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(0))


def _serve_worker(base: str, port: int, process_id: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from phrase_fixtures import BOS  # pylint: disable=import-outside-toplevel
  from scone_jax.fgrams import FgramTable  # pylint: disable=import-outside-toplevel
  from scone_jax.serve.decode import Decoder  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  store = ShardedStore.open(os.path.join(base, 'export'))
  dec = Decoder(_serve_setup(), store, FgramTable.load(os.path.join(base, 'table')),
                batch_size=2, bos_id=BOS, loop='host')
  gen = dec.generate([np.array(p) for p in SERVE_PROMPTS[process_id]], max_new_tokens=6)
  with open(os.path.join(base, f'tokens{process_id}.json'), 'w') as f:
    json.dump({'tokens': [t.tolist() for t in gen.tokens], 'hits': store.stats.hits}, f)


@pytest.mark.slow  # Two gloo processes, each building and compiling a small decoder.
def test_two_processes_decode_through_the_sharded_store(table, tmp_path):
  from phrase_fixtures import BOS  # pylint: disable=import-outside-toplevel
  from scone_jax.serve.decode import Decoder  # pylint: disable=import-outside-toplevel
  from scone_jax.config import ExportConfig  # pylint: disable=import-outside-toplevel
  from scone_jax.export import export_embeddings  # pylint: disable=import-outside-toplevel
  from test_decode import ONE_DEVICE  # pylint: disable=import-outside-toplevel
  lm = _serve_setup()
  table.save(str(tmp_path / 'table'))
  # Shards of 8 rows: both processes own some of the table's rows.
  path = export_embeddings(lm, table, str(tmp_path / 'export'),
                           ExportConfig(dtype='float32', batch_size=64, chunk_rows=8),
                           {'checkpoint_step': 0}, mesh=ONE_DEVICE, progress=False)
  one = Decoder(lm, EmbeddingStore.open(path, 'ram'), table, batch_size=2, bos_id=BOS,
                loop='host')
  want = [[t.tolist() for t in one.generate([np.array(p) for p in prompts], 6).tokens]
          for prompts in SERVE_PROMPTS]
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), '--serve_worker',
                             str(tmp_path), str(port), str(i)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errors = [p.communicate(timeout=900)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  for i in range(2):
    with open(tmp_path / f'tokens{i}.json') as f:
      got = json.load(f)
    assert got['tokens'] == want[i], i
    assert got['hits'] > 0  # The prompts' f-grams came through the exchange.


if __name__ == '__main__' and sys.argv[1:2] == ['--serve_worker']:
  # Run as a script, this file's directory is sys.path[0]: the fixtures modules import.
  _serve_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
