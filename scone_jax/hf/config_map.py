"""A Hugging Face config.json -> the model.* keys of our ModelConfig.

Families: gpt2, llama, qwen2, qwen3, olmo, olmo2 (`model_type`). Whatever a checkpoint
uses that our layers do not compute (sliding-window attention, mixture of experts, RoPE
scalings other than llama3, biases beyond each family's, other activations) is refused
with the config.json field named, before anything is built: a checkpoint run with a
silently different architecture would train from garbage.
"""

from __future__ import annotations

from typing import Any

from scone_jax import config as config_lib
from scone_jax.config import ModelConfig
from scone_jax.hf.safetensors import CheckpointError

FAMILIES = ('gpt2', 'llama', 'qwen2', 'qwen3', 'olmo', 'olmo2')
# Fields that only ever mean a mixture-of-experts or another unsupported mechanism.
_UNSUPPORTED_FIELDS = ('num_experts', 'num_local_experts', 'n_routed_experts',
                       'moe_intermediate_size', 'add_cross_attention')
_GPT2_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')  # tanh-approximate GELU (ours).


def _refuse(where: str, field: str, value: Any, why: str) -> CheckpointError:
  return CheckpointError(f'{where}: "{field}": {value!r} is not supported ({why})')


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """RoPE theta and scaling from `rope_parameters` (transformers 5) or the older
  `rope_theta` + `rope_scaling` fields."""
  field = 'rope_parameters' if 'rope_parameters' in hf else 'rope_scaling'
  rope = dict(hf.get(field) or {})
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  out = {'model.rope_theta': float(theta)}
  if kind == 'llama3':
    out.update({'model.rope_scaling': 'llama3',
                'model.rope_factor': float(rope['factor']),
                'model.rope_low_freq_factor': float(rope['low_freq_factor']),
                'model.rope_high_freq_factor': float(rope['high_freq_factor']),
                'model.rope_original_max_len': int(rope['original_max_position_embeddings'])})
  elif kind != 'default':
    raise _refuse(where, f'{field}.rope_type', kind, "RoPE scalings: 'default', 'llama3'")
  return out


def model_overrides(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """Dotted model.* overrides (for `config.replace`) equal to the checkpoint's architecture.

  Args:
    hf: the parsed config.json.
    where: the file, for error messages.

  Raises:
    CheckpointError: an architecture or a feature we do not support, naming the field.
  """
  family = hf.get('model_type')
  if family not in FAMILIES:
    raise _refuse(where, 'model_type', family, f'supported: {list(FAMILIES)}')
  for field in _UNSUPPORTED_FIELDS:
    if hf.get(field):
      raise _refuse(where, field, hf[field], 'mixture of experts / cross-attention')
  out: dict[str, Any] = {'model.family': family, 'model.vocab_size': int(hf['vocab_size'])}
  if family == 'gpt2':
    for field in ('scale_attn_by_inverse_layer_idx',):
      if hf.get(field):
        raise _refuse(where, field, hf[field], 'GPT-2 attention is scaled by 1/sqrt(E) only')
    if not hf.get('scale_attn_weights', True):
      raise _refuse(where, 'scale_attn_weights', False, 'attention is scaled by 1/sqrt(E)')
    if hf.get('activation_function', 'gelu_new') not in _GPT2_ACTIVATIONS:
      raise _refuse(where, 'activation_function', hf['activation_function'],
                    f'supported: {list(_GPT2_ACTIVATIONS)}')
    d = int(hf['n_embd'])
    out.update({'model.d_model': d, 'model.num_layers': int(hf['n_layer']),
                'model.num_heads': int(hf['n_head']),
                'model.mlp_dim': int(hf.get('n_inner') or 4 * d),
                'model.max_seq_len': int(hf['n_positions']),
                'model.norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)),
                'model.tied_embeddings': bool(hf.get('tie_word_embeddings', True))})
    return out
  if hf.get('hidden_act', 'silu') != 'silu':
    raise _refuse(where, 'hidden_act', hf['hidden_act'], "the MLP is SwiGLU ('silu')")
  for field in ('attention_bias', 'mlp_bias'):
    if hf.get(field):
      raise _refuse(where, field, hf[field], f'{family} blocks have no such biases here')
  if hf.get('use_sliding_window') or any(
      t != 'full_attention' for t in hf.get('layer_types') or ()):
    field = 'use_sliding_window' if hf.get('use_sliding_window') else 'layer_types'
    raise _refuse(where, field, hf[field], 'sliding-window attention')
  d, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  out.update({'model.d_model': d, 'model.num_layers': int(hf['num_hidden_layers']),
              'model.num_heads': heads,
              'model.num_kv_heads': int(hf.get('num_key_value_heads') or heads),
              'model.head_dim': int(hf.get('head_dim') or d // heads),
              'model.mlp_dim': int(hf['intermediate_size']),
              'model.max_seq_len': int(hf['max_position_embeddings']),
              'model.tied_embeddings': bool(hf.get('tie_word_embeddings', False))})
  if 'rms_norm_eps' in hf and family != 'olmo':
    out['model.norm_eps'] = float(hf['rms_norm_eps'])
  if family == 'olmo' and hf.get('clip_qkv'):
    out['model.clip_qkv'] = float(hf['clip_qkv'])
  out.update(_rope(hf, where))
  return out


def model_config(hf: dict[str, Any], where: str, **fields: Any) -> ModelConfig:
  """The checkpoint's architecture as a resolved ModelConfig (family defaults applied;
  `fields` set the rest, e.g. param_dtype; vocab_size is left 0: "vocab_size" is read
  from `hf` by whoever sizes a table).

  Raises:
    CheckpointError: as `model_overrides`.
  """
  mapped = {k.split('.', 1)[1]: v for k, v in model_overrides(hf, where).items()
            if k != 'model.vocab_size'}
  # (A one-token train.seq_len: only the model section is in question here.)
  return config_lib.validate(config_lib.Config(
      model=ModelConfig(**{**mapped, **fields}), train=config_lib.TrainConfig(seq_len=1))).model


_ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                  'olmo': 'OlmoForCausalLM', 'olmo2': 'Olmo2ForCausalLM'}
_DEFAULT_EPS = {'layernorm': 1e-5, 'nonparametric': 1e-5, 'rmsnorm': 1e-6}


def norm_eps(m: ModelConfig) -> float:
  """The epsilon `m`'s norms use (model.norm_eps, 0 = its norm's default)."""
  return m.norm_eps or _DEFAULT_EPS[m.norm]


def hf_config(m: ModelConfig, vocab_size: int) -> dict[str, Any]:
  """The config.json of `m` for transformers; the inverse of `model_overrides`.

  Raises:
    CheckpointError: `m` is not expressible as its family's transformers model (e.g. a
      gpt2-family run with RoPE): `model_overrides` of the result would not give `m` back.
  """
  eps = norm_eps(m)
  out: dict[str, Any] = {'model_type': m.family, 'architectures': [_ARCHITECTURES[m.family]],
                         'vocab_size': vocab_size, 'tie_word_embeddings': m.tied_embeddings}
  if m.family == 'gpt2':
    out.update(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
               n_positions=m.max_seq_len, layer_norm_epsilon=eps,
               activation_function='gelu_new')
  else:
    rope = {'rope_type': m.rope_scaling or 'default', 'rope_theta': m.rope_theta}
    if m.rope_scaling == 'llama3':
      rope.update(factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                  high_freq_factor=m.rope_high_freq_factor,
                  original_max_position_embeddings=m.rope_original_max_len)
    out.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
               head_dim=m.head_size, intermediate_size=m.mlp_dim,
               max_position_embeddings=m.max_seq_len, hidden_act='silu',
               attention_bias=False, rope_parameters=rope)
    if m.family == 'olmo':
      out['clip_qkv'] = m.clip_qkv or None
    else:
      out['rms_norm_eps'] = eps
  # What transformers builds from `out`, as our resolved keys, must be `m` itself.
  theirs = model_config(out, 'config.json')
  for key in ('mlp_activation', 'norm', 'position', 'bias', 'qk_norm', 'norm_position',
              'clip_qkv', 'mlp_dim', 'head_size', 'kv_heads'):
    if getattr(m, key) != getattr(theirs, key):
      raise CheckpointError(f'config.model.{key}={getattr(m, key)!r}: a {m.family} model in '
                            f'transformers has {getattr(theirs, key)!r}; this run has no '
                            'transformers equivalent')
  return out
