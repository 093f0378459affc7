"""Tensor-parallel decode (Decoder(mesh=...), serve.tensor) on 8 fake CPU devices: the same
tokens as one device, for the baseline and SCONE, with weights and KV cache split."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from scone_jax import config
from scone_jax.config import ConfigError
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder
from scone_jax.serve.session import serving_mesh
from phrase_fixtures import BOS, K, V, table  # noqa: F401  (the table fixture)
from test_decode import export_one_device

B, HEADS = 4, 8
PROMPTS = [np.array(p) for p in ([5, 6, 7], [9, 10, 11, 40], [30, 31, 12])]


def _cfg(fgram_layers, tensor=1):
  return config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': HEADS,
      'model.max_seq_len': 48, 'model.init_std': 0.3, 'train.seq_len': 32,
      'fgram_model.num_layers': fgram_layers, 'fgram.max_len': K,
      'fgram_model.init': 'random', 'serve.tensor': tensor})


@pytest.fixture(scope='module')
def mesh():
  return serving_mesh(_cfg(0, tensor=8))


@pytest.fixture(scope='module')
def scone(table, tmp_path_factory):
  cfg = _cfg(1)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(0))
  path = export_one_device(lm, table, tmp_path_factory.mktemp('store'), dtype='float32')
  return lm, EmbeddingStore.open(path, 'ram')


def _assert_sharded(dec):
  """The compiled decode step takes heads-split attention weights and returns a KV cache
  split by heads over all 8 devices."""
  step = dec.compiled_decode_step()
  cache = step.output_shardings[2]
  assert cache.k.spec[3] == 'tensor' and cache.k.num_devices == 8
  specs = [s.spec for s in jax.tree.leaves(step.input_shardings)]
  assert sum('tensor' in tuple(s) for s in specs) >= 4  # qkv/out/mlp/vocab per layer.


@pytest.mark.parametrize('loop', ['host', 'device'])
def test_sharded_scone_decode_equals_one_device(scone, table, mesh, loop):
  lm, store = scone
  one = Decoder(lm, store, table, batch_size=B, bos_id=BOS, loop=loop, chunk_steps=4)
  sharded = Decoder(lm, store, table, batch_size=B, bos_id=BOS, loop=loop, chunk_steps=4,
                    mesh=mesh)
  want = one.generate(PROMPTS, max_new_tokens=7).tokens
  got = sharded.generate(PROMPTS, max_new_tokens=7).tokens
  assert [t.tolist() for t in got] == [t.tolist() for t in want]
  # The store's rows reached the sharded decode (not a baseline by mistake).
  assert sharded.lookup.name == ('callback' if loop == 'device' else 'native')
  if loop == 'host':
    _assert_sharded(sharded)


def test_sharded_baseline_decode_equals_one_device(mesh):
  cfg = _cfg(0)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(1))
  want = Decoder(lm, batch_size=B, bos_id=BOS, chunk_steps=4).generate(PROMPTS, 7).tokens
  got = Decoder(lm, batch_size=B, bos_id=BOS, chunk_steps=4, mesh=mesh).generate(
      PROMPTS, 7).tokens
  assert [t.tolist() for t in got] == [t.tolist() for t in want]


def test_sharded_serving_refusals_name_the_fix(scone, table, mesh):
  lm, store = scone
  with pytest.raises(ValueError, match="lookup='callback'"):
    Decoder(lm, store, table, batch_size=B, bos_id=BOS, lookup='native', mesh=mesh)
  assert serving_mesh(_cfg(0)) is None  # serve.tensor=1: one device, as before.
  with pytest.raises(ConfigError, match='exceeds the 8 devices'):
    serving_mesh(_cfg(0, tensor=16))
  with pytest.raises(ConfigError, match='does not divide config.model.num_heads=8'):
    serving_mesh(_cfg(0, tensor=3))
  assert mesh.shape == {'data': 1, 'fsdp': 1, 'tensor': 8}


@pytest.mark.slow  # Trains the shared micro run if this session has not, exports a copy.
def test_generate_with_serve_tensor_gives_the_one_device_text(tmp_path, tmp_path_factory):
  """`--config.serve.tensor=2` through generate (restore, serving_mesh, the device loop):
  the texts of one device."""
  from scone_jax import generate, restore  # pylint: disable=import-outside-toplevel
  from scone_jax.export import export_store  # pylint: disable=import-outside-toplevel
  _, reference = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)  # The shared run stays without a store.
  cfg = restore.run_config(workdir, {'serve.max_new_tokens': 6})
  export_store(cfg, workdir, progress=False)
  prompts = ['the of and', 'w1 w2']
  want = generate.generate(cfg, workdir, prompts).texts
  sharded = restore.run_config(workdir, {'serve.max_new_tokens': 6, 'serve.tensor': 2})
  _, dec = generate.build_decoder(sharded, workdir)
  assert dec.mesh.shape['tensor'] == 2 and dec.lookup.name == 'callback'
  assert generate.generate(sharded, workdir, prompts).texts == want
