"""Downstream scoring: train path == a plain forward, packing/batching/padding invariance,
store path == train path on a float32 export, and the store scorer's FLOPs = the baseline's."""

import jax
import numpy as np
import pytest
from flax import nnx

from scone_jax import compat, config
from scone_jax.batches.tagging import tag_fgrams
from scone_jax.config import ExportConfig
from scone_jax.downstream import scoring
from scone_jax.export import export_embeddings
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore
from phrase_fixtures import BOS, K, V, table  # noqa: F401  (the table fixture)

WINDOW = 64
ONE_DEVICE = compat.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _cfg(fgram_layers):
  return config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2,
      'model.max_seq_len': WINDOW, 'model.init_std': 0.3, 'train.seq_len': 32,
      'fgram_model.num_layers': fgram_layers, 'fgram.max_len': K,
      'fgram_model.init': 'random'})  # A_f's output differs from T(last token).


@pytest.fixture(scope='module')
def lm():
  cfg = _cfg(1)
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def scorer(lm, table):
  """Scorers shared by the tests (each compiles its shapes once): by (rows, store)."""
  made = {}

  def get(rows, store=None):
    key = (rows, id(store))
    if key not in made:
      made[key] = scoring.Scorer(lm, ONE_DEVICE, window=WINDOW, rows_per_batch=rows,
                                 table=table, store=store, stored_rule='replace')
    return made[key]
  return get


def _seq(context, continuation):
  return scoring.Seq(np.array([BOS] + list(context) + list(continuation), np.int32),
                     len(continuation))


# Contexts ending inside a phrase whose rest opens the continuation (f-grams spanning the
# boundary), long contexts whose early phrases repeat later (as in few-shot prompts), a
# context of BOS alone, unmatched tokens, and a sequence filling the whole window.
SEQS = [_seq([5, 6], [7, 8, 44]), _seq([41, 9, 10], [11, 12, 13]), _seq([], [20, 21, 22]),
        _seq([45, 46, 47], [40, 41]),
        _seq([20, 21, 22, 23, 44, 5, 6, 7, 8, 9] * 3, [10, 11, 30, 31]),
        _seq(list(range(4, 40)) + [12], [13, 5, 6, 7, 8]),
        _seq([5, 6, 7, 8, 40] * 12, [9, 10, 11, 12])]
assert len(SEQS[-1].tokens) - 1 == WINDOW


def reference(lm, table, seqs, fgrams=True):
  """(ll, greedy) of each sequence ALONE in a row (one row each, padded to the window):
  the model's forward (tag_fgrams + lm(batch); fgrams=False: the backbone on token
  embeddings) and a float64 numpy log-softmax."""
  inputs = np.zeros((len(seqs), WINDOW), np.int32)
  segments = np.zeros_like(inputs)
  for b, s in enumerate(seqs):
    inputs[b, :len(s.tokens) - 1] = s.tokens[:-1]
    segments[b, :len(s.tokens) - 1] = 1
  batch = {'inputs_BxT': inputs, 'segment_ids_BxT': segments,
           'positions_BxT': np.broadcast_to(np.arange(WINDOW, dtype=np.int32),
                                            inputs.shape).copy()}
  graphdef, state = nnx.split(lm)
  if fgrams:
    batch = {k: v for k, v in tag_fgrams(batch, table).items() if not k.startswith('stats/')}
    forward = lambda st, bt: nnx.merge(graphdef, st)(bt)
  else:
    def forward(st, bt):
      model = nnx.merge(graphdef, st)
      return model.backbone(model.backbone.embed(bt['inputs_BxT']), bt['positions_BxT'],
                            bt['segment_ids_BxT'])
  logits_BxTxV = np.asarray(jax.jit(forward)(state, batch), np.float64)
  ll, greedy = [], []
  for b, s in enumerate(seqs):
    logits = logits_BxTxV[b]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    cont = slice(len(s.tokens) - 1 - s.num_continuation, len(s.tokens) - 1)
    targets = s.tokens[1:][cont]
    ll.append(logp[cont][np.arange(len(targets)), targets].sum())
    greedy.append(bool((logits[cont].argmax(-1) == targets).all()))
  return np.array(ll), np.array(greedy)


def _close(got, want, rel=1e-5):
  # Float32 sums of log-probs: relative to their size, with a floor for tiny ones.
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def test_row_length_ladder():
  assert scoring.row_lengths(64) == [32, 64]
  assert scoring.row_lengths(100) == [32, 64, 100]
  assert scoring.row_lengths(20) == [20]


def test_plan_packs_every_sequence_into_one_row_length():
  seqs = [_seq([5] * n, [6]) for n in (3, 40, 10, 50, 20, 2, 30)]
  pl = scoring.plan(seqs, 128, rows_per_batch=2)
  assert set(pl.lengths) == {64}  # The smallest ladder length holding the longest (52).
  placed = sorted(n for rows in pl.rows for row in rows for n in row)
  assert placed == list(range(len(seqs)))
  assert sum(len(rows) for rows in pl.rows) == 3  # 163 inputs: 3 rows of 64, no more.
  for rows in pl.rows:
    assert len(rows) <= 2
    for row in rows:
      assert sum(len(seqs[n].tokens) - 1 for n in row) <= 64
  assert scoring.plan(seqs[:1], 128, 2).lengths == [32]
  with pytest.raises(ValueError, match='exceeds the window'):
    scoring.plan([_seq([5] * 140, [6])], 128, 2)


def test_train_path_equals_unpacked_plain_forward(lm, table, scorer):
  want_ll, want_greedy = reference(lm, table, SEQS)
  ll, greedy = scorer(4)(SEQS)
  _close(ll, want_ll)
  np.testing.assert_array_equal(greedy, want_greedy)
  # The comparison can fail: without f-grams the same backbone scores differently.
  no_fgrams, _ = reference(lm, table, SEQS, fgrams=False)
  assert np.abs(no_fgrams - want_ll).max() > 1e-2


def test_greedy_flag_sees_a_continuation_the_model_predicts(lm, table, scorer):
  """A continuation of the model's own argmax tokens is greedy; one token changed is not."""
  ctx, cont = [5, 6, 7], []
  graphdef, state = nnx.split(lm)
  forward = jax.jit(lambda st, bt: nnx.merge(graphdef, st)(bt))
  for _ in range(3):
    inputs = np.zeros((1, WINDOW), np.int32)
    n = len(ctx) + len(cont) + 1
    inputs[0, :n] = [BOS] + ctx + cont
    batch = {'inputs_BxT': inputs, 'segment_ids_BxT': (inputs > 0).astype(np.int32),
             'positions_BxT': np.arange(WINDOW, dtype=np.int32)[None]}
    batch = {k: v for k, v in tag_fgrams(batch, table).items() if not k.startswith('stats/')}
    cont.append(int(np.asarray(forward(state, batch))[0, n - 1].argmax()))
  wrong = cont[:2] + [(cont[2] + 1) % V]
  _, greedy = scorer(4)([_seq(ctx, cont), _seq(ctx, wrong)])
  assert greedy.tolist() == [True, False]


def test_invariant_to_packing_batch_size_and_padding(scorer):
  """One sequence a batch, several batches of 4 rows with padding rows, and other
  sequences packed next to them in another order: the same log-likelihoods."""
  base, _ = scorer(1)(SEQS)
  _close(scorer(4)(SEQS)[0], base)
  extra = [_seq([30, 31, 5], [6, 7]), _seq([44] * 9, [9, 10, 11])] * 3
  ll, _ = scorer(4)(extra + SEQS[::-1])
  _close(ll[len(extra):][::-1], base)


@pytest.fixture(scope='module')
def store(lm, table, tmp_path_factory):
  path = export_embeddings(lm, table, str(tmp_path_factory.mktemp('f32') / 'export'),
                           ExportConfig(batch_size=64, chunk_rows=64, dtype='float32'),
                           {'checkpoint_step': 0}, mesh=ONE_DEVICE, progress=False)
  return EmbeddingStore.open(path, 'ram')


def test_store_path_equals_train_path_on_a_float32_export(table, store, scorer):
  train, train_greedy = scorer(4)(SEQS)
  assert scorer(4, store).path == 'store'
  hits_before = store.stats.hits
  got, greedy = scorer(4, store)(SEQS)
  # Matched inputs across the boundary: the first sequence's 5 6 | 7 8 is one f-gram.
  ids, lens = table.match(SEQS[0].tokens[None, :-1])
  assert lens[0, 3] >= 3 and ids[0, 3] >= 0
  assert store.stats.hits - hits_before > 20  # Rows came from the store.
  _close(got, train)
  np.testing.assert_array_equal(greedy, train_greedy)


def test_store_scorer_flops_equal_the_baselines(store, scorer):
  cfg = _cfg(0)
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(1))
  f_base = scoring.flops_per_token(
      scoring.Scorer(base, ONE_DEVICE, window=WINDOW, rows_per_batch=4), 32)
  f_store = scoring.flops_per_token(scorer(4, store), 32)
  f_train = scoring.flops_per_token(scorer(4), 32)
  assert f_base > 0
  assert abs(f_store - f_base) <= 0.01 * f_base, (f_store, f_base)
  assert f_train > 1.05 * f_base  # A_f runs on the train path: the check can fail.


def test_a_baseline_has_no_store_path_and_scone_needs_its_table(lm, table, store):
  cfg = _cfg(0)
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='needs a SCONE model'):
    scoring.Scorer(base, ONE_DEVICE, window=WINDOW, store=store, table=table)
  with pytest.raises(ValueError, match='f-gram table'):
    scoring.Scorer(lm, ONE_DEVICE, window=WINDOW)


class _Recorded:
  """A jitted function that keeps what each call returns."""

  def __init__(self, fn):
    self.fn, self.outputs = fn, []

  def __call__(self, *args):
    self.outputs.append(self.fn(*args))
    return self.outputs[-1]

  def lower(self, *args):
    return self.fn.lower(*args)


def test_process_0_drives_the_others_with_fixed_shape_broadcasts(lm, table, scorer):
  """The multi-process protocol in one process: what a driving scorer broadcasts, replayed
  to a second scorer's serve(), makes it compile and score the same batches (each
  broadcast's shapes known beforehand from the header), and it stops at the end or
  raises if the driver failed. The 2-process run is tests/test_downstream_multihost.py."""
  sent = []

  def record(tree):
    sent.append(tree)
    return tree
  driver = scoring.Scorer(lm, ONE_DEVICE, window=WINDOW, rows_per_batch=4, table=table,
                          broadcast=record)
  with driver.driving():
    ll, greedy = driver(SEQS)
    scoring.flops_per_token(driver, 32)
  want_ll, want_greedy = scorer(4)(SEQS)
  np.testing.assert_array_equal(ll, want_ll)  # Broadcasting changes nothing on process 0.
  np.testing.assert_array_equal(greedy, want_greedy)
  header = [tuple(int(v) for v in m) for m in sent if isinstance(m, np.ndarray)]
  num_batches = len(scoring.plan(SEQS, WINDOW, 4).rows)
  assert header == [(scoring.Message.SCORE, WINDOW, num_batches),
                    (scoring.Message.COMPILE, 32, 0), (scoring.Message.DONE, 0, 0)]
  batches = [m for m in sent if isinstance(m, dict)]
  assert sum(b['weights_BxT'].sum() for b in batches) == sum(s.num_continuation
                                                             for s in SEQS)

  def replay(messages):
    it = iter(messages)

    def receive(template):
      got = next(it)
      assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, template)
      return got
    return receive, it
  receive, it = replay(sent)
  worker = scoring.Scorer(lm, ONE_DEVICE, window=WINDOW, rows_per_batch=4, table=table,
                          broadcast=receive)
  worker._score = _Recorded(worker._score)  # pylint: disable=protected-access
  worker.serve()
  assert next(it, None) is None and len(worker._score.outputs) == num_batches  # pylint: disable=protected-access
  sums = [np.asarray(sums_BxT) for sums_BxT, _ in worker._score.outputs]  # pylint: disable=protected-access
  np.testing.assert_allclose(np.sum(sums), ll.sum(), rtol=1e-6)

  sent.clear()
  with pytest.raises(KeyError):
    with driver.driving():
      raise KeyError('a bad task on process 0')
  assert [tuple(m) for m in sent] == [(scoring.Message.FAILED, 0, 0)]
  worker._broadcast = replay(sent)[0]  # pylint: disable=protected-access
  with pytest.raises(scoring.DriverFailed, match='process 0 stopped on an error'):
    worker.serve()
