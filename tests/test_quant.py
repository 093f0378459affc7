"""Quantised stores (export.quant int8 | fp8): round-trip bounds, store tiers and
checksums, every lookup path, dequantisation on the device and its stated FLOPs."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from scone_jax import artifacts, compat, config, config_runtime
from scone_jax.export import quant
from scone_jax.export.writer import write_store
from scone_jax.model import SconeLM
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder
from tests.test_decode import (B, BOS, CONTS, K, PROMPTS, V, _cfg,  # noqa: F401
                               _reference_greedy, _train_forward, export_one_device,
                               table)

D = 32  # _cfg's d_model.


def _rows(r=50, d=24, seed=0):
  """Rows at very different scales, a zero row and a row with one large entry."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((r, d)).astype(np.float32) * np.logspace(-4, 3, r)[:, None]
  x[3] = 0
  x[7, 5] = 1e4
  return x.astype(np.float32)


def test_int8_round_trip_error_is_at_most_half_a_scale():
  x = _rows()
  q = quant.quantize(x, 'int8')
  assert q.dtype == np.int8 and q.shape == (50, 28)
  scale = np.abs(x).max(axis=1) / 127
  dq = quant.dequantize_np(q)
  err = np.abs(x - dq)
  # Half a quantisation step, plus float32 rounding of x / scale and q * scale.
  assert (err <= scale[:, None] * (0.5 + 1e-5) + 1e-30).all()
  assert (dq[3] == 0).all()
  assert np.abs(q[:, :24]).max() == 127  # The absmax element of each row uses the range.
  # The bound is tight enough to be informative: some element sits near it.
  assert (err / np.maximum(scale[:, None], 1e-30)).max() > 0.45


def test_fp8_round_trip_error_is_relative():
  x = _rows()
  q = quant.quantize(x, 'fp8')
  assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == (50, 28)
  scale = np.abs(x).max(axis=1) / 448
  dq = quant.dequantize_np(q)
  bound = np.maximum(np.abs(x) * quant.FP8_RELATIVE_ERROR,
                     scale[:, None] * quant.FP8_ABSOLUTE_ERROR_PER_SCALE)
  assert (np.abs(x - dq) <= bound * (1 + 1e-5)).all()
  rel = np.abs(x - dq) / np.maximum(np.abs(x), 1e-30)
  normal = np.abs(x) >= scale[:, None] * 2.0 ** -6
  assert rel[normal].max() > 0.03  # Near the stated 1/16, not far below it.
  assert (dq[3] == 0).all()


@pytest.mark.parametrize('kind', ['int8', 'fp8'])
def test_device_dequantize_equals_numpy_reference(kind):
  q = quant.quantize(_rows(), kind)
  got = jax.jit(lambda a: quant.dequantize(a, 24))(q)
  np.testing.assert_array_equal(np.asarray(got), quant.dequantize_np(q))
  x = np.ones((2, 24), np.float32)  # Unquantised rows pass through.
  assert quant.dequantize(jnp.asarray(x), 24) is not None
  np.testing.assert_array_equal(quant.dequantize(x, 24), x)


def test_quantize_refuses_non_finite_rows_and_bad_modes():
  with pytest.raises(ValueError, match='non-finite'):
    quant.quantize(np.array([[1.0, np.nan]], np.float32), 'int8')
  with pytest.raises(ValueError, match='quant='):
    quant.quantize(np.ones((1, 2), np.float32), 'int4')


@pytest.mark.parametrize('kind', ['int8', 'fp8'])
def test_store_tiers_gather_quantised_rows_and_check_crcs(tmp_path, kind):
  x = _rows(r=37)
  out = str(tmp_path / 'store')
  write_store(out, 37, 24, 'bfloat16', 16, lambda a, b: x[a:b], {'checkpoint_step': 1},
              inner_rows=4, progress=False, quant=kind)
  want = quant.quantize(x, kind)
  ids = np.array([0, -1, 36, 3, 16, 15, -1, 7], np.int64)
  want_ids = np.where((ids >= 0)[:, None], want[np.maximum(ids, 0)], 0).astype(want.dtype)
  stores = [EmbeddingStore.open(out, 'ram', expect={'quant': kind, 'row_width': 28}),
            EmbeddingStore.open(out, 'disk', disk_reader='memmap'),
            EmbeddingStore.open(out, 'disk', disk_reader='tensorstore')]
  for store in stores:
    assert (store.quant, store.row_width, store.d_model) == (kind, 28, 24)
    assert store.nbytes == 37 * (24 + 4)  # One byte per value, four per scale.
    got = store.gather(ids)
    np.testing.assert_array_equal(got.view(np.uint8), want_ids.view(np.uint8))
  # A flipped byte in a shard fails its crc32c on load (ram) or first touch (disk).
  shard = tmp_path / 'store' / 'c' / '1' / '0'
  raw = bytearray(shard.read_bytes())
  raw[5] ^= 0xFF
  shard.write_bytes(bytes(raw))
  with pytest.raises(artifacts.ArtifactError, match='checksum'):
    EmbeddingStore.open(out, 'ram')
  with pytest.raises(artifacts.ArtifactError, match='checksum'):
    EmbeddingStore.open(out, 'disk').gather(np.array([20]))


@pytest.fixture(scope='module')
def quantised(table, tmp_path_factory):  # noqa: F811
  """The model, and per mode a ram store; 'ref-<mode>' is a float32 store holding the
  dequantised rows (what the device must see after dequantising)."""
  cfg = _cfg(1)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(0))
  out = {}
  for kind in ('int8', 'fp8'):
    path = export_one_device(lm, table, tmp_path_factory.mktemp(kind), quant=kind)
    out[kind] = EmbeddingStore.open(path, 'ram')
    if kind == 'int8':
      out['int8-disk'] = EmbeddingStore.open(path, 'disk')
    dq = quant.dequantize_np(out[kind].gather(np.arange(len(table))))
    ref = str(tmp_path_factory.mktemp('ref') / 'export')
    write_store(ref, len(table), D, 'float32', 64, lambda a, b, dq=dq: dq[a:b], {},
                progress=False)
    out[f'ref-{kind}'] = EmbeddingStore.open(ref, 'ram')
  return lm, out


@pytest.mark.parametrize('kind', ['int8', 'fp8', 'int8-disk'])
def test_quantised_serving_logits(quantised, table, kind):  # noqa: F811
  """Prefill + per-token host steps through a quantised store give the logits of the
  dequantised rows (exactly what the device computes), close to the training forward."""
  lm, stores = quantised
  prompts = [np.array(p) for p in PROMPTS]
  conts = [np.array(c) for c in CONTS]
  got = Decoder(lm, stores[kind], table, batch_size=B,
                bos_id=BOS).teacher_forced_logits(prompts, conts)
  ref = Decoder(lm, stores[f'ref-{kind[:4]}'], table, batch_size=B,
                bos_id=BOS).teacher_forced_logits(prompts, conts)
  want, _ = _train_forward(lm, table, [p + c for p, c in zip(PROMPTS, CONTS)])
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(got[b], ref[b], rtol=1e-5, atol=1e-5 * np.abs(ref[b]).max())
    err = np.abs(got[b] - want[b, :got[b].shape[0]]).max() / np.abs(want[b]).max()
    assert err < (0.05 if kind.startswith('int8') else 0.15), (b, err)


@pytest.mark.parametrize('kind,loop,lookup', [('int8', 'device', 'native'),
                                              ('int8', 'device', 'callback'),
                                              ('int8', 'host', 'auto'),
                                              ('int8-disk', 'device', 'auto'),
                                              ('int8', 'device', 'cache')])
def test_quantised_generation_on_every_lookup_path(quantised, table, kind, loop,  # noqa: F811
                                                   lookup):
  lm, stores = quantised
  prompts = [np.array(p) for p in PROMPTS[:3]]
  # 'cache' keeps 2 rows on the device, so the quantised misses go through its native gather.
  extra = {'cache_rows': 2} if lookup == 'cache' else {}
  dec = Decoder(lm, stores[kind], table, batch_size=B, bos_id=BOS, loop=loop, lookup=lookup,
                chunk_steps=4, **extra)
  assert dec.lookup.name == ('native' if lookup == 'auto' else lookup)
  ref = Decoder(lm, stores[f'ref-{kind[:4]}'], table, batch_size=B, bos_id=BOS, loop='host')
  got = dec.generate(prompts, max_new_tokens=6).tokens
  want = ref.generate(prompts, max_new_tokens=6).tokens
  for g, w in zip(got, want):
    assert list(g) == list(w)


def test_generation_differs_without_dequantising(quantised, table):  # noqa: F811
  """The generation test can fail: greedy tokens from the dequantised rows differ from
  the model without the store on some prompt."""
  lm, stores = quantised
  prompts = [np.array(p) for p in PROMPTS]
  a = Decoder(lm, stores['int8'], table, batch_size=B, bos_id=BOS, loop='host')
  b = Decoder(lm, batch_size=B, bos_id=BOS, loop='host')
  la = a.teacher_forced_logits(prompts, [np.array(c[:1]) for c in CONTS])
  lb = b.teacher_forced_logits(prompts, [np.array(c[:1]) for c in CONTS])
  assert max(np.abs(x - y).max() for x, y in zip(la, lb)) > 1e-3


def test_decode_step_flops_are_baseline_plus_dequantisation(quantised, table):  # noqa: F811
  """XLA's count of the quantised decode step: the bf16 store's step plus the
  dequantisation per token: D multiplies, the D converts (XLA:CPU emulates fp8's) and 20
  integer ops for the scale's bytes, stated in quant.dequant_xla_flops_per_row."""
  lm, stores = quantised
  cfg = _cfg(0)
  base = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(1))
  f_base = compat.cost_flops(Decoder(base, batch_size=B).compiled_decode_step())
  f_ref = compat.cost_flops(Decoder(lm, stores['ref-int8'], table,
                                    batch_size=B).compiled_decode_step())
  assert f_base > 0 and abs(f_ref - f_base) <= 0.01 * f_base
  for kind in ('int8', 'fp8'):
    f_q = compat.cost_flops(Decoder(lm, stores[kind], table,
                                    batch_size=B).compiled_decode_step())
    assert f_q - f_ref == quant.dequant_xla_flops_per_row(D, kind) * B, (kind, f_q, f_ref)


def test_config_rules():
  base = config.from_configdict(config.base_config())
  with pytest.raises(config.ConfigError, match='no f-gram side'):
    config.replace(base, **{'export.quant': 'int8', 'fgram_model.num_layers': 0})
  cfg = config.replace(base, **{'export.quant': 'fp8', 'fgram_model.num_layers': 1})
  assert cfg.export.quant == 'fp8'
  config_runtime.validate_runtime(cfg, 8, 1)  # Quantised export trains like any SCONE run.
