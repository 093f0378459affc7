"""The benchmark scripts still run end to end (their numbers are not checked here: they are
measurements, recorded in BENCHMARKS.md)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from scone_jax import config as config_lib
from scone_jax.model import SconeLM
from scone_jax.serve.decode import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULE = {}  # bench_decode, loaded once per session: its absl flags can be defined once.


@pytest.mark.slow  # ~40 s: mining, Beam with 1 and 2 workers, a table, two stores.
def test_bench_scale_quick_prints_every_target(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_scale.py'), '--quick',
       f'--dir={tmp_path}'], capture_output=True, text=True, check=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))
  out = proc.stdout
  for line in ('mining vs the np.sort bound', 'Beam table == local miner',
               'table, S = 100,000', 'RAM-tier load, S = 200,000, cold cache',
               'gather, S = 200,000, 16 rows', 'disk tier, batch 16, warm',
               '== what one host serves'):
    assert line in out, (line, out[-3000:])
  beam = [l for l in out.splitlines() if l.startswith('Beam table == local miner')]
  assert len(beam) == 1 and beam[0].rstrip().endswith('holds'), beam
  assert os.listdir(tmp_path) == []  # Scratch files removed.


def _bench_decode():
  """benchmarks/bench_decode.py loaded by path (its absl flags defined, never parsed)."""
  spec = importlib.util.spec_from_file_location(
      'bench_decode', os.path.join(ROOT, 'benchmarks', 'bench_decode.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('b', [1, 3])
def test_minimal_loop_tokens_equal_the_project_decode(b):
  """bench_decode's independent minimal loop decodes the same greedy tokens as the
  project's device-loop decoder (the benchmark checks this before timing; here at a tiny
  size, so a change to either is caught without running the benchmark)."""
  bench_decode = _MODULE.get('bench_decode') or _MODULE.setdefault('bench_decode',
                                                                    _bench_decode())
  cfg = config_lib.replace(config_lib.from_configdict(config_lib.base_config()), **{
      'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 4,
      'model.max_seq_len': 48, 'model.init_std': 0.3, 'model.dtype': 'float32',
      'train.seq_len': 16, 'fgram_model.num_layers': 0, 'fgram.max_len': 3})
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=3, vocab_size=64,
               rngs=nnx.Rngs(0))
  prompts = np.random.default_rng(b).integers(4, 64, (b, 7)).astype(np.int32)
  new_tokens = 20
  want = np.stack(Decoder(lm, batch_size=b, cache_len=48).generate(
      list(prompts), new_tokens).tokens)
  with_bos = np.concatenate([np.ones((b, 1), np.int32), prompts], 1)
  got, _, _ = bench_decode.MinimalLoop(lm, b, 48).generate(with_bos, new_tokens)
  assert got.shape == (b, new_tokens)
  np.testing.assert_array_equal(got, want)
