"""fgram_model.kind='hashed': the hash, collision counts, the training embedding, and the
train -> export -> host-store decode path (logits and XLA FLOPs against the baseline)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import compat, config
from scone_jax.config import ConfigError, ExportConfig
from scone_jax.export import export_hashed, hashed_meta, store_meta
from scone_jax.model import SconeLM
from scone_jax.model import hashed
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder, Sampling
from scone_jax.serve.hashed import HashedLookup

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)

# (n-gram, M) -> bucket, fixed: the hash of a stored export must never change silently.
# Computed once from `hash_reference` (the spec in model/hashed.py's docstring).
FIXED = [((1, 2), 1000, 339), ((7, 9), 1000, 360), ((2**31 - 1, 5), 1000, 801),
         ((1, 2, 3), 2**31 - 1, 1157227812), ((5, 6, 7), 2**31 - 1, 1786451765),
         ((1, 5, 6, 7, 8), 12345, 5022), ((0, 0), 97, 44)]


def test_hash_fixed_values_and_numpy_jax_agree_with_reference():
  for gram, m, want in FIXED:
    assert hashed.hash_reference(gram, m) == want
    assert hashed.hash_ngrams_np(np.array([gram]), m)[0] == want
    got = hashed.hash_ngrams_jnp([jnp.array([t], jnp.int32) for t in gram], m)
    assert int(got[0]) == want
  rng = np.random.default_rng(0)
  for n in (2, 3, 5):
    for m in (1, 7, 4096, 2**31 - 1):
      grams = rng.integers(0, 2**31 - 1, size=(300, n))
      grams[:100] = rng.integers(0, 50, size=(100, n))  # Small ids too.
      ref = [hashed.hash_reference(tuple(g), m) for g in grams]
      np.testing.assert_array_equal(hashed.hash_ngrams_np(grams, m), ref)
      dev = jax.jit(lambda cols, m=m: hashed.hash_ngrams_jnp(cols, m))(
          [jnp.asarray(grams[:, j], jnp.int32) for j in range(n)])
      np.testing.assert_array_equal(np.asarray(dev), ref)
  # Deterministic across calls, spread over buckets.
  g = rng.integers(0, 1000, size=(5000, 2))
  b = hashed.hash_ngrams_np(g, 64)
  np.testing.assert_array_equal(b, hashed.hash_ngrams_np(g, 64))
  assert np.bincount(b, minlength=64).min() > 30


def _brute_force_collisions(docs, max_n, m, bos):
  out = {}
  for n in range(2, max_n + 1):
    counts = {}
    for d in docs:
      seq = [bos] + list(d)
      for i in range(n - 1, len(seq)):
        g = tuple(seq[i - n + 1:i + 1])
        counts[g] = counts.get(g, 0) + 1
    bucket_of = {g: hashed.hash_reference(g, m) for g in counts}
    per_bucket = {}
    for g, b in bucket_of.items():
      per_bucket[b] = per_bucket.get(b, 0) + 1
    shared = sum(c for g, c in counts.items() if per_bucket[bucket_of[g]] >= 2)
    total = sum(counts.values())
    out[str(n)] = (len(counts), total, len(per_bucket), shared / total)
  return out


def test_collision_counts_known_answer_and_reference():
  bos = 1
  docs = [np.array([5, 6, 7, 5, 6, 7]), np.array([5, 6])]
  # [1 5 6 7 5 6 7], [1 5 6]: bigrams (1,5)x2 (5,6)x3 (6,7)x2 (7,5)x1 = 8 occurrences of
  # 4 distinct; trigrams (1,5,6)x2 (5,6,7)x2 (6,7,5) (7,5,6) = 6 of 4. One bucket: every
  # occurrence shares it.
  one = hashed.collision_stats(docs, 3, 1, bos)
  assert one['tokens_counted'] == 10 and one['documents_counted'] == 2
  assert {n: (o['distinct_ngrams'], o['occurrences'], o['buckets_used'],
              o['shared_occurrence_fraction']) for n, o in one['orders'].items()} == {
                  '2': (4, 8, 1, 1.0), '3': (4, 6, 1, 1.0)}
  # Many buckets: the hash keeps these apart (fixed by FIXED's function), no sharing.
  big = hashed.collision_stats(docs, 3, 2**31 - 1, bos)
  assert all(o['shared_occurrence_fraction'] == 0.0 and o['buckets_used'] == 4
             for o in big['orders'].values())
  rng = np.random.default_rng(1)
  rand_docs = [rng.integers(2, 12, size=rng.integers(0, 30)) for _ in range(40)]
  got = hashed.collision_stats(rand_docs, 4, 13, bos)
  want = _brute_force_collisions(rand_docs, 4, 13, bos)
  for n, (distinct, total, used, frac) in want.items():
    o = got['orders'][n]
    assert (o['distinct_ngrams'], o['occurrences'], o['buckets_used']) == (distinct, total,
                                                                           used)
    assert o['shared_occurrence_fraction'] == pytest.approx(frac)
  assert any(o['shared_occurrence_fraction'] > 0 for o in got['orders'].values())
  assert any(line.startswith('  n=4:') for line in hashed.format_collision_stats(got))


def test_config_rules():
  base = config.from_configdict(config.base_config())
  ok = {'fgram_model.kind': 'hashed', 'fgram_model.combine': 'add',
        'fgram_model.hash_buckets': 64}
  cfg = config.replace(base, **ok)
  assert cfg.has_fgram_side and not cfg.fgram_model.uses_fgram_table
  # combine is derived for hashed arms (Over-Encoding adds): the default is resolved, a
  # gate refused.
  derived = config.replace(base, **{**ok, 'fgram_model.combine': 'replace'})
  assert derived.fgram_model.combine == 'add' and derived.fgram_model.stored_rule == 'add'
  for bad, match in (({'fgram_model.combine': 'gate'}, "unset \\(or 'add'\\)"),
                     ({'fgram_model.num_layers': 1}, 'num_layers=0'),
                     ({'fgram_model.hash_buckets': 0}, 'hash_buckets=0 must be >= 1'),
                     ({'fgram_model.hash_max_n': 1}, 'hash_max_n=1 must be >= 2'),
                     ({'fgram_model.hash_buckets': 2**31}, '< 2\\*\\*31')):
    with pytest.raises(ConfigError, match=match):
      config.replace(base, **{**ok, **bad})


V, B, D, MAX_N, M = 48, 3, 32, 3, 16


def _small_cfg(kind):
  over = {'model.num_layers': 1, 'model.d_model': D, 'model.num_heads': 2,
          'model.max_seq_len': 32, 'model.init_std': 0.3, 'train.seq_len': 32}
  if kind == 'hashed':
    over.update({'fgram_model.kind': 'hashed', 'fgram_model.combine': 'add',
                 'fgram_model.hash_max_n': MAX_N, 'fgram_model.hash_buckets': M})
  return config.replace(config.from_configdict(config.base_config()), **over)


def _lm(kind, seed=0):
  cfg = _small_cfg(kind)
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=4, vocab_size=V,
                 rngs=nnx.Rngs(seed))


def test_embedding_is_token_plus_valid_orders_and_starts_at_baseline():
  lm, base = _lm('hashed'), _lm('baseline')
  # Two documents packed in one row: the second's n-grams must not reach into the first.
  inputs = np.array([[1, 5, 6, 7, 1, 8, 9, 10], [1, 5, 6, 7, 8, 9, 10, 11]], np.int32)
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2], [1] * 8], np.int32)
  positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))], np.int32)
  batch = {'inputs_BxT': inputs, 'segment_ids_BxT': segments, 'positions_BxT': positions}
  # Zero tables: exactly the baseline's function (same seed, same backbone init).
  np.testing.assert_array_equal(np.asarray(lm(batch)), np.asarray(base(batch)))
  table = np.random.default_rng(0).normal(size=((MAX_N - 1) * M, D)).astype(np.float32)
  lm.hashed.table[...] = jnp.asarray(table)
  got = np.asarray(lm.input_embeddings(batch))
  t_VxD = np.asarray(lm.backbone.token_embed.table[...])
  s = hashed.order_scale(MAX_N)
  for b in range(2):
    for i in range(8):
      want = t_VxD[inputs[b, i]].astype(np.float32).copy()
      for n in range(2, MAX_N + 1):
        if positions[b, i] >= n - 1:
          gram = tuple(inputs[b, i - n + 1:i + 1])
          want += s * table[(n - 2) * M + hashed.hash_reference(gram, M)]
      np.testing.assert_allclose(got[b, i], want, rtol=1e-5, atol=1e-6)
  # Position 4 of row 0 is a BOS starting document 2: no order, so T(BOS) only.
  np.testing.assert_array_equal(got[0, 4], t_VxD[1])


def _export(lm, path, dtype='float32'):
  meta = {**store_meta(0, hashed.hash_fingerprint(MAX_N, M), 'tok', 'w'),
          'hash_max_n': MAX_N, 'hash_buckets': M}
  export_hashed(lm, path, ExportConfig(dtype=dtype, chunk_rows=8), meta, progress=False)
  return EmbeddingStore.open(path, 'ram')


def test_decode_step_flops_are_baseline_plus_one_add_per_channel(tmp_path):
  """The hashed decode step costs the baseline's plus B * D adds (x = T(x_i) + slab)."""
  lm = _lm('hashed')
  store = _export(lm, str(tmp_path / 'export'))
  assert store.num_rows == (MAX_N - 1) * M
  dec = Decoder(lm, store, batch_size=B, loop='host')
  assert isinstance(dec.lookup, HashedLookup) and dec.lookup.rule == 'add'
  f_hashed = compat.cost_flops(dec.compiled_decode_step())
  f_base = compat.cost_flops(Decoder(lm, batch_size=B, loop='host').compiled_decode_step())
  assert f_base > 0
  assert f_hashed - f_base == B * D, (f_hashed, f_base)
  # The device loop's baseline body embeds with T alone (no select), so there the hashed
  # body adds the B * D adds plus the B * D select SCONE's loop also pays, and the flag test.
  loop_h = compat.cost_flops(Decoder(lm, store, batch_size=B,
                                     chunk_steps=4).compiled_loop_chunk(Sampling()))
  loop_b = compat.cost_flops(Decoder(lm, batch_size=B, chunk_steps=4).compiled_loop_chunk(
      Sampling()))
  assert 2 * B * D <= loop_h - loop_b <= 2 * B * D + 2 * B, (loop_h, loop_b)
  with pytest.raises(ValueError, match="lookup='callback'"):
    Decoder(lm, store, batch_size=B, lookup='native')


def _train_forward(lm, seq):
  inputs = np.asarray(seq, np.int32)[None]
  batch = {'inputs_BxT': inputs, 'segment_ids_BxT': np.ones_like(inputs),
           'positions_BxT': np.arange(inputs.shape[1], dtype=np.int32)[None]}
  graphdef, state = nnx.split(lm)
  return np.asarray(nnx.merge(graphdef, state)(batch))[0]


@pytest.mark.slow  # Fast-suite budget (CI's 2 cores): `make test-all` runs it.
def test_trained_run_exports_and_decodes_like_the_training_forward(tmp_path_factory):
  from scone_jax import generate
  from scone_jax.export import export_store
  from scone_jax import restore
  from scone_jax.train import loop

  corpus, artifacts = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, artifacts, **{
      'fgram_model.num_layers': 0, 'fgram_model.kind': 'hashed',
      'fgram_model.combine': 'add', 'fgram_model.hash_max_n': 3,
      'fgram_model.hash_buckets': 257, 'export.dtype': 'float32',
      'model.max_seq_len': 64, 'train.eval_batches': 1})
  workdir = str(tmp_path_factory.mktemp('hashed') / 'run')
  result = loop.train(cfg, workdir)
  assert result.step == cfg.train.steps
  report = json.loads(open(os.path.join(workdir, loop.HASH_COLLISIONS_FILE)).read())
  assert set(report['orders']) == {'2', '3'} and report['buckets'] == 257
  assert all(o['distinct_ngrams'] > o['buckets_used'] > 0 and
             0 < o['shared_occurrence_fraction'] <= 1 for o in report['orders'].values())
  assert json.loads(open(os.path.join(workdir, 'run.json')).read())['fgram_table'] is None

  export_store(cfg, workdir, progress=False)
  run, dec = generate.build_decoder(
      restore.run_config(workdir, {'serve.batch_size': 2, 'serve.decode_loop': 'host'}),
      workdir)
  assert dec.lookup.name == 'callback' and dec.store.num_rows == 2 * 257
  assert np.abs(np.asarray(run.lm.hashed.table[...])).max() > 0  # Training moved rows.
  tok = run.tokenizer
  seqs = [np.asarray(x, np.int32) for x in tok.encode(['the of and to in is that',
                                                       'for it as with was on be'])]
  got = dec.teacher_forced_logits([s[:2] for s in seqs], [s[2:7] for s in seqs])
  plain = Decoder(run.lm, batch_size=2, bos_id=tok.bos_id, loop='host')
  without = plain.teacher_forced_logits([s[:2] for s in seqs], [s[2:7] for s in seqs])
  for b, s in enumerate(seqs):
    want = _train_forward(run.lm, np.concatenate([[tok.bos_id], s[:7]]))[:7]
    assert got[b].shape == want.shape
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(without[b] - want).max() > 1e-4  # The store rows matter.

  # Greedy generation, device loop (callback lookup), equals the training forward's.
  gen_cfg = restore.run_config(workdir, {'serve.batch_size': 2,
                                         'serve.decode_loop': 'device'})
  _, dev_dec = generate.build_decoder(gen_cfg, workdir)
  gen = dev_dec.generate([s[:3] for s in seqs], max_new_tokens=4)
  for s, toks in zip(seqs, gen.tokens):
    seq = [tok.bos_id] + list(s[:3])
    for _ in range(4):
      seq.append(int(np.argmax(_train_forward(run.lm, seq)[-1])))
    assert list(toks) == seq[4:]
