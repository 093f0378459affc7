"""Export: the store holds A_f(f-gram r) in row r, sharded over the mesh, readable outside."""

import jax
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from scone_jax import artifacts, compat, config
from scone_jax.config import ExportConfig
from scone_jax.export import export_embeddings, store_meta
from scone_jax.fgrams import FgramTable
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore

K, V = 3, 30


def _table(num=37):
  """`num` distinct, prefix/suffix-closed f-grams: all 2- and 3-grams over a few tokens."""
  grams = [(a, b) for a in range(4, 10) for b in range(4, 10)]
  grams += [(a, b, c) for a in range(4, 10) for b in range(4, 10) for c in range(4, 10)]
  tokens = np.zeros((len(grams), K), np.int32)
  for i, g in enumerate(grams):
    tokens[i, :len(g)] = g
  lengths = np.array([len(g) for g in grams], np.int32)
  table = FgramTable(tokens, np.full(len(grams), 10), lengths, K, 1)
  return table.slice(num)


def _model(seed: int) -> SconeLM:
  cfg = config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 1, 'model.d_model': 16, 'model.num_heads': 2,
      'model.max_seq_len': 16, 'train.seq_len': 16, 'fgram_model.num_layers': 1,
      'fgram.max_len': K, 'fgram_model.init': 'random'})
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(seed))


@pytest.fixture(scope='module')
def lm():
  return _model(0)


def test_rows_equal_af_outputs_on_an_8_device_mesh(lm, tmp_path):
  table = _table(37)  # Not a multiple of the batch or the shard: padding is dropped.
  mesh = compat.make_mesh((8, 1, 1))
  path = export_embeddings(lm, table, str(tmp_path / 'export'),
                           ExportConfig(dtype='float32', batch_size=12, chunk_rows=10),
                           store_meta(5, table.fingerprint, 'tok', 'w'), mesh=mesh,
                           progress=False)
  want_SxD = np.asarray(lm.fgram_model(table.tokens_SxK, table.lengths))
  store = EmbeddingStore.open(path, 'ram', verify=True, expect={
      'checkpoint_step': 5, 'table_fingerprint': table.fingerprint,
      'tokenizer_fingerprint': 'tok', 'dtype': 'float32'})
  assert (store.num_rows, store.d_model) == want_SxD.shape
  np.testing.assert_allclose(store.gather(np.arange(len(table))), want_SxD, rtol=1e-5,
                             atol=1e-6)
  # Outside readers: plain tensorstore and zarr-python see the same matrix.
  arr = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path}}).result()
  np.testing.assert_array_equal(arr.read().result(), store.gather(np.arange(len(table))))
  zarr = pytest.importorskip('zarr')
  np.testing.assert_array_equal(np.asarray(zarr.open_array(path, mode='r')[:]),
                                arr.read().result())
  with pytest.raises(artifacts.ArtifactError, match='table_fingerprint'):
    EmbeddingStore.open(path, 'ram', expect={'table_fingerprint': _table(36).fingerprint})


def test_bf16_export_rounds_af_outputs(lm, tmp_path):
  table = _table(20)
  path = export_embeddings(lm, table, str(tmp_path / 'export'),
                           ExportConfig(dtype='bfloat16', batch_size=8, chunk_rows=64),
                           {'checkpoint_step': 1},
                           mesh=compat.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                           progress=False)
  want_SxD = np.asarray(lm.fgram_model(table.tokens_SxK, table.lengths))
  got_SxD = EmbeddingStore.open(path, 'disk').gather(np.arange(20)).astype(np.float32)
  np.testing.assert_allclose(got_SxD, want_SxD, rtol=1e-2, atol=1e-2)


def test_baseline_has_nothing_to_export(tmp_path):
  cfg = config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 1, 'model.d_model': 16, 'model.num_heads': 2,
      'model.max_seq_len': 16, 'train.seq_len': 16})
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='baseline'):
    export_embeddings(base, _table(), str(tmp_path / 'x'), ExportConfig(), {})


def test_store_of_another_runs_weights_is_refused(lm, tmp_path):
  # Same table, same step, same tokenizer, another seed: only the weights fingerprint
  # tells the stores apart, and serving (serve.session.open_store's expect) must refuse it.
  from scone_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  other = _model(1)
  fp, fp_other = run_lib.weights_fingerprint(lm), run_lib.weights_fingerprint(other)
  assert fp == run_lib.weights_fingerprint(lm) and fp != fp_other
  table = _table(12)
  path = export_embeddings(lm, table, str(tmp_path / 'export'),
                           ExportConfig(dtype='float32', batch_size=8, chunk_rows=8),
                           store_meta(5, table.fingerprint, 'tok', fp),
                           mesh=compat.make_mesh((1, 1, 1)), progress=False)
  EmbeddingStore.open(path, 'ram', expect=store_meta(5, table.fingerprint, 'tok', fp))
  with pytest.raises(artifacts.ArtifactError, match='weights_fingerprint'):
    EmbeddingStore.open(path, 'ram',
                        expect=store_meta(5, table.fingerprint, 'tok', fp_other))


def test_non_finite_rows_fail_the_export_and_keep_the_old_store(lm, tmp_path):
  """A diverged checkpoint (NaN weights) is never published: the export fails naming the
  first bad row, its f-gram and the step, and the previous store's files are unchanged."""
  table = _table(12)
  out = tmp_path / 'export'
  mesh = compat.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  cfg = ExportConfig(dtype='float32', batch_size=8, chunk_rows=8)
  export_embeddings(lm, table, str(out), cfg, store_meta(5, table.fingerprint, 'tok', 'w'),
                    mesh=mesh, progress=False)
  before = {p.relative_to(tmp_path): p.read_bytes()
            for p in sorted(tmp_path.rglob('*')) if p.is_file()}
  graphdef, state = nnx.split(lm)
  nan_lm = nnx.merge(graphdef, jax.tree.map(lambda x: x * np.nan, state))
  with pytest.raises(ValueError, match=r'store row 0 \(f-gram \[4, 4\]\) is not finite .* '
                                       r'checkpoint step 6'):
    export_embeddings(nan_lm, table, str(out), cfg,
                      store_meta(6, table.fingerprint, 'tok', 'w-nan'), mesh=mesh,
                      progress=False)
  after = {p.relative_to(tmp_path): p.read_bytes()
           for p in sorted(tmp_path.rglob('*')) if p.is_file()}
  assert after == before
  EmbeddingStore.open(str(out), 'ram', expect=store_meta(5, table.fingerprint, 'tok', 'w'))
