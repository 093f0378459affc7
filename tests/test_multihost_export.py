"""Export on 2 real processes (gloo, 4 fake CPU devices each, the 8 devices of the one-process
export): the store is the one-process store byte for byte, and a kill -9 of one process
mid-export resumes to the same store. Slow: each process starts JAX and compiles A_f."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_helpers as th
from test_export_parts import _store_files

# 2000 mined f-grams at most: ~16 shards, so each process owns several and a kill lands
# between two of them. 64 rows per batch keeps 8 rows per device on 1 x 8 and 2 x 4
# devices: the same per-device program, hence the same bits.
EXPORT = {'export.dtype': 'float32', 'export.batch_size': 64, 'export.chunk_rows': 128}
_EXPORT = [f'--config.{k}={v}' for k, v in EXPORT.items()]
# Process 1 of the killed export sleeps after each shard's marker, so the kill lands
# while shards are still missing (the test checks that it did).
_SLOW_DRIVER = '''
import runpy, sys, time
from scone_jax.export import writer
write = writer.artifacts.write_json_atomic
def slow(path, value):
  write(path, value)
  time.sleep(1.0)
writer.artifacts.write_json_atomic = slow
sys.argv = ['export'] + sys.argv[1:]
runpy.run_module('scone_jax.export', run_name='__main__')
'''


def _start(workdir: str, num: int, slow: bool = False,
           mesh: tuple[str, ...] = ()) -> list[subprocess.Popen]:
  if num == 1:
    cmd = [sys.executable, '-m', 'scone_jax.export', f'--workdir={workdir}', *_EXPORT]
    return [subprocess.Popen(cmd, env=th.subprocess_env(8), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)]
  port = th.free_port()
  procs = []
  for i in range(num):
    head = ([sys.executable, '-c', _SLOW_DRIVER] if slow and i == 1 else
            [sys.executable, '-m', 'scone_jax.export'])
    cmd = head + [f'--workdir={workdir}', *_EXPORT, *mesh, '--config.distributed.mode=explicit',
                  f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                  f'--config.distributed.num_processes={num}',
                  f'--config.distributed.process_id={i}']
    procs.append(subprocess.Popen(cmd, env=th.subprocess_env(8 // num),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  return procs




@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(the one-process store's files, a fresh copy of the reference run per call)."""
  base = str(tmp_path_factory.getbasetemp())
  _, ref = th.reference_run(base)
  copies = tmp_path_factory.mktemp('export_runs')

  def copy(name: str) -> str:
    workdir = str(copies / name)
    shutil.copytree(ref, workdir, ignore=shutil.ignore_patterns('export*'))
    return workdir
  one = copy('one')
  th.wait_all(_start(one, 1))
  return _store_files(os.path.join(one, 'export')), copy


@pytest.mark.slow
def test_two_processes_export_the_one_process_store(runs):
  """A_f's params split over fsdp=8 across both processes (the one-process export
  replicates them over data=8): every matmul all-gathers its weights first, so each row
  is computed exactly as on one process, and the store is the same bytes."""
  want, copy = runs
  workdir = copy('two')
  errors = th.wait_all(_start(workdir, 2, mesh=('--config.mesh.fsdp=8',)))
  assert _store_files(os.path.join(workdir, 'export')) == want
  assert 'rows/s on 2 process(es), 8 devices' in errors[0]


@pytest.mark.slow
def test_kill_9_of_one_process_resumes_to_the_same_store(runs):
  want, copy = runs
  workdir = copy('killed')
  done = os.path.join(workdir, 'export.partial.done')
  procs = _start(workdir, 2, slow=True)
  deadline = time.time() + 600
  while time.time() < deadline and not (
      os.path.isdir(done) and sum(f[0].isdigit() for f in os.listdir(done)) >= 3):
    assert procs[1].poll() is None, procs[1].communicate()[1][-4000:]
    time.sleep(0.05)
  os.kill(procs[1].pid, signal.SIGKILL)
  # Process 0 is left waiting in a collective (or fails on the lost peer): a pod's
  # scheduler would end the job; so does the test.
  try:
    procs[0].wait(timeout=30)
  except subprocess.TimeoutExpired:
    os.kill(procs[0].pid, signal.SIGKILL)
  for p in procs:
    p.communicate()
  assert not os.path.exists(os.path.join(workdir, 'export')), 'the kill came too late'
  marked = sum(f[0].isdigit() for f in os.listdir(done))
  errors = th.wait_all(_start(workdir, 2))
  assert _store_files(os.path.join(workdir, 'export')) == want
  shards = len(want[1]['shard_crc32c'])
  assert 3 <= marked < shards
  # The resumed export computed only the shards without a (verified) marker.
  computed = int(re.search(r'export: (\d+) rows in', errors[0]).group(1))
  assert 0 < computed < want[1]['num_rows'] and not os.path.exists(done)


@pytest.mark.slow
def test_two_processes_export_a_hashed_run_split_across_them(tmp_path_factory):
  """kind='hashed' with its tables' columns split over fsdp=8 across both processes:
  every process gathers each shard's slice, process 0 writes it; the same bytes."""
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  corpus, artifacts = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, artifacts, **{
      'fgram_model.num_layers': 0, 'fgram_model.kind': 'hashed',
      'fgram_model.combine': 'add', 'fgram_model.hash_max_n': 3,
      'fgram_model.hash_buckets': 257, 'train.steps': 2, 'train.eval_batches': 1})
  root = tmp_path_factory.mktemp('hashed_export')
  loop.train(cfg, str(root / 'one'))
  shutil.copytree(str(root / 'one'), str(root / 'two'))
  th.wait_all(_start(str(root / 'one'), 1))
  th.wait_all(_start(str(root / 'two'), 2, mesh=('--config.mesh.fsdp=8',)))
  want = _store_files(str(root / 'one' / 'export'))
  assert want[1]['num_rows'] == 2 * 257 and len(want[1]['shard_crc32c']) == 5
  assert _store_files(str(root / 'two' / 'export')) == want
