"""The parameters a NEW run starts from: another run's weights (`train.init_from_run`) and
A_f from a pretrained backbone (`fgram_model.init_from`); docs/METHOD.md, "Post-training".

* `train.init_from_run=OLD_W`: every parameter of the run in OLD_W, shapes equal. When
  OLD_W is a baseline and this run has an f-gram side, that is SCONE ATTACHED to a trained
  backbone: the backbone's parameters come from OLD_W and the f-gram side keeps its init
  (with `fgram_model.zero_init_out` and combine='add', step 0 computes OLD_W's model
  exactly; `attach_is_exact` says when it does and a warning names the fix when not).
  A Hugging Face backbone is attached the same way through `model.init_from` (hf/load.py).
* `fgram_model.init_from=SRC` (or its older name `init_from_run`): A_f's token table,
  positions (the first K rows of a learned table; RoPE blocks where SRC uses RoPE), first
  `fgram_model.num_layers` blocks and final norm from SRC's backbone. SRC is one of our
  run directories or a Hugging Face checkpoint directory (config.json + safetensors, read
  through hf/config_map and hf/load: only the layers A_f takes). Its architecture must be
  A_f's (`fgram_model.arch`: family, width, heads, K/V heads, head width, MLP, norms,
  positions): `check_source` names each key that differs and the value that fits, before
  the run writes anything. `source_backbone` is the one reader of a source.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
from absl import logging
from flax import nnx

from scone_jax import compat, paths
from scone_jax import run as run_lib
from scone_jax.config import Config, ConfigError, FgramModelConfig, ModelConfig
from scone_jax.hf import config_map
from scone_jax.hf import load as hf_load
from scone_jax.model import SconeLM, model_shardings
from scone_jax.tokenizer import hf as hf_tokenizer
from scone_jax.train import step as step_lib

# The parameters of the f-gram side (everything but `backbone`).
_FGRAM_SIDE = ("['fgram_model']", "['combine_gate']", "['hashed']")
_BACKBONE = "['backbone']"
# What A_f's blocks compute, as (its name in a ModelConfig, the key that sets it on A_f):
# A_f's own shape is fgram_model.*, the rest its blocks share with the backbone (model.*).
_ARCH_KEYS = (('d_model', 'fgram_model.d_model'), ('num_heads', 'fgram_model.num_heads'),
              ('kv_heads', 'fgram_model.num_kv_heads'), ('head_size', 'fgram_model.head_dim'),
              ('mlp_dim', 'fgram_model.mlp_dim'), ('family', 'model.family'),
              ('mlp_activation', 'model.mlp_activation'), ('bias', 'model.bias'),
              ('norm', 'model.norm'), ('norm_eps', 'model.norm_eps'),
              ('norm_position', 'model.norm_position'), ('qk_norm', 'model.qk_norm'),
              ('clip_qkv', 'model.clip_qkv'), ('position', 'model.position'))
_LABELS = {'kv_heads': 'K/V head count', 'head_size': 'head width'}  # (Not config keys.)
# Compared only where A_f uses RoPE.
_ROPE_KEYS = ('rope_theta', 'rope_scaling', 'rope_factor', 'rope_low_freq_factor',
              'rope_high_freq_factor', 'rope_original_max_len')


def init_params(cfg: Config, workdir: str, state: step_lib.TrainState,
                mesh: jax.sharding.Mesh, tokenizer_fingerprint: str) -> step_lib.TrainState:
  """`state` with its params replaced per train.init_from_run / fgram_model.init_from
  (either may be ''); optimizer state, step and data order stay fresh."""
  return dataclasses.replace(state, params=start_params(cfg, workdir, state.params, mesh,
                                                        tokenizer_fingerprint))


def start_params(cfg: Config, workdir: str, params: Any, mesh: jax.sharding.Mesh,
                 tokenizer_fingerprint: str) -> Any:
  """A SconeLM's params tree (nnx.State of nnx.Param, sharded) as `init_params` fills it."""
  if not cfg.train.init_from_run and not cfg.fgram_model.source:
    return params
  want, treedef = jax.tree_util.tree_flatten_with_path(params)
  current = {jax.tree_util.keystr(k): v for k, v in want}
  update = {}
  if cfg.train.init_from_run:
    update.update(_run_params(cfg, cfg.train.init_from_run, workdir, current, mesh,
                              tokenizer_fingerprint))
  if cfg.fgram_model.source:
    update.update(_fgram_params(cfg, current, mesh, tokenizer_fingerprint))
  return jax.tree_util.tree_unflatten(treedef, [
      jax.device_put(update[jax.tree_util.keystr(k)], leaf.sharding)
      if jax.tree_util.keystr(k) in update else leaf for k, leaf in want])


def source_backbone(source: str, mesh: jax.sharding.Mesh, num_layers: int = 0,
                    param_dtype: str = 'float32'
                    ) -> tuple[ModelConfig, dict[str, jax.Array], str]:
  """A pretrained backbone: (its ModelConfig, its params keyed like SconeLM's `backbone`
  ("['backbone']['blocks']['wq']", ...), its tokenizer fingerprint).

  `source` is one of our run directories (its latest checkpoint) or a Hugging Face
  checkpoint directory (`hf_load.is_checkpoint`). From a checkpoint only the first
  `num_layers` blocks (0 = all) and no output head are read, each tensor straight into its
  sharded array as `param_dtype` (hf/load.py), and the fingerprint is its tokenizer.json's
  ('' without one).
  """
  if hf_load.is_checkpoint(source):
    model = _source_model(source)
    # The blocks A_f takes, tied (so no head [D, V] is built or read).
    read = dataclasses.replace(model, init_from=source, tied_embeddings=True,
                               num_layers=num_layers or model.num_layers,
                               param_dtype=param_dtype)
    vocab = int(hf_load.read_config(source)['vocab_size'])
    with compat.set_mesh(mesh):
      abstract = nnx.state(nnx.eval_shape(
          lambda: SconeLM(read, FgramModelConfig(), 2, vocab, nnx.Rngs(0))), nnx.Param)
      targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract, model_shardings(abstract, mesh))
    got = jax.tree_util.tree_flatten_with_path(hf_load.load_params(read, targets,
                                                                    partial=True))[0]
    tok_file = paths.join(source, hf_tokenizer.FILE)
    fingerprint = (hashlib.sha256(paths.read_bytes(tok_file)).hexdigest()
                   if paths.isfile(tok_file) else '')
    logging.info('init_from: %d layers of the Hugging Face checkpoint %s', read.num_layers,
                 source)
  else:
    source_dir = run_lib.RunDir(source)
    source_cfg = source_dir.config()
    lm, step = source_dir.restore_model(source_cfg, mesh)
    got = jax.tree_util.tree_flatten_with_path(nnx.state(lm, nnx.Param))[0]
    model, fingerprint = source_cfg.model, source_dir.info()['tokenizer']['fingerprint']
    logging.info('init_from: the backbone of %s at step %d', source, step)
  return (model, {jax.tree_util.keystr(k): v for k, v in got
                  if jax.tree_util.keystr(k).startswith(_BACKBONE)}, fingerprint)


def _source_model(source: str) -> ModelConfig:
  """The architecture of a source backbone, from its config.json alone."""
  if hf_load.is_checkpoint(source):
    return config_map.model_config(hf_load.read_config(source),
                                   paths.join(source, hf_load.CONFIG_FILE))
  return run_lib.RunDir(source).config().model


def check_source(cfg: Config) -> None:
  """fgram_model.init_from's backbone against A_f (`fgram_model.arch`), from config files
  only: train calls it before writing anything.

  Raises:
    ConfigError: A_f shares the backbone's width (no model of its own), any architecture
      key differs (each named with the value that fits), or the source has fewer layers
      than fgram_model.num_layers.
  """
  fm = cfg.fgram_model
  if not fm.source:
    return
  where = _where(fm)
  if not paths.isdir(fm.source):
    raise ConfigError(f'{where}: no such directory (one of our run directories, or a '
                      'Hugging Face checkpoint directory with config.json and safetensors)')
  af = fm.arch(cfg.model)
  model = _source_model(fm.source)
  if af is cfg.model:
    shape = ' '.join(f'config.{mine}={_arch_value(model, name)!r}'
                     for name, mine in _ARCH_KEYS[:5])
    raise ConfigError(f'{where} gives A_f a pretrained model of its own: set its shape, '
                      f'{shape}')
  keys = _ARCH_KEYS + (tuple((k, 'model.' + k) for k in _ROPE_KEYS)
                       if af.position == 'rope' else ())
  differ = [(name, mine) for name, mine in keys if _arch_value(model, name) !=
            _arch_value(af, name)]
  if differ:
    raise ConfigError(f'{where}: A_f\'s architecture differs from this source\'s: ' + '; '.join(
        f'its {_LABELS.get(name, "model." + name)} is {_arch_value(model, name)!r}, A_f\'s '
        f'is {_arch_value(af, name)!r}: set config.{mine}={_arch_value(model, name)!r}'
        for name, mine in differ) + ' (model.* keys are the backbone\'s, which A_f shares)')
  if model.num_layers < fm.num_layers:
    raise ConfigError(f'{where} has {model.num_layers} layers; A_f takes its first '
                      f'fgram_model.num_layers={fm.num_layers}: set it <= {model.num_layers}')


def _where(fm: FgramModelConfig) -> str:
  return f"config.fgram_model.{'init_from' if fm.init_from else 'init_from_run'}={fm.source}"


def _arch_value(m: ModelConfig, name: str) -> Any:
  return config_map.norm_eps(m) if name == 'norm_eps' else getattr(m, name)


def _run_params(cfg: Config, source: str, workdir: str, current: dict[str, jax.Array],
                mesh: jax.sharding.Mesh, tokenizer_fingerprint: str) -> dict[str, jax.Array]:
  """train.init_from_run: the source run's params, by name; a baseline's backbone alone
  when this run adds an f-gram side (attach)."""
  source_dir = run_lib.RunDir(source)
  if source_dir.path == workdir:
    raise ConfigError(f'config.train.init_from_run={source} is this run\'s own workdir; '
                      'it names ANOTHER run whose weights start this new one')
  source_cfg = source_dir.config()
  attach = not source_cfg.has_fgram_side and cfg.has_fgram_side
  if attach:
    _, got, source_tok = source_backbone(source, mesh)
    if not attach_is_exact(cfg.fgram_model, cfg.fgram_model.source):
      logging.warning(
          'init_from_run: attaching this f-gram side to the trained backbone of %s does '
          'NOT start at that model (fgram_model.combine=%r, zero_init_out=%s, init=%r): '
          "for an exact step 0 set fgram_model.combine='add' and zero_init_out=True",
          source, cfg.fgram_model.combine, cfg.fgram_model.zero_init_out,
          cfg.fgram_model.init)
    wanted = {k: v for k, v in current.items() if not k.startswith(_FGRAM_SIDE)}
  else:
    lm, step = source_dir.restore_model(source_cfg, mesh)
    got = {jax.tree_util.keystr(k): v for k, v in
           jax.tree_util.tree_flatten_with_path(nnx.state(lm, nnx.Param))[0]}
    source_tok = source_dir.info()['tokenizer']['fingerprint']
    logging.info('init_from_run: params of %s at step %d', source, step)
    wanted = current
  _check_same(f'config.train.init_from_run={source}', got, wanted,
              'the model config (model.*, fgram_model.*, fgram.max_len, the vocab size, the '
              'table rows) must match the source run\'s')
  if source_tok != tokenizer_fingerprint:
    logging.warning('init_from_run: %s was trained with another tokenizer (%s, now %s): its '
                    'embedding rows belong to other token ids', source, source_tok[:16],
                    tokenizer_fingerprint[:16])
  return {k: got[k] for k in wanted}


def attach_is_exact(fm: FgramModelConfig, fgram_source: str = '') -> bool:
  """Whether a SCONE run attached to a trained backbone starts at that backbone's function:
  A_f's output 0 under combine='add' (zero_init_out), or A_f = T(x_i) exactly (shared width,
  init='identity', no norm or RMS rescaling, no pretrained A_f) under replace / gate."""
  if fm.kind != 'network':
    return False
  if fm.zero_init_out:
    return True  # config.validate requires combine='add' with it.
  return (fm.combine != 'add' and not fm.projects and fm.init == 'identity' and
          not fgram_source and fm.final_norm == 'none' and fm.output_scale != 'rmsnorm_gain')


def _fgram_params(cfg: Config, current: dict[str, jax.Array], mesh: jax.sharding.Mesh,
                  tokenizer_fingerprint: str) -> dict[str, jax.Array]:
  """fgram_model.init_from: A_f's parameters from the source's backbone."""
  fm, source = cfg.fgram_model, cfg.fgram_model.source
  where = _where(fm)
  check_source(cfg)
  _, got, source_tok = source_backbone(source, mesh, fm.num_layers, cfg.model.param_dtype)
  # A_f's parameter prefix -> (the source backbone's, rows of its leading axis taken).
  prefixes = {"['fgram_model']['token_embed']": ("['backbone']['token_embed']", None),
              "['fgram_model']['pos_table']": ("['backbone']['pos_table']", cfg.fgram.max_len),
              "['fgram_model']['blocks']": ("['backbone']['blocks']", fm.num_layers),
              "['fgram_model']['final_norm']": ("['backbone']['final_norm']", None)}
  mapping = {name: (src + name[len(prefix):], rows)
             for prefix, (src, rows) in prefixes.items()
             for name in current if name.startswith(prefix)}
  out = {}
  for name, (src, rows) in mapping.items():
    if src not in got:
      raise ConfigError(f'{where}: its backbone has no parameter {src} for A_f\'s {name}')
    value = got[src] if rows is None else got[src][:rows]
    if value.shape != current[name].shape:
      raise ConfigError(f'{where}: its {src} gives {value.shape} for A_f\'s {name}, which is '
                        f'{current[name].shape}; the vocab and fgram.max_len must fit')
    out[name] = value.astype(current[name].dtype)
  if source_tok != tokenizer_fingerprint:
    logging.warning('fgram_model.init_from: %s has another tokenizer (%s, this run %s): A_f\'s '
                    'token rows belong to its token ids', source, source_tok[:16] or 'none',
                    tokenizer_fingerprint[:16])
  logging.info('fgram_model.init_from: A_f (%d parameters) from the backbone of %s',
               len(out), source)
  return out


def _check_same(where: str, got: dict[str, jax.Array], wanted: dict[str, jax.Array],
                fix: str) -> None:
  """Every wanted parameter is in `got` with its shape and dtype; ConfigError naming the
  first that is not."""
  for name, leaf in wanted.items():
    have = got.get(name)
    have = 'no such parameter' if have is None else (have.shape, have.dtype)
    if have != (leaf.shape, leaf.dtype):
      raise ConfigError(f'{where}: its parameter {name} is {have}, this run needs '
                        f'{(leaf.shape, leaf.dtype)}; {fix}')
  if len(got) != len(wanted):
    raise ConfigError(f'{where}: it has {len(got)} parameters, this run {len(wanted)}; the '
                      'model configs differ')
