"""The decode step updates its KV cache in place and reads it only up to the filled length.

`Backbone.decode` carries the cache through the layer scan and writes only the new rows;
its attention (`layers.attend_filled`) reads keys in chunks up to the longest row. These
tests hold it to the full-length masked attention and the training forward, and read the
optimized HLO of the compiled step and device-loop chunk for cache-sized copies.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import config
from scone_jax.model import SconeLM, backbone as backbone_lib
from scone_jax.model.layers import attend, attend_filled
from scone_jax.serve.decode import Decoder
from scone_jax.serve import steps
from scone_jax.serve.sampling import Sampling

V = 50
L, H, E = 2, 2, 8
# Longer than two decode chunks and not a multiple of one: the last chunk overlaps.
S = 2 * backbone_lib.DECODE_CHUNK + 8


def _lm(max_seq_len: int) -> SconeLM:
  """A tiny baseline (no A_f): the decoder serves its backbone."""
  cfg = config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': L, 'model.d_model': H * E, 'model.num_heads': H,
      'model.max_seq_len': max_seq_len, 'model.init_std': 0.3, 'train.seq_len': 16,
      'fgram_model.num_layers': 0, 'fgram.max_len': 3})
  return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=3, vocab_size=V,
                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_chunked_attention_equals_full_masked_attention(kv_heads):
  b, h, s, e, chunk = 4, 4, 37, 8, 8  # 37 = 4 chunks + an overlapping fifth.
  keys = jax.random.split(jax.random.key(0), 3)
  q_Bx1xHxE = jax.random.normal(keys[0], (b, 1, h, e))
  k_LxBxSxKxE = jax.random.normal(keys[1], (2, b, s, kv_heads, e))
  v_LxBxSxKxE = jax.random.normal(keys[2], (2, b, s, kv_heads, e))
  filled_B = jnp.array([1, 9, 30, s], jnp.int32)
  got = jax.jit(attend_filled, static_argnums=5)(q_Bx1xHxE, k_LxBxSxKxE, v_LxBxSxKxE,
                                                 jnp.int32(1), filled_B, chunk)
  # The reference: every head's keys repeated to the query heads, all S keys under a mask.
  k_BxSxHxE = jnp.repeat(k_LxBxSxKxE[1], h // kv_heads, axis=2)
  v_BxSxHxE = jnp.repeat(v_LxBxSxKxE[1], h // kv_heads, axis=2)
  mask_Bx1xS = (jnp.arange(s)[None] < filled_B[:, None])[:, None]
  want = attend(q_Bx1xHxE, k_BxSxHxE, v_BxSxHxE, mask_Bx1xS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_decode_over_several_chunks_equals_training_forward(monkeypatch):
  """Rows of different lengths decoded past several chunk boundaries give the training
  forward's logits at every position (the cache rows written at each row's position)."""
  monkeypatch.setattr(backbone_lib, 'DECODE_CHUNK', 4)
  model = _lm(32).backbone
  graphdef, state = nnx.split(model)
  tokens_BxT = jax.random.randint(jax.random.key(1), (3, 14), 4, V)
  lengths_B = jnp.array([2, 5, 3], jnp.int32)

  @jax.jit
  def run(state, tokens_BxT):
    m = nnx.merge(graphdef, state)
    b, t = tokens_BxT.shape
    prompt_BxT = jnp.where(jnp.arange(t)[None] < lengths_B[:, None], tokens_BxT, 0)
    _, cache = m.prefill(m.embed(prompt_BxT[:, :6]), lengths_B, m.init_cache(b, 32))
    out = []
    for i in range(t - 6):  # Row b feeds its token at position lengths_B[b] + i.
      tok_B = jnp.take_along_axis(tokens_BxT, (lengths_B + i)[:, None], axis=1)
      logits_Bx1xV, cache = m.decode(m.embed(tok_B), cache)
      out.append(logits_Bx1xV[:, 0])
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    full_BxTxV = m(m.embed(tokens_BxT), positions_BxT, jnp.ones((b, t), jnp.int32))
    return jnp.stack(out, 1), full_BxTxV

  steps_BxNxV, full_BxTxV = map(np.asarray, run(state, tokens_BxT))
  for row, n in enumerate(np.asarray(lengths_B)):
    want = full_BxTxV[row, n:n + steps_BxNxV.shape[1]]
    np.testing.assert_allclose(steps_BxNxV[row], want, rtol=1e-4, atol=1e-4 * np.abs(
        want).max())


_DEF = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(')
_CALLS = re.compile(r'calls=%([\w.-]+)')
# Ops that update a buffer in place (XLA writes their output into their operand's buffer).
_IN_PLACE = {'scatter', 'dynamic-update-slice'}
# Ops that name a buffer without writing one.
_NO_WRITE = {'parameter', 'get-tuple-element', 'bitcast', 'while', 'tuple'}


def cache_sized_writes(hlo: str, cache_shape: tuple[int, ...]) -> list[str]:
  """Instructions of an optimized HLO module that write a fresh buffer the size of the
  cache, or of one layer of it: anything but an in-place update or a rename."""
  layer = cache_shape[1:]
  return fresh_writes(hlo, [cache_shape, layer, (1,) + layer])


def fresh_writes(hlo: str, shapes) -> list[str]:
  """Instructions of an optimized HLO module that write a fresh buffer of one of `shapes`
  (anything but an in-place update or a rename)."""
  roots = {}  # fused computation -> its root's opcode
  computation = None
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and '{' in line:
      computation = line.split()[0].lstrip('%')
    m = _DEF.match(line)
    if m and line.lstrip().startswith('ROOT'):
      roots[computation] = m.group(4)
  sizes = {','.join(map(str, shape)) for shape in shapes}
  bad = []
  for line in hlo.splitlines():
    m = _DEF.match(line)
    if not m or m.group(3) not in sizes or m.group(4) in _NO_WRITE | _IN_PLACE:
      continue
    calls = _CALLS.search(line)
    if m.group(4) == 'fusion' and calls and roots.get(calls.group(1)) in _IN_PLACE:
      continue
    bad.append(line.strip()[:160])
  return bad


@pytest.fixture(scope='module')
def lm():
  return _lm(S)


def test_device_loop_and_decode_step_never_copy_the_cache(lm):
  b = 3
  shape = (L, b, S, H, E)
  dec = Decoder(lm, batch_size=b)
  compiled = dec.compiled_loop_chunk(Sampling())
  hlo = compiled.as_text()
  assert 'f32[%s]' % ','.join(map(str, shape)) in hlo  # The shape is spelled as assumed.
  assert cache_sized_writes(hlo, shape) == []
  # Nor a hidden one: an update that could not reuse its operand's buffer would need a
  # cache-sized scratch buffer (the old decode's temporaries were 3.6 caches).
  assert compiled.memory_analysis().temp_size_in_bytes < np.prod(shape) * 4
  # The cache's buffers are donated: the outputs alias them.
  assert re.search(r'input_output_alias=\{[^\n]*\{3\}:', hlo)

  graphdef, state = nnx.split(lm.backbone)
  cache = jax.eval_shape(lambda: lm.backbone.init_cache(b, S))
  token_B = jax.ShapeDtypeStruct((b,), jnp.int32)
  slab_BxE = jax.ShapeDtypeStruct((b, H * E + 1), jnp.float32)
  step_hlo = steps.DECODE.lower(graphdef, Sampling(), state, token_B, slab_BxE, cache,
                                jax.random.key(0), 0).compile().as_text()
  assert cache_sized_writes(step_hlo, shape) == []


def test_device_loop_reads_each_layers_weights_in_place(lm):
  """The serving layout's weights are read where they lie: no step of the compiled loop
  writes a buffer shaped like one layer's weight matrix. The stacked [L, ...] weights it
  replaces were sliced into such buffers every step (the check is not blind)."""
  serving = nnx.state(lm.backbone.for_serving().blocks)
  shapes = {x.shape for x in jax.tree.leaves(serving) if x.ndim >= 2}
  assert fresh_writes(Decoder(lm, batch_size=3).compiled_loop_chunk().as_text(), shapes) == []
  stacked = Decoder(lm, batch_size=3)
  stacked.graphdef, stacked.state = nnx.split(lm.backbone)  # The weights as trained.
  assert fresh_writes(stacked.compiled_loop_chunk().as_text(), shapes)


def test_the_hlo_check_sees_a_copy():
  """The checker is not blind: the old decode (cache as scan xs, restacked as ys) copied."""
  hlo = ('%fused_computation.1 (p: f32[2,3,5,2,8]) -> f32[2,3,5,2,8] {\n'
         '  ROOT %dynamic-update-slice.1 = f32[2,3,5,2,8]{4,3,2,1,0} dynamic-update-slice('
         '%p, %u, %i, %i, %i, %i, %i)\n}\n'
         'ENTRY %main {\n'
         '  %dus = f32[2,3,5,2,8]{4,3,2,1,0} fusion(%a, %b), kind=kLoop, '
         'calls=%fused_computation.1\n'
         '  %copy.47 = f32[2,3,5,2,8]{4,3,2,1,0} copy(%get-tuple-element.553)\n'
         '  %layer = f32[1,3,5,2,8]{4,3,2,1,0} fusion(%c), kind=kLoop, calls=%other\n}\n')
  assert [line.split()[0] for line in cache_sized_writes(hlo, (2, 3, 5, 2, 8))] == [
      '%copy.47', '%layer']


def test_serving_layout_decodes_as_the_training_forward():
  """The Decoder's serving layout (`Backbone.for_serving`: q, k and v fused per K/V head
  group, per-layer weights) on grouped-query attention with q/k/v biases, RoPE, q/k
  RMSNorm over all heads and norms after each sublayer (qwen2 + OLMo-2's norms): its
  prefill + decode logits equal the training forward's (the stacked blocks), and its
  greedy device-loop tokens are the forward's argmax at every step."""
  cfg = config.replace(config.from_configdict(config.base_config()), **{
      'model.family': 'qwen2', 'model.qk_norm': 'full', 'model.norm_position': 'post',
      'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 4,
      'model.num_kv_heads': 2, 'model.max_seq_len': 32, 'model.init_std': 0.3,
      'train.seq_len': 16, 'fgram_model.num_layers': 0, 'fgram.max_len': 3})
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=3, vocab_size=V, rngs=nnx.Rngs(3))
  # The biases start at zero; random ones make their fused layout count.
  for name in ('bq', 'bk', 'bv'):
    var = getattr(lm.backbone.blocks, name)
    var[...] = 0.3 * jax.random.normal(jax.random.key(len(name) + ord(name[1])),
                                       var[...].shape)
  assert set(lm.backbone.for_serving().blocks.layers[0]) >= {'wqkv', 'bqkv'}
  prompts = [np.array([5, 6, 7]), np.array([9]), np.array([11, 12, 13, 14, 15])]
  dec = Decoder(lm, batch_size=3, chunk_steps=4)
  new = 9
  tokens = dec.generate(prompts, new).tokens
  rows = [np.concatenate([[1], p, t]) for p, t in zip(prompts, tokens)]
  t = max(len(r) for r in rows)
  inputs_BxT = np.zeros((3, t), np.int32)
  for b, r in enumerate(rows):
    inputs_BxT[b, :len(r)] = r
  segments_BxT = (np.arange(t)[None] < np.array([len(r) for r in rows])[:, None])
  graphdef, state = nnx.split(lm.backbone)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(
      nnx.merge(graphdef, s).embed(x), jnp.broadcast_to(jnp.arange(t), x.shape),
      jnp.asarray(segments_BxT, jnp.int32)))
  want_BxTxV = np.asarray(forward(state, inputs_BxT))
  got = dec.teacher_forced_logits(prompts, tokens)
  for b, (p, tok) in enumerate(zip(prompts, tokens)):
    assert len(tok) == new
    ref = want_BxTxV[b, :len(p) + new]  # After BOS + prompt, then after each new token.
    np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(tok, ref[len(p):].argmax(-1))
