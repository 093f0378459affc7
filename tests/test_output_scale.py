"""fgram_model.output_scale: A_f's output gain / RMS norm, against a numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scone_jax import config as config_lib
from scone_jax.model import SconeLM

V, K, D = 61, 4, 32


def make_af(output_scale, init='random', final_norm='none'):
  c = config_lib.base_config()
  c.model.num_layers = 1
  c.model.d_model = D
  c.model.num_heads = 4
  c.model.max_seq_len = 16
  c.train.seq_len = 16
  c.fgram.max_len = K
  c.fgram_model.num_layers = 1
  c.fgram_model.init = init
  c.fgram_model.final_norm = final_norm
  c.fgram_model.output_scale = output_scale
  cfg = config_lib.from_configdict(c)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=V, rngs=nnx.Rngs(0))
  return cfg, lm.fgram_model


GRAMS = (np.array([[3, 4, 0, 0], [5, 6, 7, 8], [9, 10, 11, 0]], np.int32),
         np.array([2, 4, 3], np.int32))


@pytest.mark.parametrize('kind', ['scalar', 'channel', 'rmsnorm_gain'])
def test_output_scale_matches_numpy(kind):
  _, raw_af = make_af('none')
  cfg, af = make_af(kind)
  raw = np.asarray(raw_af(*map(jnp.asarray, GRAMS)), np.float64)
  # Same seed and init: the blocks are equal, only the output differs.
  gain = np.asarray(af.out_gain[...], np.float64)
  if kind == 'scalar':
    assert gain.shape == () and gain == 1.0
  else:
    assert gain.shape == (D,)
  # A non-trivial gain so the test sees the multiplication.
  new_gain = np.linspace(0.5, 2.0, D) if gain.shape else np.float64(3.0)
  af.out_gain[...] = jnp.asarray(new_gain, jnp.float32)
  got = np.asarray(af(*map(jnp.asarray, GRAMS)), np.float64)
  if kind == 'rmsnorm_gain':
    want = raw / np.sqrt(np.mean(raw ** 2, -1, keepdims=True) + 1e-6) * new_gain
    assert gain[0] == pytest.approx(cfg.model.init_std)  # starts at the token embeddings' scale.
  else:
    want = raw * new_gain
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_identity_init_still_starts_at_the_token_embedding():
  for kind in ('scalar', 'channel'):
    _, af = make_af(kind, init='identity')
    e = np.asarray(af(*map(jnp.asarray, GRAMS)))
    last = GRAMS[0][np.arange(3), GRAMS[1] - 1]
    np.testing.assert_allclose(e, np.asarray(af.token_embed(jnp.asarray(last))), atol=1e-6)
  # rmsnorm_gain: the same direction, at RMS init_std (token embeddings start there too;
  # the norm's eps 1e-6 against mean squares ~4e-4 leaves ~0.1%).
  cfg, af = make_af('rmsnorm_gain', init='identity')
  e = np.asarray(af(*map(jnp.asarray, GRAMS)), np.float64)
  t = np.asarray(af.token_embed(jnp.asarray(last)), np.float64)
  np.testing.assert_allclose(np.sqrt(np.mean(e ** 2, -1)), cfg.model.init_std, rtol=5e-3)
  cos = np.sum(e * t, -1) / np.linalg.norm(e, axis=-1) / np.linalg.norm(t, axis=-1)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_rmsnorm_gain_needs_no_final_norm():
  with pytest.raises(config_lib.ConfigError, match="final_norm='none'"):
    make_af('rmsnorm_gain', final_norm='same')
  with pytest.raises(config_lib.ConfigError, match='is not one of'):
    make_af('huge')
