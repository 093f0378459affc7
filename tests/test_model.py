"""Model tests: masking, packing, KV-cache decode, the SCONE dedup path, a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import config as config_lib
from scone_jax.model import SconeLM

V, K = 61, 4


def tiny_cfg(family='gpt2', af_layers=1, **model):
  c = config_lib.base_config()
  c.model.family = family
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.max_seq_len = 32
  c.train.seq_len = 16
  c.fgram.max_len = K
  c.fgram_model.num_layers = af_layers
  # Random A_f blocks: with the default identity init A_f(gram) = T(last token) at step 0,
  # which would make the equivalence tests below blind to the earlier tokens of a gram.
  c.fgram_model.init = 'random'
  for key, value in model.items():
    c.model[key] = value
  return config_lib.from_configdict(c)


def make_lm(cfg, seed=0):
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V,
                 rngs=nnx.Rngs(seed))


def row_batch(tokens_BxT, segment_ids_BxT=None):
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  b, t = tokens_BxT.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids_BxT is None else jnp.asarray(
      segment_ids_BxT, jnp.int32)
  # Positions restart at each segment start, as the batch pipeline writes them.
  pos = np.zeros((b, t), np.int32)
  seg_np = np.asarray(seg)
  for i in range(b):
    for j in range(1, t):
      pos[i, j] = pos[i, j - 1] + 1 if seg_np[i, j] == seg_np[i, j - 1] else 0
  return dict(inputs_BxT=tokens_BxT, positions_BxT=jnp.asarray(pos), segment_ids_BxT=seg)


FAMILIES = [
    dict(family='gpt2'),
    dict(family='olmo'),
    dict(family='olmo', tied_embeddings=False, norm='rmsnorm', mlp_activation='relu'),
    dict(family='gpt2', tied_embeddings=False, position='rope', mlp_activation='swiglu'),
]
# The two family defaults run by default; the mixed variants are slow-marked.
FAMILIES_DECODE = FAMILIES[:2] + [pytest.param(m, marks=pytest.mark.slow) for m in FAMILIES[2:]]


@pytest.mark.parametrize('model', FAMILIES)
def test_shapes_and_param_layout(model):
  cfg = tiny_cfg(af_layers=0, **model)
  lm = make_lm(cfg)
  assert lm.fgram_model is None
  tokens = np.random.default_rng(0).integers(1, V, (2, 7))
  logits = lm(row_batch(tokens))
  assert logits.shape == (2, 7, V) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert (lm.backbone.head is None) == cfg.model.tied_embeddings
  assert (lm.backbone.pos_table is None) == (cfg.model.position == 'rope')
  assert lm.backbone.blocks.wq.shape == (2, 32, 4, 8)


@pytest.mark.parametrize('model', FAMILIES[:2])
def test_causal_and_segment_masking(model):
  lm = make_lm(tiny_cfg(af_layers=0, **model))
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, V, (1, 10))
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
  base = np.asarray(lm(row_batch(tokens, seg)))
  # A future token in the same segment: earlier positions unchanged.
  t2 = tokens.copy()
  t2[0, 3] = (t2[0, 3] % (V - 1)) + 1
  out = np.asarray(lm(row_batch(t2, seg)))
  np.testing.assert_array_equal(out[0, :3], base[0, :3])
  assert not np.allclose(out[0, 3], base[0, 3])
  # A token in the first segment: the second segment (and padding) unchanged.
  t3 = tokens.copy()
  t3[0, 1] = (t3[0, 1] % (V - 1)) + 1
  out = np.asarray(lm(row_batch(t3, seg)))
  np.testing.assert_array_equal(out[0, 4:8], base[0, 4:8])
  # A padding token changes nothing real.
  t4 = tokens.copy()
  t4[0, 8] = (t4[0, 8] % (V - 1)) + 1
  out = np.asarray(lm(row_batch(t4, seg)))
  np.testing.assert_array_equal(out[0, :8], base[0, :8])


@pytest.mark.parametrize('model', FAMILIES[:2])
def test_packed_row_equals_separate_documents(model):
  lm = make_lm(tiny_cfg(af_layers=0, **model))
  rng = np.random.default_rng(2)
  doc_a, doc_b = rng.integers(1, V, 5), rng.integers(1, V, 4)
  packed = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None]
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3])
  out = np.asarray(lm(row_batch(packed, seg)))
  alone_a = np.asarray(lm(row_batch(doc_a[None])))
  alone_b = np.asarray(lm(row_batch(doc_b[None])))
  np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], alone_b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('model', FAMILIES_DECODE)
def test_prefill_then_decode_equals_full_forward(model):
  """Ragged right-padded prompts, then token-by-token decode, inside jax.jit over state."""
  lm = make_lm(tiny_cfg(af_layers=0, **model))
  rng = np.random.default_rng(3)
  b, total, new = 3, 12, 5
  tokens = rng.integers(1, V, (b, total))
  lengths = np.array([2, 7, 4])
  full = np.asarray(lm(row_batch(tokens)))

  graphdef, state = nnx.split(lm.backbone)

  @jax.jit
  def prefill(state, prompt_BxT, lengths_B):
    bb = nnx.merge(graphdef, state)
    cache = bb.init_cache(b, 16, jnp.float32)
    return bb.prefill(bb.embed(prompt_BxT), lengths_B, cache)

  @jax.jit
  def decode(state, tok_Bx1, cache):
    bb = nnx.merge(graphdef, state)
    return bb.decode(bb.embed(tok_Bx1), cache)

  width = lengths.max()
  prompt = np.where(np.arange(width)[None] < lengths[:, None], tokens[:, :width], 0)
  logits, cache = prefill(state, jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths))
  for i in range(b):
    np.testing.assert_allclose(logits[i, :lengths[i]], full[i, :lengths[i]], atol=1e-5,
                               rtol=1e-5)
  for step in range(new):
    pos = lengths + step
    tok = tokens[np.arange(b), pos][:, None]
    logits, cache = decode(state, jnp.asarray(tok, jnp.int32), cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos + 1)
    np.testing.assert_allclose(logits[:, 0], full[np.arange(b), pos], atol=1e-5, rtol=1e-5)


def _pack(grams, rows):
  """The packed A_f rows of `grams` (batches.tagging's layout) and each gram's last-token
  flat index."""
  from scone_jax.batches.tagging import pack_lengths
  w = 2 * K
  row, col, needed = pack_lengths(np.array([len(g) for g in grams]), w)
  assert needed <= rows
  tok, pos, seg = (np.zeros((rows, w), np.int32) for _ in range(3))
  for g, r, c in zip(grams, row, col):
    tok[r, c:c + len(g)] = g
    pos[r, c:c + len(g)] = np.arange(len(g))
    seg[r, c:c + len(g)] = c + 1
  return tok, pos, seg, row * w + col + np.array([len(g) for g in grams]) - 1


def _scone_batch(rng, b=2, t=10, spans=None, rows=3):
  """A batch with f-grams tagged by a plain-Python rule: fixed spans, dedup'd by content,
  packed into `rows` A_f rows (more than needed: unused rows are padding)."""
  tokens = rng.integers(1, V, (b, t))
  tokens[1, 2:4] = tokens[0, 5:7]  # the same 2-gram twice: one distinct f-gram
  spans = spans or [(0, 3, 5), (0, 5, 7), (1, 2, 4), (1, 5, 9)]  # (row, start, end)
  batch = row_batch(tokens)
  grams: list[tuple[int, ...]] = []
  for row, s, e in spans:
    gram = tuple(int(x) for x in tokens[row, s:e])
    if gram not in grams:
      grams.append(gram)
  tok, pos, seg, last = _pack(grams, rows)
  slot = -np.ones((b, t), np.int32)
  for row, s, e in spans:
    slot[row, e - 1] = last[grams.index(tuple(int(x) for x in tokens[row, s:e]))]
  batch.update(fgram_slot_BxT=jnp.asarray(slot), fgram_tokens_RxW=jnp.asarray(tok),
               fgram_positions_RxW=jnp.asarray(pos), fgram_segment_ids_RxW=jnp.asarray(seg))
  return tokens, spans, batch, len(grams)


def _per_position_logits(lm, tokens, spans, batch):
  """The paper's path: A_f on every matched position, its f-gram read off the inputs."""
  per_pos = np.zeros((len(spans), K), np.int32)
  for i, (row, s, e) in enumerate(spans):
    per_pos[i, :e - s] = tokens[row, s:e]
  lens = np.array([e - s for _, s, e in spans], np.int32)
  e_NxD = lm.fgram_model(jnp.asarray(per_pos), jnp.asarray(lens))
  x = lm.backbone.embed(batch['inputs_BxT'])
  for i, (row, _, e) in enumerate(spans):
    x = x.at[row, e - 1].set(e_NxD[i])
  return lm.backbone(x, batch['positions_BxT'], batch['segment_ids_BxT'])


@pytest.mark.parametrize('family', ['gpt2', 'olmo'])
def test_dedup_path_equals_per_position_fgram_model(family):
  lm = make_lm(tiny_cfg(family))
  tokens, spans, batch, distinct = _scone_batch(np.random.default_rng(4))
  assert distinct == 3
  logits = np.asarray(lm(batch))
  ref = np.asarray(_per_position_logits(lm, tokens, spans, batch))
  np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
  # Replace, not add: the matched positions differ from the baseline rule.
  base = np.asarray(lm.backbone(lm.backbone.embed(batch['inputs_BxT']),
                                batch['positions_BxT'], batch['segment_ids_BxT']))
  assert not np.allclose(logits[0, 4], base[0, 4])
  np.testing.assert_allclose(logits[0, :2], base[0, :2], atol=1e-6)


def test_packed_bucketed_path_equals_per_position_loss_and_gradients():
  """Many f-grams of every length 2..K, several per packed row, in a bucket with spare
  rows: the loss and every parameter's gradient equal A_f run on each matched position."""
  rng = np.random.default_rng(7)
  b, t = 3, 16
  spans = [(r, s, s + n) for r in range(b) for s, n in ((0, 2), (3, 4), (8, 3), (12, 4))]
  spans += [(r, 5, 7) for r in range(b)]
  tokens, spans, batch, distinct = _scone_batch(rng, b, t, spans, rows=8)
  assert distinct > 8 and (np.asarray(batch['fgram_segment_ids_RxW'])[-1] == 0).all()
  lm = make_lm(tiny_cfg('olmo'))
  graphdef, params, rest = nnx.split(lm, nnx.Param, ...)
  w_BxT = jnp.asarray(rng.random((b, t)), jnp.float32)

  def loss(params, per_position):
    model = nnx.merge(graphdef, params, rest)
    logits = (_per_position_logits(model, tokens, spans, batch) if per_position
              else model(batch))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * w_BxT)

  grad_fn = jax.value_and_grad(loss)
  # One jit for both paths: one compile on a loaded 2-core machine instead of two.
  (got, got_g), (want, want_g) = jax.jit(lambda p: (grad_fn(p, False), grad_fn(p, True)))(
      params)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got_g),
                               jax.tree_util.tree_leaves_with_path(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert np.abs(np.asarray(got_g['fgram_model']['pos_table'][...])).sum() > 0


def test_fgram_model_reads_only_up_to_its_length():
  lm = make_lm(tiny_cfg('olmo'))
  toks = jnp.array([[5, 6, 0, 0], [5, 6, 9, 9]], jnp.int32)
  e = np.asarray(lm.fgram_model(toks, jnp.array([2, 2])))
  np.testing.assert_allclose(e[0], e[1], atol=1e-6)
  e3 = np.asarray(lm.fgram_model(toks, jnp.array([2, 3])))
  assert not np.allclose(e3[0], e3[1])


def test_gradients_reach_token_table_through_both_paths():
  lm = make_lm(tiny_cfg('gpt2', tied_embeddings=False))
  tokens, spans, batch, _ = _scone_batch(np.random.default_rng(5))
  matched = {(r, e - 1) for r, _, e in spans}
  only_direct = {int(tokens[r, c]) for r in range(2) for c in range(10) if (r, c) not in matched}
  in_fgrams = {int(x) for x in np.asarray(batch['fgram_tokens_RxW']).ravel() if x}
  fgram_only = sorted(in_fgrams - only_direct)
  unused = sorted(set(range(1, V)) - only_direct - in_fgrams)
  assert fgram_only and unused

  graphdef, params, rest = nnx.split(lm, nnx.Param, ...)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(batch)[..., :7] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  g_VxD = np.abs(np.asarray(grads['backbone']['token_embed']['table'][...])).sum(-1)
  assert (g_VxD[fgram_only] > 0).all()  # only reachable through A_f
  assert (g_VxD[sorted(only_direct)] > 0).all()
  np.testing.assert_array_equal(g_VxD[unused], 0)
  assert np.abs(np.asarray(grads['fgram_model']['blocks']['wq'][...])).sum() > 0


def test_baseline_ignores_fgram_keys_and_missing_keys_are_named():
  lm = make_lm(tiny_cfg('gpt2', af_layers=0))
  _, _, batch, _ = _scone_batch(np.random.default_rng(6))
  plain = {k: batch[k] for k in ('inputs_BxT', 'positions_BxT', 'segment_ids_BxT')}
  np.testing.assert_array_equal(np.asarray(lm(batch)), np.asarray(lm(plain)))
  with pytest.raises(KeyError, match='fgram_slot_BxT'):
    make_lm(tiny_cfg('gpt2'))(plain)


def _np_forward(lm, tokens_T):
  """Plain numpy GPT-2 forward for one document (reference for the whole jax stack)."""
  bb = lm.backbone
  p = {n: np.asarray(getattr(bb.blocks, n)[...], np.float64) for n in bb.blocks.param_names}
  table = np.asarray(bb.token_embed.table[...], np.float64)
  t = len(tokens_T)
  x = table[tokens_T] + np.asarray(bb.pos_table[...], np.float64)[:t]

  def ln(v, s, b):
    mu = v.mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * s + b

  for l in range(bb.cfg.num_layers):
    h = ln(x, p['attn_norm_scale'][l], p['attn_norm_bias'][l])
    q, k, v = (np.einsum('td,dhe->the', h, p[f'w{w}'][l]) + p[f'b{w}'][l] for w in 'qkv')
    att = np.einsum('the,she->hts', q, k) / np.sqrt(q.shape[-1])
    att = np.where(np.tril(np.ones((t, t), bool))[None], att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum('hts,she->the', att, v)
    x = x + np.einsum('the,hed->td', o, p['wo'][l]) + p['bo'][l]
    h = ln(x, p['mlp_norm_scale'][l], p['mlp_norm_bias'][l])
    u = h @ p['w_in'][l] + p['b_in'][l]
    u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
    x = x + u @ p['w_out'][l] + p['b_out'][l]
  fn = bb.final_norm
  x = ln(x, np.asarray(fn.scale[...]), np.asarray(fn.bias[...]))
  return x @ table.T


def test_gpt2_forward_matches_numpy_reference():
  lm = make_lm(tiny_cfg('gpt2', af_layers=0), seed=7)
  tokens = np.random.default_rng(7).integers(1, V, 9)
  out = np.asarray(lm(row_batch(tokens[None])))[0]
  np.testing.assert_allclose(out, _np_forward(lm, tokens), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('remat', [pytest.param('block', marks=pytest.mark.slow), 'dots'])
def test_remat_gives_same_loss_and_gradients(remat):
  batch = row_batch(np.random.default_rng(8).integers(1, V, (2, 8)))

  def loss_and_grads(cfg):
    graphdef, params = nnx.split(make_lm(cfg))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(batch) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

  (plain_loss, plain), plain_jaxpr = loss_and_grads(tiny_cfg('olmo', af_layers=0))
  (loss, grads), jaxpr = loss_and_grads(tiny_cfg('olmo', af_layers=0, remat=remat))
  assert 'remat' in jaxpr and 'remat' not in plain_jaxpr
  np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_auto_attention_is_exactly_einsum_on_cpu():
  # 'auto' is the default; on CPU it must run the einsum computation bit for bit: the
  # training forward (packed segments, A_f on packed f-gram rows), A_f per f-gram (export)
  # and prefill.
  assert jax.default_backend() == 'cpu'
  tokens, _, batch, _ = _scone_batch(np.random.default_rng(12))
  batch.update(row_batch(tokens, [[1] * 4 + [2] * 6, [1] * 7 + [0] * 3]))
  out = {}
  for attention in ('auto', 'einsum'):
    lm = make_lm(tiny_cfg('olmo', af_layers=1, attention=attention))
    grams = jnp.asarray(tokens[:, :K], jnp.int32)
    prefill, _ = lm.backbone.prefill(lm.backbone.embed(jnp.asarray(tokens[:, :6])),
                                     jnp.array([6, 4], jnp.int32),
                                     lm.backbone.init_cache(2, 16))
    out[attention] = [np.asarray(lm(batch)),
                      np.asarray(lm.fgram_model(grams, jnp.array([K, 3], jnp.int32))),
                      np.asarray(prefill)]
  for auto, einsum in zip(out['auto'], out['einsum']):
    np.testing.assert_array_equal(auto, einsum)


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32():
  tokens = np.random.default_rng(9).integers(1, V, (2, 9))
  ref = np.asarray(make_lm(tiny_cfg('gpt2', af_layers=0))(row_batch(tokens)))
  out = make_lm(tiny_cfg('gpt2', af_layers=0, dtype='bfloat16'))(row_batch(tokens))
  assert out.dtype == jnp.float32  # logits stay float32 for the loss
  # bf16 keeps ~3 significant digits; params are the same fp32 values.
  np.testing.assert_allclose(np.asarray(out), ref, atol=0.02 * np.abs(ref).max())


def test_cudnn_attention_needs_bfloat16():
  with pytest.raises(ValueError, match="dtype='bfloat16'"):
    make_lm(tiny_cfg('gpt2', af_layers=0, attention='cudnn'))
