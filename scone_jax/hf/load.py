"""`model.init_from=DIR`: a Hugging Face checkpoint directory as this run's config and
initial parameters.

DIR holds config.json, model.safetensors (or shards with model.safetensors.index.json) and
tokenizer.json; it is local or gs:// (scone_jax/paths.py). Nothing is downloaded: a Hub name
is refused with the command that downloads it. `resolve_config` (called by prepare and
train before anything is written) sets the model.* keys from config.json and the tokenizer
to DIR/tokenizer.json; `load_params` (train's init, step 0) builds each parameter as a
sharded jax.Array with `jax.make_array_from_callback`, so each device's slice is read from
the memory-mapped file by that device's host alone and no host holds the whole model.
Values are the file's: bfloat16 stays bit-exact, float16/bfloat16 widen exactly to a
float32 param_dtype, and a lossy narrowing (float32 file into bfloat16 params) is refused.

Layouts (ours stacked over L; HF per layer): nn.Linear weights are [out, in] (transposed
into ours), GPT-2's Conv1D weights are [in, out] (as ours) with q, k, v fused in c_attn.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import jax
import numpy as np

from scone_jax import config as config_lib
from scone_jax import paths
from scone_jax.config import Config, ConfigError, ModelConfig
from scone_jax.hf import config_map
from scone_jax.hf.safetensors import CheckpointError, TensorFiles, read_header
from scone_jax.tokenizer import hf as hf_tokenizer

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_HUB_NAME = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
# Checkpoint tensors that are buffers, not parameters (recomputed by our layers).
_IGNORED = re.compile(r'(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$')
# Keys config.json sets that a user's experiment may also set (compared, not overridden);
# the family-derived keys and mlp_dim follow the family and are always the checkpoint's.
_COMPARED = ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'vocab_size',
             'tied_embeddings', 'norm_eps', 'rope_theta', 'clip_qkv', 'rope_scaling')
# Lossless widenings a checkpoint tensor may take into param_dtype.
_WIDENS = {('float16', 'float32'), ('bfloat16', 'float32')}


def checkpoint_dir(spec: str) -> str:
  """The checkpoint directory `model.init_from` names; refuses Hub names and missing dirs."""
  where = f'config.model.init_from={spec}'
  if not paths.is_remote(spec) and not paths.exists(spec):
    if _HUB_NAME.match(spec):
      raise ConfigError(f'{where} is not a local directory; it looks like a Hugging Face Hub '
                        'name, and nothing is downloaded here. Download it first, e.g. '
                        f'`huggingface-cli download {spec} --local-dir DIR`, and pass DIR')
    raise ConfigError(f'{where}: no such directory')
  path = paths.resolve(spec)
  if not paths.isfile(paths.join(path, CONFIG_FILE)):
    raise ConfigError(f'{where}: no {CONFIG_FILE} in {path} (a Hugging Face checkpoint '
                      'directory as save_pretrained writes it)')
  return path


def read_config(directory: str) -> dict[str, Any]:
  file = paths.join(directory, CONFIG_FILE)
  try:
    return json.loads(paths.read_text(file))
  except ValueError as e:
    raise CheckpointError(f'{file} is not JSON ({e})') from e


def resolve_config(cfg: Config) -> Config:
  """`cfg` with model.* set from `model.init_from`'s config.json and the tokenizer set to
  its tokenizer.json (unchanged without init_from). Idempotent, so a resumed run's
  config compares equal.

  Raises:
    ConfigError / CheckpointError: a Hub name, a missing file, an unsupported
      architecture, an experiment value that contradicts config.json, or a tokenizer
      whose vocabulary does not fit config.json's vocab_size.
  """
  if not cfg.model.init_from:
    return cfg
  directory = checkpoint_dir(cfg.model.init_from)
  file = paths.join(directory, CONFIG_FILE)
  overrides = config_map.model_overrides(read_config(directory), file)
  default = ModelConfig()
  for key in _COMPARED:
    ours, theirs = getattr(cfg.model, key), overrides.get(f'model.{key}', getattr(default, key))
    if ours not in (getattr(default, key), theirs):
      raise ConfigError(f'config.model.{key}={ours!r} contradicts {file} ({theirs!r}); '
                        'leave it unset: model.init_from takes the architecture from there')
  tok_file = paths.join(directory, hf_tokenizer.FILE)
  if not paths.isfile(tok_file):
    raise CheckpointError(f'{directory} has no {hf_tokenizer.FILE}; the checkpoint\'s '
                          'tokenizer is loaded from the same directory')
  tok = hf_tokenizer.HFTokenizer.load(tok_file, cfg.tokenizer.bos_token,
                                      cfg.tokenizer.eos_token, cfg.tokenizer.pad_token)
  if tok.vocab_size > overrides['model.vocab_size']:
    raise CheckpointError(f'{tok_file} has {tok.vocab_size} tokens (largest id + 1) but '
                          f'{file} "vocab_size" is {overrides["model.vocab_size"]}: its ids '
                          'past the embedding table have no row; not this model\'s tokenizer')
  return config_lib.replace(cfg, **overrides, **{
      'tokenizer.kind': hf_tokenizer.KIND_NAME, 'tokenizer.model_file': tok_file,
      'tokenizer.vocab_size': tok.vocab_size})


def open_tensors(directory: str) -> TensorFiles:
  """All tensors of the checkpoint (headers only): one file, or the index's shards."""
  index_file = paths.join(directory, INDEX_FILE)
  if paths.isfile(index_file):
    try:
      weight_map = json.loads(paths.read_text(index_file))['weight_map']
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'{index_file}: no "weight_map" ({e!r})') from e
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_file = paths.join(directory, shard)
      if not paths.isfile(shard_file):
        raise CheckpointError(f'{index_file} "weight_map" names {shard}, which is missing '
                              f'from {directory}')
      tensors.update(read_header(shard_file))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise CheckpointError(f'{index_file} "weight_map" lists {missing[:3]} but their shards '
                            'do not hold them')
    return TensorFiles(tensors)
  single = paths.join(directory, SINGLE_FILE)
  if not paths.isfile(single):
    raise CheckpointError(f'{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}')
  return TensorFiles(read_header(single))


# (checkpoint tensor name, its array -> our layout for one layer).
Source = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _sources(m: ModelConfig) -> tuple[dict[str, Source], dict[str, Source]]:
  """Per-layer sources of our block params ('{l}' = the layer) and the other params."""
  d, h, k, e = m.d_model, m.num_heads, m.kv_heads, m.head_size
  same = lambda w: w
  if m.family == 'gpt2':
    qkv = lambda i: lambda w: w[:, i * d:(i + 1) * d].reshape(d, h, e)
    b_qkv = lambda i: lambda b: b[i * d:(i + 1) * d].reshape(h, e)
    p = 'transformer.h.{l}.'
    layer = {'wq': (p + 'attn.c_attn.weight', qkv(0)), 'wk': (p + 'attn.c_attn.weight', qkv(1)),
             'wv': (p + 'attn.c_attn.weight', qkv(2)), 'bq': (p + 'attn.c_attn.bias', b_qkv(0)),
             'bk': (p + 'attn.c_attn.bias', b_qkv(1)), 'bv': (p + 'attn.c_attn.bias', b_qkv(2)),
             'wo': (p + 'attn.c_proj.weight', lambda w: w.reshape(h, e, d)),
             'bo': (p + 'attn.c_proj.bias', same), 'w_in': (p + 'mlp.c_fc.weight', same),
             'b_in': (p + 'mlp.c_fc.bias', same), 'w_out': (p + 'mlp.c_proj.weight', same),
             'b_out': (p + 'mlp.c_proj.bias', same)}
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      layer.update({f'{ours}_scale': (p + theirs + '.weight', same),
                    f'{ours}_bias': (p + theirs + '.bias', same)})
    top = {'token_embed.table': ('transformer.wte.weight', same),
           'pos_table': ('transformer.wpe.weight', same),
           'final_norm.scale': ('transformer.ln_f.weight', same),
           'final_norm.bias': ('transformer.ln_f.bias', same)}
  else:
    heads = lambda n: lambda w: w.T.reshape(d, n, e)  # nn.Linear [n e, d] -> [d, n, e]
    p = 'model.layers.{l}.'
    layer = {'wq': (p + 'self_attn.q_proj.weight', heads(h)),
             'wk': (p + 'self_attn.k_proj.weight', heads(k)),
             'wv': (p + 'self_attn.v_proj.weight', heads(k)),
             'wo': (p + 'self_attn.o_proj.weight', lambda w: w.T.reshape(h, e, d)),
             'bq': (p + 'self_attn.q_proj.bias', lambda b: b.reshape(h, e)),
             'bk': (p + 'self_attn.k_proj.bias', lambda b: b.reshape(k, e)),
             'bv': (p + 'self_attn.v_proj.bias', lambda b: b.reshape(k, e)),
             'w_gate': (p + 'mlp.gate_proj.weight', np.transpose),
             'w_in': (p + 'mlp.up_proj.weight', np.transpose),
             'w_out': (p + 'mlp.down_proj.weight', np.transpose)}
    post = m.norm_position == 'post'
    layer['attn_norm_scale'] = (p + ('post_attention_layernorm' if post else
                                     'input_layernorm') + '.weight', same)
    layer['mlp_norm_scale'] = (p + ('post_feedforward_layernorm' if post else
                                    'post_attention_layernorm') + '.weight', same)
    for w, n in (('q', h), ('k', k)):
      full = lambda s, n=n: s.reshape(n, e)  # OLMo-2's norm over all heads' channels.
      layer[f'{w}_norm_scale'] = (p + f'self_attn.{w}_norm.weight',
                                  full if m.qk_norm == 'full' else same)
    top = {'token_embed.table': ('model.embed_tokens.weight', same),
           'final_norm.scale': ('model.norm.weight', same)}
  top['head'] = ('lm_head.weight', np.transpose)  # [V, D] -> [D, V]
  return layer, top


def _param_name(path) -> str:
  """'backbone.blocks.wq' from a params tree path (nnx State keys, `.value` dropped)."""
  parts = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
  return '.'.join(x for x in parts if x != 'value')


def load_params(model_cfg: ModelConfig, params: Any) -> Any:
  """`params` (a train state's, initialised and sharded) with the backbone's replaced by
  `model_cfg.init_from`'s tensors, each built on its own sharding from the slices its
  devices hold. Parameters outside the backbone (A_f, the f-gram side) keep their init.

  Raises:
    CheckpointError: a missing tensor, a shape that does not match the config, a lossy
      dtype, or checkpoint tensors this architecture has no place for (names each).
  """
  directory = checkpoint_dir(model_cfg.init_from)
  files = open_tensors(directory)
  layer_src, top_src = _sources(model_cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  used: set[str] = set()
  plan = []  # Every tensor is checked (headers only) before any is read.
  for path, leaf in leaves:
    name = _param_name(path)
    if not name.startswith('backbone.'):
      plan.append((leaf, None, False))
      continue
    short = name[len('backbone.'):]
    if short.startswith('blocks.'):
      src = layer_src.get(short[len('blocks.'):])
      tensors = ([src[0].format(l=l) for l in range(model_cfg.num_layers)]
                 if src else [])
    else:
      src = top_src.get(short)
      tensors = [src[0]] if src else []
    if src is None:
      raise CheckpointError(f'{directory}: no checkpoint tensor maps to our parameter {name} '
                            f'(family {model_cfg.family!r})')
    views = [_view(files, t, src[1], leaf, stacked=short.startswith('blocks.'))
             for t in tensors]
    used.update(tensors)
    plan.append((leaf, views, short.startswith('blocks.')))
  unused = sorted(n for n in set(files.tensors) - used if not _IGNORED.search(n) and
                  not (n == 'lm_head.weight' and model_cfg.tied_embeddings))
  if unused:
    raise CheckpointError(f'{directory}: tensors {unused[:4]} ({len(unused)} in all) have no '
                          f'place in a {model_cfg.family} model with this config.json; the '
                          'architecture uses a feature we do not map')
  return jax.tree_util.tree_unflatten(
      treedef, [leaf if views is None else _sharded(views, leaf, stacked)
                for leaf, views, stacked in plan])


def _view(files: TensorFiles, tensor: str, layout, leaf,
          stacked: bool) -> Callable[[], np.ndarray]:
  """A thunk of `tensor` in our layout (a view of the memory map, or the tensor's bytes
  read from gs://), its shape and dtype checked against `leaf` from the header alone."""
  info = files.tensors.get(tensor)
  if info is None:
    raise CheckpointError(f'the checkpoint has no tensor {tensor} (our '
                          f'{leaf.shape} parameter needs it); a missing or partial shard?')
  want = tuple(leaf.shape[1:] if stacked else leaf.shape)
  # The layout applied to a stand-in of the header's shape (zero strides: no memory).
  stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, info.dtype), info.shape,
                                             (0,) * len(info.shape))
  try:
    shape = layout(stand_in).shape
  except ValueError:
    shape = None
  if shape != want:
    raise CheckpointError(f'{info.file}: tensor {tensor} has shape {list(info.shape)}, which '
                          f'does not give our {list(want)} for config.json\'s sizes')
  have, need = info.dtype.name, np.dtype(leaf.dtype).name
  if have != need and (have, need) not in _WIDENS:
    raise CheckpointError(f'{info.file}: tensor {tensor} is {have}; model.param_dtype='
                          f'{need!r} would round it: set config.model.param_dtype to '
                          f'{have!r} (or float32)')
  return lambda: layout(files.array(tensor))


def _sharded(views: list[Callable[[], np.ndarray]], leaf, stacked: bool) -> jax.Array:
  """One jax.Array on leaf's sharding; each device's callback reads only its slice."""
  dtype = np.dtype(leaf.dtype)

  def read(index):
    if not stacked:
      return np.array(views[0]()[index], dtype=dtype)
    return np.stack([np.array(views[l]()[index[1:]], dtype=dtype)
                     for l in range(len(views))[index[0]]])
  return jax.make_array_from_callback(leaf.shape, leaf.sharding, read)
