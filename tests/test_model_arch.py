"""The checkpoint-architecture keys of ModelConfig: family defaults and the refusals of
inconsistent settings (each names the key)."""

from __future__ import annotations

import pytest

from scone_jax import config as config_lib
from scone_jax.config import ConfigError


def _model(**model):
  return config_lib.from_configdict({'model': model}).model


@pytest.mark.parametrize('family, want', [
    ('gpt2', dict(norm='layernorm', position='learned', bias='all', qk_norm='none',
                  norm_position='pre')),
    ('olmo', dict(norm='nonparametric', position='rope', bias='none', qk_norm='none')),
    ('llama', dict(norm='rmsnorm', mlp_activation='swiglu', bias='none', qk_norm='none')),
    ('qwen2', dict(norm='rmsnorm', bias='qkv', qk_norm='none')),
    ('qwen3', dict(norm='rmsnorm', bias='none', qk_norm='head')),
    ('olmo2', dict(norm='rmsnorm', qk_norm='full', norm_position='post')),
])
def test_family_defaults(family, want):
  m = _model(family=family)
  assert {k: getattr(m, k) for k in want} == want
  assert (m.kv_heads, m.head_size) == (m.num_heads, m.d_model // m.num_heads)


def test_head_dim_and_kv_heads_are_independent_of_d_model():
  m = _model(family='qwen3', d_model=40, num_heads=4, num_kv_heads=2, head_dim=12)
  assert (m.kv_heads, m.head_size) == (2, 12)


@pytest.mark.parametrize('model, match', [
    (dict(num_heads=4, num_kv_heads=3), r'model.num_heads=4 is not a multiple of '
                                        r'config.model.num_kv_heads=3'),
    (dict(d_model=30, num_heads=4), r'model.d_model=30 is not divisible .* model.head_dim'),
    (dict(family='llama', head_dim=7), r"position='rope' needs an even head dimension"),
    (dict(family='gpt2', rope_scaling='llama3'), r"rope_scaling='llama3' scales RoPE"),
    (dict(family='olmo', qk_norm='head'), r"qk_norm='head' is an RMSNorm"),
    (dict(family='llama', rope_scaling='llama3', rope_low_freq_factor=4.0,
          rope_high_freq_factor=2.0), r'rope_high_freq_factor=2.0 must exceed'),
    (dict(num_kv_heads=-1), r'model.num_kv_heads=-1 must be >= 0'),
    (dict(clip_qkv=-1.0), r'model.clip_qkv=-1.0 must be >= 0'),
    (dict(bias='some'), r"model.bias='some' is not one of"),
])
def test_inconsistent_settings_are_refused(model, match):
  with pytest.raises(ConfigError, match=match):
    _model(**model)


def test_changing_family_rederives_its_defaults():
  cfg = config_lib.replace(config_lib.Config(), **{'model.family': 'olmo2'})
  assert (cfg.model.qk_norm, cfg.model.norm_position, cfg.model.bias) == ('full', 'post',
                                                                         'none')
