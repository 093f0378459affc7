"""lookup='cache' (serve/device_cache.py): the device matcher equals the host's, and the
cached loop decodes exactly what the per-step host lookup and the training forward do."""

import jax
import numpy as np
import pytest
from test_decode import (B, BOS, PROMPTS, _reference_greedy, scone,  # noqa: F401  (fixtures)
                         table)

from scone_jax import compat, config
from scone_jax.fgrams import IncrementalMatcher
from scone_jax.serve import device_cache, native_lookup
from scone_jax.serve.decode import Decoder, Sampling


def _walk(table, steps, b, seed=3):
  """tokens_TxB: the table's f-grams glued with random tokens (chains grow and break)."""
  rng = np.random.default_rng(seed)
  grams = table.grams()
  tokens_TxB = np.empty((steps, b), np.int32)
  for j in range(b):
    seq = []
    while len(seq) < steps:
      seq += list(grams[rng.integers(len(grams))]) + [int(rng.integers(3, 48))]
    tokens_TxB[:, j] = seq[:steps]
  return tokens_TxB


def test_device_push_equals_host_matcher(table):
  """Row and state after every push, against IncrementalMatcher (the numba reference)."""
  steps, b = 40, 4
  tokens_TxB = _walk(table, steps, b)
  host = IncrementalMatcher(table, b)
  index = device_cache.MatchIndex(table)
  push = jax.jit(device_cache.push)
  codes_BxL = np.full((b, table.max_len - 1), -1, np.int32)
  matched = longest = 0
  for t in range(steps):
    want_B, lens_B = host.push(tokens_TxB[t])
    got_B, codes_BxL = push(index.a_S, index.b_S, index.row_S, codes_BxL, tokens_TxB[t])
    np.testing.assert_array_equal(np.asarray(got_B), want_B)
    np.testing.assert_array_equal(np.asarray(codes_BxL), host.kernel_args[0])
    matched += (want_B >= 0).sum()
    longest += (lens_B == table.max_len).sum()
  assert matched > 40 and longest > 3  # Matches of every length occurred.


@pytest.mark.parametrize('rows,native', [(0, True), (6, True), (10 ** 6, True),
                                         (6, False)])
def test_cache_slab_equals_host_step_slab(scone, table, monkeypatch, rows, native):
  """The loop's slab (device match, cached rows, host rows for misses under lax.cond)
  equals the host lookup's step_slab (host match + gather) at every step; the host serves
  exactly the matched rows >= cache_rows, on exactly the steps that have one."""
  lm, stores = scone
  if not native:
    monkeypatch.setattr(native_lookup, 'store_shards', lambda s: None)
  store = stores['bfloat16']
  dec = Decoder(lm, store, table, batch_size=B, lookup='cache', cache_rows=rows)
  host = Decoder(lm, store, table, batch_size=B, loop='host')
  c = dec.lookup
  assert c.native == native
  step = jax.jit(c.loop_step)
  ids_TxB, _ = table.match(_walk(table, 30, B, seed=5).T)
  codes_BxL = np.full((B, table.max_len - 1), -1, np.int32)
  before = c.counters()
  for tok_B in _walk(table, 30, B, seed=5):
    slab_BxE, codes_BxL = step(c.loop_operand, tok_B, codes_BxL)
    want_BxE = host.lookup.step_slab(tok_B)
    np.testing.assert_array_equal(np.asarray(slab_BxE).view(np.uint16),
                                  want_BxE.view(np.uint16))
  miss_TxB = ids_TxB.T >= c.rows
  assert (ids_TxB >= 0).sum() > 30
  assert tuple(c.counters() - before) == (miss_TxB.sum(), miss_TxB.any(axis=1).sum())
  if rows == 6:
    assert 0 < miss_TxB.any(axis=1).sum() < 30  # Steps with and without a host call.


# (store, cache_rows, native miss path): a few rows cached (mixed steps); the disk tier
# with nothing cached (every match from the host); everything cached (no host call) with
# the callback miss path compiled in. test_cache_slab_equals_host_step_slab covers each
# cache size with each miss path.
CASES = [('float32', 6, True), ('float32-disk', 0, True), ('bfloat16', 10 ** 6, False)]


@pytest.mark.parametrize('store,rows,native', CASES)
def test_cache_greedy_equals_training_path(scone, table, monkeypatch, store, rows,
                                           native):
  lm, stores = scone
  if not native:
    monkeypatch.setattr(native_lookup, 'store_shards', lambda s: None)
  dec = Decoder(lm, stores[store], table, batch_size=B, bos_id=BOS, lookup='cache',
                cache_rows=rows, chunk_steps=4)
  assert dec.lookup.name == 'cache' and dec.lookup.rows == min(rows, len(table))
  assert dec.lookup.stats()['native_misses'] == native
  prompts = [np.array(p) for p in PROMPTS]
  gen = dec.generate(prompts, max_new_tokens=6)
  ref = Decoder(lm, stores[store], table, batch_size=B, bos_id=BOS).generate(prompts, 6)
  for p, toks, want in zip(PROMPTS, gen.tokens, ref.tokens):
    assert list(toks) == list(want)
    if store == 'float32':
      assert list(toks) == _reference_greedy(lm, table, p, 6)
  assert gen.decode_steps == 5
  # The host served the matched rows >= cache_rows of the 5 pushed tokens (the first 5
  # generated), on the steps that had one.
  miss_BxS = np.array([table.match(np.array([[BOS] + p + list(t[:5])]))[0][0, -5:]
                       for p, t in zip(PROMPTS, gen.tokens)]) >= dec.lookup.rows
  assert (gen.host_rows, gen.host_calls) == (miss_BxS.sum(), miss_BxS.any(axis=0).sum())


def test_cache_sampling_and_eos_equal_per_step_lookup(scone, table):
  lm, stores = scone
  prompts = [np.array(p) for p in PROMPTS]
  sampling = Sampling(temperature=1.5, top_k=20)
  kw = dict(batch_size=B, bos_id=BOS, chunk_steps=3)
  cached = Decoder(lm, stores['float32'], table, lookup='cache', cache_rows=6, **kw)
  native = Decoder(lm, stores['float32'], table, **kw)
  first = native.generate(prompts, 9, sampling, seed=4)
  eos = int(first.tokens[0][2])  # Stops row 0 at its third token, others maybe later.
  for args in ((9, sampling, 4, None), (9, sampling, 4, eos), (2, sampling, 0, None)):
    got = cached.generate(prompts, *args[:3], eos_id=args[3])
    want = native.generate(prompts, *args[:3], eos_id=args[3])
    assert [list(t) for t in got.tokens] == [list(t) for t in want.tokens], args
  assert len(got.tokens[0]) == 2


def test_cache_loop_flops_equal_baseline(scone, table):
  """The model's FLOPs are the baseline's; what the cache adds is bookkeeping of
  O(B (d + L log2 S)) integer compares and selects per step (the binary searches, the
  row select), independent of the model's size: 2% of this d-32 test model's step,
  0.1% of the tiny preset's (benchmarks/bench_decode.py prints the ratios)."""
  lm, stores = scone
  flops = lambda dec: compat.cost_flops(dec.compiled_loop_chunk(Sampling()))
  f_base = flops(Decoder(lm, batch_size=B))
  f_native = flops(Decoder(lm, stores['bfloat16'], table, batch_size=B))
  f_cache = flops(Decoder(lm, stores['bfloat16'], table, batch_size=B, lookup='cache',
                          cache_rows=6))
  d, levels = lm.backbone.cfg.d_model, table.max_len - 1
  bound = B * (4 * d + 64 * levels * int(len(table)).bit_length())
  assert f_base > 0 and 0 <= f_cache - f_native <= bound, (f_cache, f_native, bound)
  assert abs(f_native - f_base) <= 0.01 * f_base


def test_cache_options_are_checked(scone, table):
  lm, stores = scone
  with pytest.raises(ValueError, match='cache rows=-1'):
    Decoder(lm, stores['float32'], table, batch_size=B, lookup='cache', cache_rows=-1)
  with pytest.raises(ValueError, match="loop='device'"):
    Decoder(lm, stores['float32'], table, batch_size=B, lookup='cache', loop='host')
  base = config.from_configdict(config.base_config())
  with pytest.raises(config.ConfigError, match='serve.cache_rows'):
    config.replace(base, **{'serve.cache_rows': -1})
  assert config.replace(base, **{'serve.lookup': 'cache', 'serve.cache_rows': 8})
