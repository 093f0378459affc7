"""lookup='device' (serve/device_cache.py + serve/ffi_gather.py): the device match and the
compiled C++ gather give the host path's rows bit for bit (float32, bf16, int8, fp8
stores) and its tokens through the compiled device loop; 'auto' picks it on a CUDA GPU
and otherwise says why not; the CUDA build of the same source compiles where the CUDA
runtime's headers are."""

import ctypes

import jax
import numpy as np
import pytest
from absl import logging
from flax import nnx
from test_decode import B, BOS, PROMPTS, _cfg, export_one_device
from test_device_cache import _walk

from scone_jax import config
from scone_jax.fgrams import mine_fgrams
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore, factory, ffi_gather, lookup as lookup_lib
from scone_jax.serve.decode import Decoder, Sampling
from phrase_fixtures import K, V

# At this temperature the PRNG key alone picks the sampled tokens (logits / 1e4 are
# ~1e-4 apart), so every model here samples (nearly) the same stream for one seed.
HOT, SEED, NEW = Sampling(temperature=1e4), 3, 9


def _lm(combine: str, layers: int = 1, seed: int = 0) -> SconeLM:
  cfg = config.replace(_cfg(layers), **{'fgram_model.combine': combine})
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(seed))


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  """(models, table, stores): the table mined from the stream the decoders sample, so most
  of the device loop's pushes match; the replace model's float32 / bf16 / int8 / fp8 stores
  and the add model's float32 store."""
  prompts = [np.array(p) for p in PROMPTS]
  base = Decoder(_lm('replace', layers=0, seed=1), batch_size=B, bos_id=BOS, chunk_steps=4)
  stream = base.generate(prompts, NEW, HOT, seed=SEED).tokens
  docs = [np.array([BOS] + p + list(t), np.int32) for p, t in zip(PROMPTS, stream)]
  table = mine_fgrams(docs * 2, max_len=K, size=256, min_count=2, progress=False)
  lms = {'replace': _lm('replace'), 'add': _lm('add', seed=2)}
  out = {}
  for kind, kw in (('float32', {'dtype': 'float32'}), ('bfloat16', {'dtype': 'bfloat16'}),
                   ('int8', {'quant': 'int8'}), ('fp8', {'quant': 'fp8'})):
    path = export_one_device(lms['replace'], table, tmp_path_factory.mktemp(kind), **kw)
    out[kind] = EmbeddingStore.open(path, 'ram')
  out['add'] = EmbeddingStore.open(export_one_device(
      lms['add'], table, tmp_path_factory.mktemp('add'), dtype='float32'), 'ram')
  return lms, table, out


@pytest.mark.parametrize('kind', ['float32', 'bfloat16', 'int8', 'fp8'])
def test_device_rows_equal_host_rows_bit_for_bit(stores, kind):
  """Every step's slab from the loop step (device match + FFI gather, raw bits bitcast on
  the device) equals the host lookup's step_slab in every bit; the gather crosses as
  unsigned integers, never float8."""
  lms, table, st = stores
  dec = Decoder(lms['replace'], st[kind], table, batch_size=B, lookup='device')
  host = Decoder(lms['replace'], st[kind], table, batch_size=B, loop='host')
  c = dec.lookup
  assert (c.name, c.native, c.rows) == ('device', True, 0)
  raw = lookup_lib.raw_dtype(c.slab_dtype)
  step = jax.jit(c.loop_step)
  codes_BxL = np.full((B, table.max_len - 1), -1, np.int32)
  tokens_TxB = _walk(table, 24, B, seed=7)
  before = c.counters()
  for tok_B in tokens_TxB:
    slab_BxE, codes_BxL = step(c.loop_operand, tok_B, codes_BxL)
    want_BxE = host.lookup.step_slab(tok_B)
    assert slab_BxE.dtype == want_BxE.dtype
    np.testing.assert_array_equal(np.asarray(slab_BxE).view(raw), want_BxE.view(raw))
  matched = int((table.match(tokens_TxB.T)[0] >= 0).sum())
  assert matched > 20 and c.counters()[0] - before[0] == matched
  jaxpr = jax.make_jaxpr(c.loop_step)(c.loop_operand, tokens_TxB[0], codes_BxL)
  (call,) = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == 'ffi_call']
  assert call.outvars[0].aval.dtype == raw


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its equations' parameters."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _eqns(inner)


# The disk tier's shards (the gather's shard arithmetic) are test_device_cache's.
@pytest.mark.parametrize('model,kind', [('replace', 'fp8'), ('add', 'add')])
def test_device_loop_tokens_equal_host_path(stores, model, kind):
  """Sampled tokens through the compiled device loop with lookup='device' equal those of
  the loop whose rows come from the host match + gather (lookup='callback'), and the FFI
  gather served exactly the matched rows, most of the pushes."""
  lms, table, st = stores
  prompts = [np.array(p) for p in PROMPTS]
  kw = dict(batch_size=B, bos_id=BOS, chunk_steps=4)
  dec = Decoder(lms[model], st[kind], table, lookup='device', **kw)
  assert dec.lookup.name == 'device' and dec.lookup.rule == ('add' if model == 'add' else
                                                             'replace')
  got = dec.generate(prompts, NEW, HOT, seed=SEED)
  want = Decoder(lms[model], st[kind], table, lookup='callback', **kw).generate(
      prompts, NEW, HOT, seed=SEED)
  assert [list(t) for t in got.tokens] == [list(t) for t in want.tokens]
  # The pushed tokens (all generated but the last): their matched rows, on the steps that
  # had one.
  n = NEW - 1
  match_BxS = np.array([table.match(np.array([[BOS] + p + list(t[:n])]))[0][0, -n:]
                        for p, t in zip(PROMPTS, got.tokens)]) >= 0
  assert match_BxS.sum() >= B * n // 2, match_BxS.sum()
  assert (got.host_rows, got.host_calls) == (match_BxS.sum(), match_BxS.any(axis=0).sum())


def test_baseline_device_lookup_is_none():
  assert Decoder(_lm('replace', layers=0), batch_size=B,
                 lookup='device').lookup.name == 'none'


def test_callback_crosses_raw_bits(stores):
  """The io_callback of the host lookup returns uint8 for an fp8 slab (bitcast after)."""
  lms, table, st = stores
  c = Decoder(lms['replace'], st['fp8'], table, batch_size=B, lookup='callback').lookup
  jaxpr = jax.make_jaxpr(c.loop_step)(c.loop_operand, np.zeros(B, np.int32), 0)
  (call,) = [e for e in _eqns(jaxpr.jaxpr) if 'callback' in e.primitive.name]
  assert call.outvars[0].aval.dtype == np.uint8
  assert jaxpr.eqns[-1].outvars[0].aval.dtype == c.slab_dtype


def _make(store, table, mode, lm):
  return factory.make_lookup(store, table, combine=lm.combine, d_model=store.d_model,
                             dtype=np.float32, batch_size=B, mode=mode)


def test_auto_on_a_gpu_picks_device_or_says_why(stores, monkeypatch):
  lms, table, st = stores
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  # A CUDA backend whose handler loads (here: the CPU build stands in for it).
  monkeypatch.setattr(ffi_gather, 'target', lambda backend: ffi_gather.TARGET)
  assert _make(st['float32'], table, 'auto', lms['replace']).name == 'device'
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))

  def unavailable(backend):
    raise ffi_gather.GatherUnavailable('no C++ compiler (test)')

  monkeypatch.setattr(ffi_gather, 'target', unavailable)
  assert _make(st['float32'], table, 'auto', lms['replace']).name == 'callback'
  assert len(warnings) == 1 and 'no C++ compiler (test)' in warnings[0]
  assert 'gpu' in warnings[0]
  with pytest.raises(ValueError, match="lookup='device' needs the FFI gather: no C"):
    _make(st['float32'], table, 'device', lms['replace'])
  # lookup='cache' keeps its callback for the misses.
  assert not _make(st['float32'], table, 'cache', lms['replace']).native


def test_device_lookup_options_are_checked(stores, monkeypatch):
  lms, table, st = stores
  with pytest.raises(ValueError, match="lookup='device' runs inside the device loop"):
    Decoder(lms['replace'], st['float32'], table, batch_size=B, lookup='device',
            loop='host')
  monkeypatch.setattr(factory.native_lookup, 'store_shards', lambda s: None)
  with pytest.raises(ValueError, match='no rows in memory or memory-mapped'):
    _make(st['float32'], table, 'device', lms['replace'])
  assert config.replace(config.from_configdict(config.base_config()),
                        **{'serve.lookup': 'device'})


def test_cuda_build_compiles_and_exports_its_handler():
  """The CUDA handler of the same source builds against the CUDA runtime here (no GPU
  needed to compile or load it); skipped where no CUDA runtime headers are installed."""
  if ffi_gather.cuda_runtime() is None:
    pytest.skip('no CUDA runtime headers + libcudart on this machine')
  lib = ctypes.CDLL(str(ffi_gather.build(cuda=True)))
  assert lib.SconeGatherCuda and lib.SconeGatherHost


def test_missing_compiler_is_reported(monkeypatch):
  monkeypatch.setenv('CXX', '/nonexistent/g++')
  with pytest.raises(ffi_gather.GatherUnavailable, match=r'no C\+\+ compiler'):
    ffi_gather.compile_command(cuda=False)
