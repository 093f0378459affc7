"""Accelerator paths checked on CPU: attention kernel choice and the masks each kernel is
given, remat-free chunked cross-entropy (values, gradients, compiled memory), the
compilation cache and XLA flag presets, and benchmarks/accelerator.py --quick."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import compat
from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax.model import SconeLM
from scone_jax.model import layers
from scone_jax.model.loss import cross_entropy_sums
from scone_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 61


def _qkv(b, t, h, e, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, t, h, e)), dtype) for _ in range(3)]


def _packed_segments(t):
  """Row 0: three documents then padding; row 1: one document then padding."""
  seg = np.zeros((2, t), np.int32)
  seg[0, :t // 3], seg[0, t // 3:2 * t // 3], seg[0, 2 * t // 3:t - 3] = 1, 2, 3
  seg[1, :t - t // 4] = 1
  return jnp.asarray(seg)


@pytest.mark.parametrize('requested,platform,dtype,t,e,expected', [
    ('auto', 'cpu', 'bfloat16', 256, 64, 'einsum'),
    ('auto', 'cuda', 'bfloat16', 100, 64, 'cudnn'),
    ('auto', 'cuda', 'float32', 256, 64, 'einsum'),  # cuDNN has no float32 kernel.
    ('auto', 'cuda', 'bfloat16', 256, 160, 'einsum'),  # Head dim over 128.
    ('auto', 'cuda', 'bfloat16', 255, 64, 'einsum'),  # Odd length: no masked kernel.
    ('auto', 'gpu', 'bfloat16', 256, 64, 'einsum'),  # Not NVIDIA: no cuDNN.
    ('auto', 'tpu', 'float32', 256, 64, 'splash'),
    ('auto', 'tpu', 'bfloat16', 10, 64, 'einsum'),  # Not whole 128-token tiles.
    ('einsum', 'cuda', 'bfloat16', 256, 64, 'einsum'),
    ('cudnn', 'cuda', 'bfloat16', 256, 64, 'cudnn'),
])
def test_attention_backend_choice(requested, platform, dtype, t, e, expected):
  assert compat.attention_backend(requested, dtype, t, e, platform) == expected


@pytest.mark.parametrize('one_segment', [True, False])
def test_cudnn_call_computes_the_segment_mask(one_segment):
  # The exact jax.nn.dot_product_attention call we hand cuDNN (is_causal + lengths, or the
  # same-document mask), run by XLA: equal to einsum under segment_mask on real queries.
  t = 24
  q, k, v = _qkv(2, t, 2, 8)
  seg = jnp.asarray((np.arange(t)[None] < np.array([[t], [17]])).astype(np.int32)
                    ) if one_segment else _packed_segments(t)
  ref = layers.attend(q, k, v, layers.segment_mask(seg))
  valid = seg > 0
  lengths = jnp.sum(valid, 1, dtype=jnp.int32) if one_segment else None
  mask = None if one_segment else layers.segment_mask(seg)
  out = compat.cudnn_attention(q, k, v, lengths, mask, implementation='xla')
  np.testing.assert_allclose(np.asarray(out)[np.asarray(valid)],
                             np.asarray(ref)[np.asarray(valid)], atol=1e-5, rtol=1e-5)


def _tiny_cfg(**model):
  c = config_lib.base_config()
  c.model.family = 'olmo'
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 4
  c.model.max_seq_len = c.train.seq_len = 32
  c.fgram.max_len = 3
  for key, value in model.items():
    c.model[key] = value
  return config_lib.from_configdict(c)


def _batch(b=2, t=12, seed=3):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[0, 5:] = 2
  seg[1, t - 4:] = 0
  pos = np.zeros((b, t), np.int32)
  for i in range(b):
    for j in range(1, t):
      pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
  return {'inputs_BxT': jnp.asarray(rng.integers(1, V, (b, t)), jnp.int32),
          'targets_BxT': jnp.asarray(rng.integers(1, V, (b, t)), jnp.int32),
          'weights_BxT': jnp.asarray(seg > 0, jnp.float32),
          'positions_BxT': jnp.asarray(pos), 'segment_ids_BxT': jnp.asarray(seg)}


def test_model_through_the_cudnn_branch_equals_einsum(monkeypatch):
  # layers.self_attention's cuDNN branch (lengths for prefill, the mask for packed rows,
  # padding queries zeroed) with the kernel call run by XLA: the model's training logits
  # and prefill equal the einsum model's.
  batch = _batch()
  lm = SconeLM(_tiny_cfg().model, _tiny_cfg().fgram_model, 3, V, nnx.Rngs(0))
  tokens = batch['inputs_BxT']
  lengths = jnp.array([12, 7], jnp.int32)

  def run():
    logits = lm(batch)
    prefill, cache = lm.backbone.prefill(lm.backbone.embed(tokens), lengths,
                                         lm.backbone.init_cache(2, 16))
    return np.asarray(logits), np.asarray(prefill), np.asarray(cache.k)

  ref = run()
  monkeypatch.setattr(compat, 'attention_backend', lambda *_: 'cudnn')
  monkeypatch.setattr(compat, 'cudnn_attention', functools.partial(
      compat.cudnn_attention, implementation='xla'))
  got = run()
  valid = np.asarray(batch['segment_ids_BxT']) > 0
  np.testing.assert_allclose(got[0][valid], ref[0][valid], atol=1e-5, rtol=1e-5)
  for b, n in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(got[1][b, :n], ref[1][b, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[2][:, b, :n], ref[2][:, b, :n], atol=1e-5, rtol=1e-5)
  assert np.isfinite(got[2]).all()  # Padding keys/values in the cache stay finite.


def test_splash_mask_with_segment_ids_is_the_segment_mask():
  # The kernel attends where its static mask (causal per head) AND q/kv segment ids are
  # equal; on real queries that is segment_mask.
  t, h = 128, 2
  seg = _packed_segments(t)
  static_HxTxT = compat.splash_mask(h, t)[:, :, :]
  for b in range(seg.shape[0]):
    s = np.asarray(seg[b])
    splash = static_HxTxT & (s[:, None] == s[None, :])[None]
    ours = np.asarray(layers.segment_mask(seg))[b]
    real = s > 0
    for head in range(h):
      np.testing.assert_array_equal(splash[head][real], ours[real])


@pytest.mark.slow
def test_splash_kernel_interpreted_equals_einsum():
  # The Pallas kernel itself, in the interpreter (about 10 s on CPU).
  t = 128
  q, k, v = _qkv(2, t, 2, 16)
  seg = _packed_segments(t)
  ref = layers.attend(q, k, v, layers.segment_mask(seg))
  out = compat.splash_attention(q, k, v, seg, interpret=True)
  valid = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize('chunk', [4, 5, 12])  # Divides T, ragged, one chunk.
def test_chunked_cross_entropy_equals_full_loss_and_gradients(chunk):
  batch = _batch()
  cfg = _tiny_cfg()
  graphdef, params = nnx.split(SconeLM(cfg.model, cfg.fgram_model, 3, V, nnx.Rngs(0)))
  chunked_graphdef, _ = nnx.split(SconeLM(_tiny_cfg(loss_chunk=chunk).model, cfg.fgram_model,
                                          3, V, nnx.Rngs(0)))

  def full(p):
    return cross_entropy_sums(nnx.merge(graphdef, p)(batch), batch['targets_BxT'],
                              batch['weights_BxT'])

  def chunked(p):
    lm = nnx.merge(chunked_graphdef, p)
    return lm.backbone.chunked_loss_sums(
        lm.input_embeddings(batch), batch['positions_BxT'], batch['segment_ids_BxT'],
        batch['targets_BxT'], batch['weights_BxT'])

  mean = lambda f: lambda p: f(p)[0] / f(p)[1]
  (ref_sum, ref_w), (got_sum, got_w) = full(params), chunked(params)
  assert float(got_w) == float(ref_w)
  # Float32 sums over ~20 tokens of ~log(V) each: a few ulps of the total.
  np.testing.assert_allclose(float(got_sum), float(ref_sum), rtol=1e-5)
  ref_g, got_g = jax.grad(mean(full))(params), jax.grad(mean(chunked))(params)
  for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
    scale = float(np.abs(np.asarray(a)).max()) or 1.0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-4)


def test_chunked_loss_shrinks_the_compiled_train_step():
  # A vocab large against d so the [B, T, V] float32 logits (and their gradient) dominate
  # the step's temporaries; chunking keeps one [B, C, V] chunk alive instead.
  vocab, b, t = 4096, 4, 32
  batch = {k: np.asarray(v) for k, v in _batch(b, t).items()}
  batch['inputs_BxT'] = np.random.default_rng(0).integers(1, vocab, (b, t)).astype(np.int32)
  results = {}
  for chunk in (0, 8):
    cfg = config_lib.replace(_tiny_cfg(loss_chunk=chunk), **{
        'mesh.data': 1, 'train.batch_size': b, 'model.vocab_size': vocab,
        'tokenizer.vocab_size': vocab})
    mesh = mesh_lib.make_mesh(cfg.mesh, b, devices=jax.devices()[:1])
    graphdef, state, tx = step_lib.create_train_state(cfg, mesh, vocab, 3)
    step_fn = step_lib.make_train_step(graphdef, tx, lambda _: 1.0)
    compiled = step_lib.jit_train_step(step_fn, state, batch, mesh)
    temp = step_lib.log_memory_analysis(compiled)['temp_size_in_bytes']
    _, metrics = compiled(state, jax.device_put(batch, step_lib.batch_shardings(batch, mesh)))
    results[chunk] = temp, float(metrics['loss'])
  logits_bytes = b * t * vocab * 4
  full_temp, full_loss = results[0]
  chunk_temp, chunk_loss = results[8]
  assert full_temp > logits_bytes  # The full step does hold the logits.
  assert chunk_temp < full_temp - logits_bytes // 2, results
  np.testing.assert_allclose(chunk_loss, full_loss, rtol=1e-5)


def test_compilation_cache_only_on_accelerators(monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    monkeypatch.setenv(compat.CACHE_ENV, str(tmp_path / 'xla'))
    assert compat.enable_compilation_cache('cpu') is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv(compat.CACHE_ENV, 'off')
    assert compat.enable_compilation_cache('gpu') is None
    monkeypatch.setenv(compat.CACHE_ENV, str(tmp_path / 'xla'))
    assert compat.enable_compilation_cache('gpu') == str(tmp_path / 'xla')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'xla')
    # A dir set by the user (or an earlier call) is kept.
    monkeypatch.setenv(compat.CACHE_ENV, str(tmp_path / 'other'))
    assert compat.enable_compilation_cache('tpu') == str(tmp_path / 'xla')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_gpu_xla_flags():
  known = compat.known_xla_gpu_flags()
  # Every preset exists in the installed jaxlib (XLA aborts on an unknown flag).
  assert set(compat.GPU_XLA_FLAGS) <= known, set(compat.GPU_XLA_FLAGS) - known
  flags = compat.gpu_xla_flags('--xla_gpu_enable_triton_gemm=true --foo=1', known)
  parts = flags.split()
  assert parts[:2] == ['--xla_gpu_enable_triton_gemm=true', '--foo=1']  # Theirs win.
  assert '--xla_gpu_enable_triton_gemm=false' not in parts
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in parts
  # A flag this jaxlib lacks is left out.
  without = compat.gpu_xla_flags('', known - {'xla_gpu_enable_latency_hiding_scheduler'})
  assert 'latency_hiding' not in without and without.startswith('--xla_gpu_')


def test_accelerator_benchmark_quick_writes_every_section(tmp_path):
  out = tmp_path / 'accel.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '',
         'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'accelerator.py'),
                  '--device=cpu', '--quick', f'--out={out}',
                  f'--whl_dir={tmp_path / "no_wheels"}'],
                 check=True, env=env, timeout=900)
  results = json.loads(out.read_text())
  missing = [s for s in accelerator_sections() if s not in results]
  assert not missing, missing
  assert all(v == 'present' for v in results['wheels'].values()), results['wheels']
  cases = {(r['attention'], r['variant']) for r in results['train']}
  assert cases == {(a, v) for a in ('einsum', 'auto') for v in ('baseline', 'scone')}
  assert all(r['kernel'] == 'einsum' and r['step_ms'] > 0 for r in results['train'])
  for r in results['flops_ratio']:
    # SCONE adds A_f's work: more FLOPs than the baseline, by the analytical model.
    assert r['flops_ratio'] > 1 and r['time_ratio'] > 0
  assert 'skipped' not in results['decode'], results['decode']
  for b in ('1', '4'):
    assert min(results['decode']['tokens_per_s'][b].values()) > 0
    # The store lookup adds (almost) no device FLOPs to the decode step.
    assert abs(results['decode_flops'][b]['ratio'] - 1) < 0.01


def accelerator_sections():
  spec = importlib.util.spec_from_file_location(
      'accelerator', os.path.join(REPO, 'benchmarks', 'accelerator.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SECTIONS
