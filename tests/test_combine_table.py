"""Combine modes (replace | add | gate) and kind='table': train, export, serve, FLOPs.

Each arm trains a few steps of the real train step on tagged batches, exports its store
(float32) and decodes through the serving path; logits must equal the training forward,
and the decode step must cost XLA what the baseline's does plus the stated elementwise
extra (model/combine.py). kind='table' rows must get gradient exactly for the f-grams of
the batch (numpy reference: table.match).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import compat, config
from scone_jax.batches.tagging import tag_fgrams
from scone_jax.config import ConfigError
from scone_jax.model import SconeLM, combine as combine_lib, flops
from scone_jax.model import trained_table
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder
from scone_jax.train import optimizer as optimizer_lib
from scone_jax.train import step as step_lib
from tests.test_decode import (B, BOS, CONTS, K, ONE_DEVICE, PHRASES, PROMPTS, V,  # noqa: F401
                               bos_rows, export_one_device, table)  # table: the fixture

T, D = 24, 32
# Every mode and kind runs fast; the two remaining pairs are slow (the same code paths).
ARMS = [('network', 'add'), ('table', 'replace'), ('table', 'gate'),
        pytest.param('network', 'gate', marks=pytest.mark.slow),
        pytest.param('table', 'add', marks=pytest.mark.slow)]


def _cfg(kind='network', combine='replace', layers=1):
  return config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 2, 'model.d_model': D, 'model.num_heads': 2,
      'model.max_seq_len': 48, 'model.init_std': 0.3, 'train.seq_len': T,
      'train.learning_rate': 3e-2, 'train.warmup_steps': 0, 'train.steps': 2,
      'fgram.max_len': K, 'fgram_model.kind': kind, 'fgram_model.combine': combine,
      'fgram_model.num_layers': layers if kind == 'network' else 0,
      'fgram_model.init': 'random'})


def _batch(table, seqs, t=T):
  """A tagged batch of BOS-prepended rows padded to t; every real position is weighted."""
  batch = bos_rows(seqs, t)
  inputs = batch['inputs_BxT']
  batch.update(targets_BxT=np.roll(inputs, -1, axis=1),
               weights_BxT=(batch['segment_ids_BxT'] > 0).astype(np.float32))
  batch = tag_fgrams(batch, table, capacity=inputs.size)
  return {k: v for k, v in batch.items() if not k.startswith('stats/')}


def _train_batches(table, steps=3):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(steps):
    seqs = [sum((PHRASES[i] for i in rng.integers(0, 5, 5)), [])[:T - 1] for _ in range(4)]
    out.append(_batch(table, seqs))
  return out


def _trained(cfg, table):
  """The arm after cfg.train.steps real train steps (one device)."""
  graphdef, state, tx = step_lib.create_train_state(cfg, ONE_DEVICE, V, K, table)
  step = jax.jit(step_lib.make_train_step(
      graphdef, tx, optimizer_lib.learning_rate_schedule(cfg.train)))
  first = nnx.merge(graphdef, state.params, state.other)
  for batch in _train_batches(table, cfg.train.steps):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics['loss']))
  return first, nnx.merge(graphdef, state.params, state.other)


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
  return jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))


def _forward(lm, batch):
  graphdef, state = nnx.split(lm)
  return np.asarray(_jitted_forward(graphdef)(state, batch))


def _decode_flops(dec):
  return compat.cost_flops(dec.compiled_decode_step())


@pytest.fixture(scope='module')
def baseline_flops():
  cfg = _cfg(layers=0)
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(1))
  return _decode_flops(Decoder(base, batch_size=B, bos_id=BOS))


@pytest.mark.parametrize('kind,combine', ARMS)
def test_arm_trains_exports_and_serves_the_training_forward(table, baseline_flops, kind,
                                                            combine, tmp_path):
  cfg = _cfg(kind, combine)
  first, lm = _trained(cfg, table)
  if kind == 'table':
    # Starts at the baseline's function: rows T(last token) (replace, gate) or 0 (add).
    rows = np.asarray(first.fgram_model.rows[...])
    want = (np.zeros_like(rows[:len(table)]) if combine == 'add' else
            np.asarray(first.backbone.token_embed.table[...])[trained_table.last_tokens(table)])
    np.testing.assert_array_equal(rows[:len(table)], want)
    assert not rows[len(table):].any()
  if combine == 'gate':  # The gate learned (rank 1: never weight-decayed).
    assert lm.combine_gate[...].shape == (D,)
    assert np.abs(np.asarray(lm.combine_gate[...]) - combine_lib.GATE_INIT).max() > 0
  path = export_one_device(lm, table, tmp_path, step=2, dtype='float32')
  store = EmbeddingStore.open(path, 'ram')
  assert store.manifest['combine'] == combine and store.manifest['fgram_kind'] == kind
  dec = Decoder(lm, store, table, batch_size=B, bos_id=BOS, loop='host')
  got = dec.teacher_forced_logits([np.array(p) for p in PROMPTS],
                                  [np.array(c) for c in CONTS])
  batch = _batch(table, [p + c for p, c in zip(PROMPTS, CONTS)])
  want = _forward(lm, batch)
  matched = batch['fgram_slot_BxT'] >= 0
  assert matched.sum() >= 15 and (~matched).sum() >= 15
  for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
    n = 1 + len(p) + len(c) - 1
    np.testing.assert_allclose(got[b], want[b, :n], rtol=1e-5, atol=1e-5)
  # XLA FLOPs: the baseline's step + exactly the stated elementwise extra per token.
  extra = combine_lib.extra_decode_flops_per_token(combine, D) * B
  assert _decode_flops(dec) == baseline_flops + extra


def test_stated_extra_flops_and_store_rule():
  assert [combine_lib.extra_decode_flops_per_token(m, 64) for m in combine_lib.COMBINES] == [
      0, 64, 64]
  assert [combine_lib.stored_rule(m) for m in combine_lib.COMBINES] == ['replace', 'add', 'add']
  # Gate folded into the store equals the training rule (numpy reference).
  rng = np.random.default_rng(0)
  x, e, g = rng.normal(size=(3, D)), rng.normal(size=(3, D)), rng.normal(size=D)
  want = x + 1 / (1 + np.exp(-g)) * (e - x)
  rows = combine_lib.store_rows(jnp.asarray(e, jnp.float32), jnp.asarray(x, jnp.float32),
                                'gate', jnp.asarray(g, jnp.float32))
  got = combine_lib.combine(jnp.asarray(x, jnp.float32), rows, jnp.ones(3, bool), 'add')
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(combine_lib.combine(
      jnp.asarray(x, jnp.float32), jnp.asarray(e, jnp.float32), jnp.ones(3, bool), 'gate',
      jnp.asarray(g, jnp.float32))), want, rtol=1e-5, atol=1e-6)


def test_table_rows_get_gradient_only_for_fgrams_in_the_batch(table):
  cfg = _cfg('table', 'replace')
  graphdef, state, _ = step_lib.create_train_state(cfg, ONE_DEVICE, V, K, table)
  batch = _train_batches(table, 1)[0]

  def loss(params):
    logits = nnx.merge(graphdef, params, state.other)(batch)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch['targets_BxT'][..., None], axis=-1)[..., 0]
    return (nll * batch['weights_BxT']).sum()

  grads = jax.grad(loss)(state.params)
  g_rows = np.asarray(grads['fgram_model']['rows'][...])
  nonzero = set(np.flatnonzero(np.abs(g_rows).sum(axis=1) > 0).tolist())
  ids, _ = table.match(batch['inputs_BxT'], batch['segment_ids_BxT'])
  present = set(np.unique(ids[(ids >= 0) & (batch['segment_ids_BxT'] > 0)]).tolist())
  assert len(present) >= 5 and nonzero == present
  assert len(present) < len(table)  # Some rows are absent: the update is sparse.


def test_table_is_sharded_over_the_model_axes(table):
  cfg = _cfg('table', 'replace')
  mesh = compat.make_mesh((2, 2, 2))
  graphdef, state, _ = step_lib.create_train_state(cfg, mesh, V, K, table)
  rows = state.params['fgram_model']['rows'][...]
  assert rows.shape == (trained_table.padded_rows(len(table)), D)
  assert rows.sharding.spec[0] == ('fsdp', 'tensor')
  assert rows.addressable_shards[0].data.shape[0] == rows.shape[0] // 4
  # The same init on one device and on the mesh.
  _, one, _ = step_lib.create_train_state(cfg, ONE_DEVICE, V, K, table)
  np.testing.assert_array_equal(np.asarray(rows),
                                np.asarray(one.params['fgram_model']['rows'][...]))
  # model/flops.py counts the built table (padded rows) and no A_f.
  counts = flops.param_counts(config.replace(cfg, **{'fgram.use_size': len(table)}), V)
  lm = nnx.merge(graphdef, state.params, state.other)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
  assert counts.trained_rows == rows.size == counts.fgram_total
  assert counts.backbone_total + counts.fgram_total == num_params
  assert counts.offloaded == len(table) * D and counts.fgram_position_table == 0


def test_config_rules():
  with pytest.raises(ConfigError, match='has no A_f'):
    config.replace(_cfg('table'), **{'fgram_model.num_layers': 1})
  with pytest.raises(ConfigError, match='has none'):
    _cfg('network', 'add', layers=0)
  with pytest.raises(ConfigError, match="kind='table' has no A_f"):
    config.replace(_cfg('table'), **{'fgram_model.output_scale': 'channel'})
  assert _cfg('table').has_fgram_side and not _cfg(layers=0).has_fgram_side


def test_store_of_another_combine_is_refused(table, tmp_path):
  def make(combine):
    cfg = _cfg('table', combine)
    return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                   rngs=nnx.Rngs(0), num_fgrams=len(table))
  lm = make('gate')
  path = export_one_device(lm, table, tmp_path, dtype='float32')
  with pytest.raises(ValueError, match="exported for fgram_model.combine='gate'"):
    Decoder(make('add'), EmbeddingStore.open(path, 'ram'), table, batch_size=B)


@pytest.mark.slow
def test_table_gate_run_end_to_end(tmp_path_factory):
  """train() -> W/run.json -> RunDir restore -> export_store -> generate, kind='table'."""
  import train_helpers as th  # pylint: disable=g-import-not-at-top
  from scone_jax import generate, run as run_lib
  from scone_jax.export.export import export_store
  from scone_jax import restore
  from scone_jax.train import loop
  corpus, artifacts = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, artifacts, **{
      'fgram_model.kind': 'table', 'fgram_model.num_layers': 0,
      'fgram_model.combine': 'gate', 'fgram.use_size': 300, 'train.steps': 2})
  workdir = str(tmp_path_factory.mktemp('table_run'))
  loop.train(cfg, workdir)
  info = run_lib.RunDir(workdir).info()
  serve_cfg = restore.run_config(workdir, {'export.dtype': 'float32',
                                           'serve.decode_loop': 'host',
                                           'serve.max_new_tokens': 4})
  run = restore.load_run(serve_cfg, workdir)
  assert info['fgram_table_rows'] >= len(run.table) == 300
  rows = np.asarray(run.lm.fgram_model.rows[...])
  assert rows.shape == (trained_table.padded_rows(300), cfg.model.d_model)
  path = export_store(serve_cfg, workdir, progress=False)
  store = EmbeddingStore.open(path, 'ram')
  # numpy reference of the gate folded into the store: sigmoid(g) * (row - T(last)).
  g = np.asarray(run.lm.combine_gate[...])
  t_last = np.asarray(run.lm.backbone.token_embed.table[...])[
      trained_table.last_tokens(run.table)]
  want = (rows[:300] - t_last) / (1 + np.exp(-g))
  np.testing.assert_allclose(store.gather(np.arange(300)), want, rtol=1e-5, atol=1e-6)
  assert len(generate.generate(serve_cfg, workdir, ['the of and']).texts) == 1
