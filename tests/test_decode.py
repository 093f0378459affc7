"""Decoder: serving-path logits and generation equal the training forward (A_f on the fly)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import compat, config
from scone_jax.batches.tagging import tag_fgrams
from scone_jax.config import ExportConfig
from scone_jax.export import export_embeddings
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder
from scone_jax.serve.sampling import Sampling, sample
from phrase_fixtures import BOS, K, PHRASES, V, table  # noqa: F401  (the table fixture)

B = 5  # One batch size for every decoder here, so they share compilations.
ONE_DEVICE = compat.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _cfg(fgram_layers):
  return config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2,
      'model.max_seq_len': 48, 'model.init_std': 0.3, 'train.seq_len': 32,
      'fgram_model.num_layers': fgram_layers, 'fgram.max_len': K,
      'fgram_model.init': 'random'})  # A non-trivial A_f at step 0 (test_model.py says why).


def export_one_device(lm, table, directory, step: int = 0, **export) -> str:
  """lm's f-gram rows exported into directory/export in chunks of 64 rows, on one device
  (sharded export is test_export's business; this keeps setup short)."""
  return export_embeddings(lm, table, str(directory / 'export'),
                           ExportConfig(batch_size=64, chunk_rows=64, **export),
                           {'checkpoint_step': step}, mesh=ONE_DEVICE, progress=False)


def bos_rows(seqs, t: int) -> dict[str, np.ndarray]:
  """BOS-prepended rows padded to t (segment 0): inputs, segment ids and positions."""
  inputs = np.zeros((len(seqs), t), np.int32)
  segments = np.zeros_like(inputs)
  for b, s in enumerate(seqs):
    inputs[b, :len(s) + 1] = [BOS] + list(s)
    segments[b, :len(s) + 1] = 1
  return {'inputs_BxT': inputs, 'segment_ids_BxT': segments,
          'positions_BxT': np.broadcast_to(np.arange(t, dtype=np.int32), inputs.shape)}


@pytest.fixture(scope='module')
def scone(table, tmp_path_factory):
  cfg = _cfg(1)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(0))
  out = {}
  for dtype in ('float32', 'bfloat16'):
    path = export_one_device(lm, table, tmp_path_factory.mktemp(dtype), dtype=dtype)
    out[dtype] = EmbeddingStore.open(path, 'ram')
    if dtype == 'float32':  # The disk tier takes the decoder's unfused path.
      out['float32-disk'] = EmbeddingStore.open(path, 'disk')
  return lm, out


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
  return jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))


def _train_forward(lm, table, seqs, t=24):
  """Logits of the training path: BOS-prepended rows, table.match + unique rows, lm(batch).

  Rows are padded to `t` (segment 0) so every call reuses one compilation.
  """
  batch = bos_rows(seqs, t)
  if lm.has_fgram_side:
    batch = tag_fgrams(batch, table, capacity=batch['inputs_BxT'].size)
    batch = {k: v for k, v in batch.items() if not k.startswith('stats/')}
  graphdef, state = nnx.split(lm)
  return np.asarray(_jitted_forward(graphdef)(state, batch)), batch


# Prompts and continuations: matches inside the prompt, across the prompt/continuation
# boundary, right at the start (BOS blocks an f-gram's tail), a 1-token prompt, tokens
# that never match.
PROMPTS = [[5, 6, 7], [7, 8, 9, 10], [6, 7, 8, 44, 12], [13], [45, 46, 47, 45]]
CONTS = [[8, 9, 10, 11, 12], [11, 40, 12, 13, 5], [13, 5, 6, 7, 8], [12, 13, 20, 21, 22],
         [44, 30, 31, 9, 10]]


@pytest.mark.parametrize('dtype,rtol', [('float32', 1e-5), ('bfloat16', 3e-2),
                                        ('float32-disk', 1e-5)])
def test_serving_logits_equal_training_forward(scone, table, dtype, rtol):
  lm, stores = scone
  store = stores[dtype]
  dec = Decoder(lm, store, table, batch_size=B, bos_id=BOS)
  hits_before = store.stats.hits
  got = dec.teacher_forced_logits([np.array(p) for p in PROMPTS],
                                  [np.array(c) for c in CONTS])
  want, batch = _train_forward(lm, table, [p + c for p, c in zip(PROMPTS, CONTS)])
  matched = batch['fgram_slot_BxT'] >= 0
  assert matched.sum() >= 15 and (~matched).sum() >= 15  # Both kinds of position occur.
  fed = [len(p) + len(c) for p, c in zip(PROMPTS, CONTS)]  # Inputs: all but the last.
  # Store rows served every matched input position.
  assert store.stats.hits - hits_before == sum(matched[b, :n].sum() for b, n in enumerate(fed))
  for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
    n = len(p) + len(c)  # BOS + prompt + continuation minus the last token.
    ref = want[b, :n]
    assert got[b].shape == ref.shape
    err = np.abs(got[b] - ref).max() / np.abs(ref).max()
    assert err < rtol, (b, err)


def test_store_rows_change_the_logits(scone, table):
  """The comparison above can fail: a decoder without the store differs at matches."""
  lm, stores = scone
  seqs = [np.array(p) for p in PROMPTS]
  scone_dec = Decoder(lm, stores['float32'], table, batch_size=B, bos_id=BOS)
  plain_dec = Decoder(lm, batch_size=B, bos_id=BOS)
  conts = [np.array(c[:1]) for c in CONTS]
  a = scone_dec.teacher_forced_logits(seqs, conts)
  b = plain_dec.teacher_forced_logits(seqs, conts)
  assert max(np.abs(x - y).max() for x, y in zip(a, b)) > 1e-3


def _reference_greedy(lm, table, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    logits, _ = _train_forward(lm, table, [seq])
    seq.append(int(np.argmax(logits[0, len(seq)])))
  return seq[len(prompt):]


# (store, loop, lookup, chunk_steps): the device loop with each lookup, the host loop.
LOOPS = [('float32', 'device', 'native', 64), ('float32', 'device', 'callback', 2),
         ('float32-disk', 'device', 'auto', 4), ('float32', 'host', 'auto', 32)]


@pytest.mark.parametrize('store,loop,lookup,chunk', LOOPS)
def test_greedy_generation_equals_training_path(scone, table, store, loop, lookup, chunk):
  lm, stores = scone
  dec = Decoder(lm, stores[store], table, batch_size=B, bos_id=BOS, loop=loop,
                lookup=lookup, chunk_steps=chunk)
  assert dec.lookup.name == ('native' if lookup == 'auto' else lookup)
  hits_before = stores[store].stats.hits
  prompts = PROMPTS[:3]
  gen = dec.generate([np.array(p) for p in prompts], max_new_tokens=6)
  for p, toks in zip(prompts, gen.tokens):
    assert list(toks) == _reference_greedy(lm, table, p, 6)
  # The device loop times every step (compiled beforehand); the host loop all but one.
  assert gen.decode_steps == (5 if loop == 'device' else 4) and gen.tokens_per_second > 0
  # Prompt gather + one lookup per decode step and row reached the store's counters.
  assert stores[store].stats.hits > hits_before


@pytest.mark.parametrize('loop,chunk', [('device', 3), ('host', 32)])
def test_baseline_generation_is_the_plain_backbone(table, loop, chunk):
  cfg = _cfg(0)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(1))
  dec = Decoder(lm, batch_size=B, bos_id=BOS, loop=loop, chunk_steps=chunk)
  assert dec.lookup.name == 'none'
  gen = dec.generate([np.array(PROMPTS[0]), np.array(PROMPTS[3])], max_new_tokens=7)
  for p, toks in zip([PROMPTS[0], PROMPTS[3]], gen.tokens):
    assert list(toks) == _reference_greedy(lm, None, p, 7)


def _loop_flops(dec):
  return compat.cost_flops(dec.compiled_loop_chunk(Sampling()))


def test_device_loop_flops_equal_baseline(scone, table):
  """The whole compiled chunk (while loop, lookup inside) costs what the baseline's does."""
  lm, stores = scone
  f_base = _loop_flops(Decoder(lm, batch_size=B))
  assert f_base > 0
  for lookup in ('native', 'callback'):
    f_scone = _loop_flops(Decoder(lm, stores['bfloat16'], table, batch_size=B,
                                  lookup=lookup))
    assert abs(f_scone - f_base) <= 0.01 * f_base, (lookup, f_scone, f_base)


def test_decode_step_flops_equal_baseline(scone, table):
  lm, stores = scone
  cfg = _cfg(0)
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(1))
  f_scone = compat.cost_flops(
      Decoder(lm, stores['bfloat16'], table, batch_size=B).compiled_decode_step())
  f_base = compat.cost_flops(Decoder(base, batch_size=B).compiled_decode_step())
  assert f_base > 0
  assert abs(f_scone - f_base) <= 0.01 * f_base, (f_scone, f_base)


def test_accounting_counts_backbone_on_device_and_table_offloaded(scone, table):
  from scone_jax.model import flops
  from scone_jax.serve import account
  lm, stores = scone
  cfg = _cfg(1)
  acc = account(cfg, Decoder(lm, stores['bfloat16'], table, batch_size=B), V)
  counts = flops.param_counts(cfg, V)
  # Counted from the decoder's arrays == the one analytical accounting == flops.py.
  assert acc.accelerator_params == acc.arm.infer_accel_params == counts.backbone_total
  assert acc.arm.side_params == counts.fgram_total > 0
  assert acc.offloaded_params == len(table) * 32 and acc.offloaded_bytes == len(table) * 64
  base = account(_cfg(0), Decoder(lm, batch_size=B), V)
  assert base.offloaded_params == 0 and base.accelerator_params == acc.accelerator_params
  f_scone, f_base = acc.xla_flops_per_token, base.xla_flops_per_token
  assert abs(f_scone - f_base) <= 0.01 * f_base
  assert 'offloaded f-gram store (ram)' in acc.table()
  assert 'A_f measured' not in acc.table()
  measured = account(cfg, Decoder(lm, stores['bfloat16'], table, batch_size=B), V, 1.5)
  assert 'A_f worst case' in measured.table() and 'A_f measured' in measured.table()
  assert base.arm.train_flops_per_token < measured.arm.train_flops_per_token_measured < (
      measured.arm.train_flops_per_token)


def test_eos_stops_rows_and_sampling_is_seeded(scone, table):
  lm, stores = scone
  host = Decoder(lm, stores['float32'], table, batch_size=B, bos_id=BOS, loop='host')
  dev = Decoder(lm, stores['float32'], table, batch_size=B, bos_id=BOS, chunk_steps=2)
  prompts = [np.array(PROMPTS[0]), np.array(PROMPTS[1])]
  greedy = dev.generate(prompts, 6)
  assert [len(t) for t in greedy.tokens] == [6, 6]  # max_new_tokens, over 3 chunks.
  eos = int(greedy.tokens[0][2])
  first = list(greedy.tokens[0]).index(eos)
  for dec in (host, dev):
    stopped = dec.generate(prompts, 6, eos_id=eos)
    assert list(stopped.tokens[0]) == list(greedy.tokens[0][:first + 1])
    # Row 1 stops at its own EOS, or runs on (the batch runs while a row has not stopped).
    row1 = list(greedy.tokens[1])
    assert list(stopped.tokens[1]) == row1[:row1.index(eos) + 1 if eos in row1 else 6]
  one = dev.generate(prompts, 1)
  assert [len(t) for t in one.tokens] == [1, 1] and one.decode_steps == 0
  s = Sampling(temperature=1.0, top_k=5, top_p=0.9)
  a, b = dev.generate(prompts, 6, s, seed=3), dev.generate(prompts, 6, s, seed=3)
  assert all((x == y).all() for x, y in zip(a.tokens, b.tokens))
  # The device loop samples with the host loop's keys: the same draws.
  c = host.generate(prompts, 6, s, seed=3)
  assert all((x == y).all() for x, y in zip(a.tokens, c.tokens))
  d = dev.generate(prompts, 6, s, seed=4)
  assert any((x != y).any() for x, y in zip(a.tokens, d.tokens))


def test_sampling_filters_match_numpy_reference():
  # 400 rows of the same distribution: each row is an independent draw.
  logits = np.log(np.tile(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32), (400, 1)))

  def draws(s):
    return set(np.asarray(sample(logits, jax.random.key(0), s)).tolist())
  assert draws(Sampling()) == {0}
  assert draws(Sampling(1.0, top_k=2)) == {0, 1}
  # Nucleus 0.8: 0.5 + 0.2 + 0.15 = 0.85 is the first prefix reaching 0.8.
  assert draws(Sampling(1.0, top_p=0.8)) == {0, 1, 2}
  assert draws(Sampling(1.0)) == {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match='top_p'):
    Sampling(1.0, top_p=0.0)


def test_bad_prompts_are_clear_errors(scone, table):
  lm, stores = scone
  dec = Decoder(lm, stores['float32'], table, batch_size=2, bos_id=BOS)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    dec.generate([np.array([5]), np.array([], np.int32)], 4)
  with pytest.raises(ValueError, match='exceeds the context of 48'):
    dec.generate([np.arange(2, 40)], 10)
  with pytest.raises(ValueError, match='batch_size=2'):
    dec.generate([np.array([5])] * 3, 4)
  with pytest.raises(ValueError, match='rows but the f-gram table has 8'):
    Decoder(lm, stores['float32'], table.slice(8))
  tensorstore = EmbeddingStore.open(stores['float32'].path, 'disk', disk_reader='tensorstore')
  with pytest.raises(ValueError, match="lookup='native' needs the CPU backend and a store"):
    Decoder(lm, tensorstore, table, lookup='native')
  with pytest.raises(ValueError, match="loop='gpu' must be"):
    Decoder(lm, loop='gpu')


@pytest.mark.slow
def test_trained_run_export_then_generate(tmp_path):
  """A briefly trained micro run: export_store + generate, and logits vs training path."""
  import train_helpers as th  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts, generate
  from scone_jax.export import export_store
  from scone_jax import restore
  from scone_jax.train import loop

  th.write_corpus(str(tmp_path / 'corpus'))
  cfg = th.micro_config(str(tmp_path / 'corpus'), **{'model.max_seq_len': 64,
                                                     'serve.max_new_tokens': 6})
  workdir = str(tmp_path / 'run')
  loop.train(cfg, workdir)
  with pytest.raises(artifacts.ArtifactError, match='python -m scone_jax.export'):
    generate.generate(cfg, workdir, ['the of'])
  export_store(cfg, workdir, progress=False)
  out = generate.generate(cfg, workdir, ['the of and', 'w1 w2'])
  assert len(out.texts) == 2 and out.tokens_per_second > 0

  run, dec = generate.build_decoder(restore.run_config(workdir, {'serve.batch_size': 2}),
                                    workdir)
  assert dec.store.manifest['checkpoint_step'] == run.step == cfg.train.steps
  tok = run.tokenizer
  seqs = [np.asarray(x, np.int32) for x in tok.encode(['the of and to in is that',
                                                       'for it as with was on be'])]
  got = dec.teacher_forced_logits([s[:3] for s in seqs], [s[3:7] for s in seqs])
  graphdef, state = nnx.split(run.lm)
  for b, s in enumerate(seqs):
    inputs = np.concatenate([[tok.bos_id], s[:7]])[None].astype(np.int32)
    batch = {'inputs_BxT': inputs, 'segment_ids_BxT': np.ones_like(inputs),
             'positions_BxT': np.arange(inputs.shape[1], dtype=np.int32)[None]}
    batch = tag_fgrams(batch, run.table, capacity=inputs.size)
    batch = {k: v for k, v in batch.items() if not k.startswith('stats/')}
    want = np.asarray(nnx.merge(graphdef, state)(batch))[0, :7]
    # bf16 store (the export default): rows are rounded to 8 mantissa bits.
    assert np.abs(got[b] - want).max() <= 3e-2 * np.abs(want).max()


def test_embedding_rule_is_the_stores_at_every_position_above_capacity(scone, table):
  """Training and eval tag batches with the same `tag_fgrams`; here a batch that needs more
  A_f rows than fgram_model.capacity: every matched position still gets its f-gram's
  embedding, equal to the exported store's row (what serving reads), and every other
  position its token embedding. No fallback."""
  lm, stores = scone
  grams = [list(g) for g in table.grams()]
  sep, t = 3, 24  # Token 3 never occurs in the mined documents.
  rows, row = [], [BOS]
  for g in grams:
    if len(row) + len(g) + 1 > t:
      rows.append(row)
      row = [BOS]
    row += g + [sep]
  rows.append(row)
  inputs = np.zeros((len(rows), t), np.int32)
  segments = np.zeros_like(inputs)
  for b, r in enumerate(rows):
    inputs[b, :len(r)], segments[b, :len(r)] = r, 1
  batch = {'inputs_BxT': inputs, 'segment_ids_BxT': segments,
           'positions_BxT': np.broadcast_to(np.arange(t, dtype=np.int32), inputs.shape)}
  batch = tag_fgrams(batch, table, capacity=8)
  assert batch['stats/fgram_above_capacity'] == 1 and batch['fgram_tokens_RxW'].shape[0] > 8
  batch = {k: v for k, v in batch.items() if not k.startswith('stats/')}
  graphdef, state = nnx.split(lm)
  x_train = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s).input_embeddings(b))(
      state, batch))
  ids, _ = table.match(inputs, segments)
  matched = (ids >= 0) & (segments > 0)
  assert matched.sum() >= len(grams)
  tokens = np.asarray(lm.backbone.embed(inputs))
  x_serve = np.where(matched[..., None],
                     stores['float32'].gather(np.maximum(ids, 0).ravel()).reshape(tokens.shape),
                     tokens)
  np.testing.assert_allclose(x_train, x_serve, rtol=1e-5, atol=1e-6)


def test_sampling_never_picks_ids_past_the_tokenizer_vocab():
  # A model trained with model.vocab_size above the tokenizer's has logits for ids no text
  # maps to; here they are the largest, and neither greedy nor sampling may return them.
  logits_BxV = jnp.asarray([[0.0, 1.0, 0.5, 9.0, 8.0]] * 4)
  key = jax.random.key(0)
  assert np.asarray(sample(logits_BxV, key, Sampling(vocab_size=3))).tolist() == [1] * 4
  assert np.asarray(sample(logits_BxV, key, Sampling())).tolist() == [3] * 4
  drawn = {int(t) for i in range(20) for t in np.asarray(
      sample(logits_BxV, jax.random.key(i), Sampling(temperature=5.0, vocab_size=3)))}
  assert drawn and drawn <= {0, 1, 2}
