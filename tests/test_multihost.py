"""A real 2-process run on one machine (gloo collectives, 2 fake CPU devices each) trains
through the same CLI and matches the single-process run's losses."""

import os
import subprocess
import sys

import jax
from flax import nnx
import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import batches
from scone_jax import config as config_lib
from scone_jax.config import ConfigError, MeshConfig
from scone_jax.fgrams import FgramTable
from scone_jax.tokenizer import TokenShards
from scone_jax import mesh as mesh_lib
from scone_jax.train import metrics as metrics_lib
from scone_jax.train import step as step_lib


def test_explicit_mode_errors_name_the_keys():
  # config.validate holds these rules: they fail at the config boundary, before any work.
  base = config_lib.Config()
  with pytest.raises(ConfigError, match='coordinator_address'):
    config_lib.replace(base, **{'distributed.mode': 'explicit'})
  with pytest.raises(ConfigError, match=r'process_id=2 must be in \[0, num_processes=2\)'):
    config_lib.replace(base, **{'distributed.mode': 'explicit',
                                'distributed.coordinator_address': '127.0.0.1:1',
                                'distributed.num_processes': 2, 'distributed.process_id': 2})


def test_reopening_a_run_drops_the_training_jobs_explicit_processes(tmp_path):
  """A run trained as process i of N (explicit coordinator) reopens for evaluate, export
  and generate as ONE process unless those commands say otherwise: the recorded
  coordinator belongs to a job that is gone (it would wait for it forever)."""
  from scone_jax import restore
  from scone_jax.train import loop
  trained = config_lib.replace(th.micro_config(str(tmp_path)), **{
      'distributed.mode': 'explicit', 'distributed.coordinator_address': '10.0.0.1:1234',
      'distributed.num_processes': 2, 'distributed.process_id': 1})
  loop.write_run_config(trained, str(tmp_path))
  assert restore.run_config(str(tmp_path), {}).distributed == config_lib.DistributedConfig()
  again = restore.run_config(str(tmp_path), {'distributed.mode': 'explicit',
                                             'distributed.coordinator_address': 'h:1',
                                             'distributed.num_processes': 4})
  assert (again.distributed.mode, again.distributed.num_processes) == ('explicit', 4)
  auto = config_lib.replace(trained, **{'distributed.mode': 'auto'})
  loop.write_run_config(auto, str(tmp_path / 'auto'))
  assert restore.run_config(str(tmp_path / 'auto'), {}).distributed.mode == 'auto'


def test_two_process_slices_give_the_one_process_loss(tmp_path_factory):
  """In-process version of the 2-process property: the batches two processes build (each
  its row slice, each its own f-gram list) assemble into a global batch whose loss equals
  the one-process batch's, through the same train step's loss."""
  base = str(tmp_path_factory.getbasetemp())
  cfg, _ = th.reference_run(base)
  _, artifacts = th.shared_dirs(base)
  shards = TokenShards.open(os.path.join(artifacts, 'tokens', 'train'))
  table = FgramTable.load(os.path.join(artifacts, 'fgrams'))
  whole = batches.split_stats(next(batches.make_train_iterator(cfg, shards, table)))[0]
  parts = [batches.split_stats(next(batches.make_train_iterator(cfg, shards, table, p, 2)))[0]
           for p in range(2)]
  # As to_global_arrays does: every process pads its A_f rows to the largest bucket.
  rows = max(part['fgram_tokens_RxW'].shape[0] for part in parts)
  parts = [batches.tagging.pad_fgram_rows(part, rows) for part in parts]
  capacity = parts[0]['fgram_tokens_RxW'].size
  glued = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
  glued['fgram_slot_BxT'] = np.concatenate(
      [batches.offset_slots(part['fgram_slot_BxT'], p, capacity)
       for p, part in enumerate(parts)])
  for key in ('inputs_BxT', 'targets_BxT', 'weights_BxT', 'positions_BxT'):
    np.testing.assert_array_equal(glued[key], whole[key])
  mesh = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, state, _ = step_lib.create_train_state(cfg, mesh, cfg.tokenizer.vocab_size,
                                                 cfg.fgram.max_len)

  @jax.jit
  def loss(state, batch):
    model = nnx.merge(graphdef, state.params, state.other)
    loss_sum, weight_sum = step_lib.cross_entropy_sums(
        model(batch), batch['targets_BxT'], batch['weights_BxT'])
    return loss_sum / weight_sum
  assert float(loss(state, glued)) == pytest.approx(float(loss(state, whole)), rel=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tmp_path_factory):
  base = str(tmp_path_factory.getbasetemp())
  cfg, ref = th.reference_run(base)  # 1 process x 8 devices, mesh data=8.
  corpus, artifacts = th.shared_dirs(base)
  # mesh fsdp=2 so each process's 2 devices hold different param shards: the run needs
  # cross-process all-gathers, not only the gradient all-reduce.
  config_file = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, artifacts,
                                     **{'mesh.fsdp': 2})
  workdir = str(tmp_path / 'run')
  port = th.free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, '-m', 'scone_jax.train', f'--config={config_file}',
           f'--workdir={workdir}', '--config.distributed.mode=explicit',
           f'--config.distributed.coordinator_address=127.0.0.1:{port}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
    procs.append(subprocess.Popen(cmd, env=th.subprocess_env(2), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  th.wait_all(procs, timeout=600)
  got = {r['step']: r for r in metrics_lib.read_metrics(workdir)}
  want = {r['step']: r for r in metrics_lib.read_metrics(ref)}
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for s in want:
    # Same global batches (each process builds its row slice), same init; only the
    # reduction order differs (2x2 devices over gloo vs 8 local).
    assert got[s]['loss'] == pytest.approx(want[s]['loss'], rel=1e-5), s
    assert got[s]['tokens'] == want[s]['tokens'], s
  data_dir = os.path.join(workdir, 'checkpoints', '4', 'data')
  assert sorted(os.listdir(data_dir)) == ['commit_success.txt', 'process_0-of-2.json',
                                          'process_1-of-2.json']
  assert got[4]['eval/heldout/loss'] == pytest.approx(want[4]['eval/heldout/loss'], rel=1e-5)
