"""The parameters a NEW run starts from: another run's weights (`train.init_from_run`) and
A_f from a pretrained backbone (`fgram_model.init_from_run`); docs/METHOD.md, "Post-training".

* `train.init_from_run=OLD_W`: every parameter of the run in OLD_W, shapes equal. When
  OLD_W is a baseline and this run has an f-gram side, that is SCONE ATTACHED to a trained
  backbone: the backbone's parameters come from OLD_W and the f-gram side keeps its init
  (with `fgram_model.zero_init_out` and combine='add', step 0 computes OLD_W's model
  exactly; `attach_is_exact` says when it does and a warning names the fix when not).
* `fgram_model.init_from_run=SRC`: A_f's token table, positions (the first K rows of a
  learned table), first `fgram_model.num_layers` blocks and final norm from SRC's
  backbone, whose architecture must be A_f's (`fgram_model.arch`: d_model, heads, MLP).
  `source_backbone` is the one reader of a source: the Hugging Face importer plugs in
  there (a directory with config.json + safetensors instead of a run directory).
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
from flax import nnx

from scone_jax import run as run_lib
from scone_jax.config import Config, ConfigError, FgramModelConfig, ModelConfig
from scone_jax.train import step as step_lib

# The parameters of the f-gram side (everything but `backbone`).
_FGRAM_SIDE = ("['fgram_model']", "['combine_gate']", "['hashed']")
_BACKBONE = "['backbone']"
# Architecture keys of a source backbone that A_f's blocks must share with it.
_ARCH_KEYS = ('family', 'd_model', 'num_heads', 'mlp_dim', 'mlp_activation', 'norm',
              'position')


def init_params(cfg: Config, workdir: str, state: step_lib.TrainState,
                mesh: jax.sharding.Mesh, tokenizer_fingerprint: str) -> step_lib.TrainState:
  """`state` with its params replaced per train.init_from_run / fgram_model.init_from_run
  (either may be ''); optimizer state, step and data order stay fresh."""
  if not cfg.train.init_from_run and not cfg.fgram_model.init_from_run:
    return state
  want, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  current = {jax.tree_util.keystr(k): v for k, v in want}
  params = dict(current)
  if cfg.train.init_from_run:
    params.update(_run_params(cfg, cfg.train.init_from_run, workdir, current, mesh,
                              tokenizer_fingerprint))
  if cfg.fgram_model.init_from_run:
    params.update(_fgram_params(cfg, cfg.fgram_model.init_from_run, current, mesh))
  leaves = [jax.device_put(params[jax.tree_util.keystr(k)], leaf.sharding) for k, leaf in want]
  return dataclasses.replace(state, params=jax.tree_util.tree_unflatten(treedef, leaves))


def source_backbone(source: str, mesh: jax.sharding.Mesh
                    ) -> tuple[ModelConfig, dict[str, jax.Array], str]:
  """A pretrained backbone: (its ModelConfig, its params keyed like SconeLM's `backbone`
  ("['backbone']['blocks']['wq']", ...), its tokenizer fingerprint).

  Today `source` is one of our run directories (its latest checkpoint). This is the hook
  for a Hugging Face checkpoint directory (config.json + safetensors): map its config to a
  ModelConfig and its tensors to these names, and both init_from paths take it unchanged.
  """
  source_dir = run_lib.RunDir(source)
  source_cfg = source_dir.config()
  lm, step = source_dir.restore_model(source_cfg, mesh)
  got = jax.tree_util.tree_flatten_with_path(nnx.state(lm, nnx.Param))[0]
  logging.info('init_from: the backbone of %s at step %d', source, step)
  return (source_cfg.model,
          {jax.tree_util.keystr(k): v for k, v in got
           if jax.tree_util.keystr(k).startswith(_BACKBONE)},
          source_dir.info()['tokenizer']['fingerprint'])


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
    if not attach_is_exact(cfg.fgram_model, cfg.fgram_model.init_from_run):
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


def _fgram_params(cfg: Config, source: str, current: dict[str, jax.Array],
                  mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """fgram_model.init_from_run: A_f's parameters from the source's backbone."""
  where = f'config.fgram_model.init_from_run={source}'
  af = cfg.fgram_model.arch(cfg.model)
  if af is cfg.model:
    raise ConfigError(f'{where} gives A_f a pretrained model of its own: set '
                      'config.fgram_model.d_model (and num_heads, mlp_dim) to its shape')
  model, got, _ = source_backbone(source, mesh)
  for key in _ARCH_KEYS:
    if getattr(model, key) != getattr(af, key):
      mine = f'fgram_model.{key}' if key in ('d_model', 'num_heads', 'mlp_dim') else f'model.{key}'
      raise ConfigError(f'{where}: its model.{key} is {getattr(model, key)!r}, A_f\'s is '
                        f'{getattr(af, key)!r}; set config.{mine}={getattr(model, key)!r}')
  if model.num_layers < cfg.fgram_model.num_layers:
    raise ConfigError(f'{where} has {model.num_layers} layers; A_f takes its first '
                      f'fgram_model.num_layers={cfg.fgram_model.num_layers}: set it <= '
                      f'{model.num_layers}')
  # A_f's parameter prefix -> (the source backbone's, rows of its leading axis taken).
  prefixes = {"['fgram_model']['token_embed']": ("['backbone']['token_embed']", None),
              "['fgram_model']['pos_table']": ("['backbone']['pos_table']", cfg.fgram.max_len),
              "['fgram_model']['blocks']": ("['backbone']['blocks']",
                                           cfg.fgram_model.num_layers),
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
  logging.info('fgram_model.init_from_run: A_f (%d parameters) from the backbone of %s',
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
