"""Every stage on several processes: prepare -> train -> export -> evaluate -> generate on
2 and 4 gloo processes (8 fake CPU devices in all) give what one process gives, for SCONE
and for kind='table' (slow: each stage starts N JAX processes).

What "the same" means, stage by stage:
* prepare (process 0 of the N-process train) writes the one-process artifacts, byte for
  byte (their manifests' fingerprints);
* train: the same losses and final eval loss up to float32 reduction order (rel 1e-5; the
  gradient all-reduce runs over gloo across processes instead of within one), so the
  weights differ by rounding and so does the store: within 1e-4 of its largest value of
  the one-process pipeline's store;
* export, evaluate and generate are then compared on THAT run's checkpoint, against one
  process on a copy of it: the store is the same bytes (every row computed by the same
  per-device program), eval.json the same up to float32 reduction order (the loss sums'
  all-reduce over the 8 devices runs across processes; rel 1e-6, the tokens exact), and
  the generated text the same, from the whole store and from the store sharded across
  the processes (serve.store_sharded).

The fast test runs the new code paths in one process: the sharded store's exchange in a
decode (one process owns every shard) and evaluate's placement overrides.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from test_export_parts import _store_files
from test_multihost_export import EXPORT
from scone_jax import run as run_lib
from scone_jax import evaluate as evaluate_lib
from scone_jax import generate, restore
from scone_jax.config import ConfigError
from scone_jax.export import export_store
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.sharded_store import ShardedStore

compile_cache = th.compile_cache
PROMPTS = ['the of and', 'w1 w2 w3']
SERVE = {'serve.max_new_tokens': 6, 'serve.batch_size': 2}
SHARDED = {'serve.store_sharded': True, 'serve.decode_loop': 'host'}
ONE_PROCESS = {'distributed.mode': 'none'}
ARMS = {'scone': {}, 'table': {'fgram_model.kind': 'table', 'fgram_model.num_layers': 0}}


def _flags(values: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in values.items()]


def _launch(module: str, num: int, port: int, args: list[str]) -> list[str]:
  """`python -m module` on `num` gloo processes (8 // num CPU devices each); their stderr."""
  procs = [subprocess.Popen(
      [sys.executable, '-m', module, *args, '--config.distributed.mode=explicit',
       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       f'--config.distributed.num_processes={num}', f'--config.distributed.process_id={i}'],
      env=th.subprocess_env(8 // num), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(num)]
  return th.wait_all(procs, timeout=900)


def _prepared_fingerprints(workdir: str) -> dict[str, str]:
  """What W/run.json records of the prepared artifacts: every fingerprint in it."""
  found = {}

  def walk(node, key):
    if isinstance(node, dict):
      for k, v in node.items():
        if k == 'fingerprint':
          found[key] = v
        walk(v, f'{key}/{k}')
  walk(run_lib.RunDir(workdir).info(), '')
  return found


def _losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['loss'] for r in run_lib.RunDir(workdir).metrics() if 'loss' in r}


def _rows(workdir: str) -> np.ndarray:
  store = EmbeddingStore.open(os.path.join(workdir, 'export'), 'ram')
  return store.gather(np.arange(store.num_rows))


@pytest.fixture(scope='module')
def one_process_runs(tmp_path_factory):
  """{arm: (config file, one-process run, its store's rows)}: prepare + train + export in
  this process (8 devices), artifacts in the run (W/prepare) as the N-process runs have
  them."""
  from scone_jax.train import loop  # pylint: disable=import-outside-toplevel
  corpus, _ = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  root = tmp_path_factory.mktemp('pipeline')
  runs = {}
  for arm, overrides in ARMS.items():
    config_file = th.micro_config_file(str(root / f'{arm}.py'), corpus, '', **overrides)
    workdir = str(root / f'{arm}-one')
    loop.train(th.micro_config(corpus, '', **overrides), workdir)
    export_store(restore.run_config(workdir, EXPORT), workdir, progress=False)
    runs[arm] = config_file, workdir, _rows(workdir)
  return runs


@pytest.mark.slow
@pytest.mark.parametrize('num', [2, 4])
@pytest.mark.parametrize('arm', sorted(ARMS))
def test_every_stage_on_n_processes_gives_the_one_process_results(
    one_process_runs, tmp_path, arm, num):
  config_file, one, one_rows = one_process_runs[arm]
  workdir, copy = str(tmp_path / 'run'), str(tmp_path / 'one')
  times = {}

  def stage(name, module, args):
    start = time.perf_counter()
    errors = _launch(module, num, th.free_port(), args)
    times[name] = time.perf_counter() - start
    return errors

  # prepare + train: process 0 prepares W/prepare, all train (mesh data=8 over 8 // num
  # devices per process, as the one-process run's data=8).
  stage('train', 'scone_jax.train', [f'--config={config_file}', f'--workdir={workdir}'])
  assert _prepared_fingerprints(workdir) == _prepared_fingerprints(one)
  got, want = _losses(workdir), _losses(one)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for s in want:
    assert got[s] == pytest.approx(want[s], rel=1e-5), s
  with open(os.path.join(workdir, 'eval.json')) as f:
    n_train_eval = json.load(f)['corpora']['heldout']['loss']
  with open(os.path.join(one, 'eval.json')) as f:
    assert n_train_eval == pytest.approx(json.load(f)['corpora']['heldout']['loss'], rel=1e-5)

  # The later stages on this run's checkpoint: N processes here, one on a copy.
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(workdir, 'eval.json'))
  stage('export', 'scone_jax.export', [f'--workdir={workdir}', *_flags(EXPORT)])
  store = _store_files(os.path.join(workdir, 'export'))  # Before a reader caches checks.
  stage('evaluate', 'scone_jax.evaluate', [f'--workdir={workdir}'])
  texts = {}
  for name, serve in (('generate', SERVE), ('generate_sharded', {**SERVE, **SHARDED})):
    out = str(tmp_path / f'{name}.json')
    stage(name, 'scone_jax.generate',
          [f'--workdir={workdir}', *[f'--prompt={p}' for p in PROMPTS], f'--output={out}',
           *_flags(serve)])
    with open(out) as f:
      texts[name] = json.load(f)['texts']

  export_store(restore.run_config(copy, {**EXPORT, **ONE_PROCESS}), copy, progress=False)
  assert store == _store_files(os.path.join(copy, 'export'))
  # Against the one-process PIPELINE (its own training): the weights differ by rounding.
  np.testing.assert_allclose(_rows(workdir), one_rows, rtol=1e-4,
                             atol=1e-4 * float(np.abs(one_rows).max()))
  one_eval = evaluate_lib.evaluate(copy, placement=ONE_PROCESS)['corpora']['heldout']
  with open(os.path.join(workdir, 'eval.json')) as f:
    record = json.load(f)
  assert record['step'] == 4
  n_eval = record['corpora']['heldout']
  assert n_eval['tokens'] == one_eval['tokens']
  for key in ('loss', 'perplexity', 'bits_per_byte'):
    assert n_eval[key] == pytest.approx(one_eval[key], rel=1e-6), key
  want_texts = generate.generate(restore.run_config(copy, {**SERVE, **ONE_PROCESS}), copy,
                                 PROMPTS).texts
  assert texts == {'generate': want_texts, 'generate_sharded': want_texts}
  print(f'{arm} on {num} processes, seconds per stage: {times}')


def test_sharded_store_decode_and_placement_in_one_process(tmp_path, tmp_path_factory,
                                                           monkeypatch):
  """generate with serve.store_sharded (one process owns every shard; each step's rows
  still go through the exchange's collectives) gives the whole store's text, and
  evaluate takes placement overrides (config.distributed / config.mesh) and no others."""
  _, reference = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)  # The shared run stays without a store.
  with pytest.raises(ConfigError, match="set config.serve.decode_loop='host'"):
    restore.run_config(workdir, {'serve.store_sharded': True})
  cfg = restore.run_config(workdir, {**SERVE, 'serve.decode_loop': 'host'})
  export_store(cfg, workdir, progress=False)
  want = generate.generate(cfg, workdir, PROMPTS).texts
  gathers = []
  gather = ShardedStore.gather
  monkeypatch.setattr(ShardedStore, 'gather',
                      lambda self, *a, **k: gathers.append(1) or gather(self, *a, **k))
  got = generate.generate(restore.run_config(workdir, {**SERVE, **SHARDED}), workdir,
                          PROMPTS).texts
  assert got == want and len(gathers) >= SERVE['serve.max_new_tokens'] - 1

  with open(os.path.join(workdir, 'eval.json')) as f:
    trained = json.load(f)['corpora']['heldout']
  record = evaluate_lib.evaluate(workdir, placement=ONE_PROCESS)
  assert record['corpora']['heldout']['tokens'] == trained['tokens']
  assert record['corpora']['heldout']['loss'] == pytest.approx(trained['loss'], rel=1e-6)
  with pytest.raises(ValueError, match='--config.model.d_model cannot be changed here'):
    evaluate_lib.evaluate(workdir, placement={'model.d_model': 64})
