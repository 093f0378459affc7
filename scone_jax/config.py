"""The one config system: frozen dataclasses are the schema, ConfigDict is the CLI surface.

Experiment files under `experiments/` start from `base_config()` (a ConfigDict built from
these dataclasses' defaults, so the two can never drift), override what they need, and are
loaded with `config_flags.DEFINE_config_file(..., lock_config=True)` so a typo in
`--config.model.num_layers=4` fails before anything runs. `from_configdict` is the single
boundary where a ConfigDict becomes a validated, frozen `Config`; code below the entry
points only ever sees the dataclasses (layers never import ml_collections).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

import ml_collections


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # 'embedded' builds the default corpus from Python's stdlib docstrings (no network);
  # 'files' reads `train_files` / `eval_files`.
  source: Literal['embedded', 'files'] = 'embedded'
  # Comma-separated globs. eval_files entries may be named: "wiki=/d/wiki*.txt,code=/d/c*.jsonl".
  train_files: str = ''
  eval_files: str = ''
  # 'lines': one document per line; 'blank_lines': documents separated by blank lines;
  # 'jsonl': one JSON object per line, text under `text_field`.
  format: Literal['lines', 'blank_lines', 'jsonl'] = 'lines'
  text_field: str = 'text'
  # Invalid UTF-8: 'replace' with U+FFFD (counted and reported) or 'error' (names file+line).
  on_bad_utf8: Literal['replace', 'error'] = 'replace'
  # Embedded corpus: fraction of stdlib modules held out for evaluation (split by module).
  embedded_eval_fraction: float = 0.05
  # Where prepared artifacts (tokenizer, token shards, f-gram table) live; '' means
  # <workdir>/prepare. Sweep points point this at one shared directory: stages are keyed
  # by their inputs' fingerprints, so points with the same data prepare once.
  artifacts_dir: str = ''


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  vocab_size: int = 8000
  model_type: Literal['bpe', 'unigram'] = 'bpe'
  # Path of an existing sentencepiece .model; empty means train one on the train corpus.
  model_file: str = ''
  # Longest document (bytes) fed to sentencepiece training; longer ones are split on
  # whitespace near this length (sentencepiece would silently drop them otherwise).
  max_sentence_length: int = 65536
  # At most this many characters of the train corpus are sampled to train the tokenizer.
  train_chars: int = 50_000_000
  # Documents longer than max_sentence_length bytes when training the tokenizer:
  # 'split' them at whitespace (counted and logged with file:line) or raise an 'error'.
  long_docs: Literal['split', 'error'] = 'split'
  # Token shard dtype is derived from vocab_size (uint16 below 2**16, else uint32).


@dataclasses.dataclass(frozen=True)
class FgramConfig:
  max_len: int = 5  # K: f-grams have 2..K tokens.
  size: int = 100_000  # S: number of f-grams kept (the largest of a sweep; slice for less).
  min_count: int = 5
  memory_budget_mb: int = 1024  # Counting spills sorted runs to disk beyond this.
  # 'local' (numpy, out of core) or 'beam' (Apache Beam; same table, exactly).
  miner: Literal['local', 'beam'] = 'local'
  # Use only the first `use_size` rows of the mined table (0 = all): sweeps over S mine
  # once at the largest size and slice.
  use_size: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: Literal['gpt2', 'olmo'] = 'gpt2'
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  # 0 means 4 * d_model (GPT-2 / the paper's OLMo param counts use a plain 4d MLP).
  mlp_dim: int = 0
  # 'gelu' (GPT-2), 'swiglu' (OLMo default), 'relu'. Empty = the family's default.
  mlp_activation: str = ''
  # 'layernorm' (GPT-2), 'rmsnorm', 'nonparametric' (OLMo-1). Empty = family default.
  norm: str = ''
  # 'learned' (GPT-2) or 'rope' (OLMo). Empty = family default.
  position: str = ''
  tied_embeddings: bool = True
  max_seq_len: int = 256  # Size of the learned position table / RoPE cache.
  vocab_size: int = 0  # 0 = take it from the tokenizer.
  dtype: Literal['float32', 'bfloat16'] = 'float32'  # Compute dtype.
  param_dtype: Literal['float32', 'bfloat16'] = 'float32'
  rope_theta: float = 10000.0
  init_std: float = 0.02
  # Activation memory: 'none' keeps every block's activations for the backward pass;
  # 'block' recomputes each block in the backward (jax.checkpoint), for large models.
  remat: Literal['none', 'block'] = 'none'
  # Backbone training/eval attention: 'einsum' (XLA, any backend) or 'cudnn' (fused flash
  # attention through jax.nn.dot_product_attention; NVIDIA GPUs, bfloat16 compute only).
  attention: Literal['einsum', 'cudnn'] = 'einsum'
  # 'scan' compiles one block for all layers; 'unrolled' compiles each layer (slower to
  # compile) and is what XLA's cost analysis needs to count every layer (it counts a scan
  # body once).
  layer_loop: Literal['scan', 'unrolled'] = 'scan'


@dataclasses.dataclass(frozen=True)
class FgramModelConfig:
  # Depth of A_f. 0 means no SCONE: the plain backbone baseline.
  num_layers: int = 0
  # A_f runs once per DISTINCT f-gram of a (per-process) batch, the f-grams packed into
  # rows of 2 * fgram.max_len tokens; the row count is padded to a bucket of a geometric
  # ladder (batches/tagging.py). capacity = the smallest bucket in rows (0 = 8): set it to
  # a high quantile of the logged batch/fgram_rows to keep one compiled shape. A batch
  # needing more rows gets the next bucket (ratio bucket_growth), compiled on first use and
  # counted (batch/fgram_above_capacity, train/compiled_steps): never a fallback to token
  # embeddings, so training, eval and serving use the same embedding at every position.
  capacity: int = 0
  bucket_growth: float = 1.2
  # Final norm on A_f's output at the f-gram's last token: 'none' = A_f's raw residual
  # stream, 'same' = the backbone's norm type. Default 'none': the output REPLACES a token
  # embedding in the backbone's residual stream, and the raw stream starts at that scale
  # (T(x_i) + position + block updates), whereas a norm's unit-variance output is ~50x
  # the token embeddings (init std 0.02) and drowns the backbone's own updates at matched
  # positions. Measured on the demo preset (S=4096, 300 steps): ppl 265 ('none') vs 291.
  final_norm: Literal['same', 'none'] = 'none'
  # 'identity': A_f's residual-branch output projections (wo, w_out) and its position
  # table start at zero, so at step 0 A_f(x_j..x_i) = T(x_i) exactly and SCONE computes the
  # baseline's function; training then learns what the f-gram adds. 'random': the
  # backbone's init (random blocks add noise comparable to the 0.02-scale token signal at
  # every matched position, which the CPU-tiny preset showed as a higher loss than the
  # baseline after 300 steps).
  init: Literal['identity', 'random'] = 'identity'


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  batch_size: int = 8  # Global batch (sequences).
  seq_len: int = 128
  learning_rate: float = 4e-4
  warmup_steps: int = 20
  lr_end_ratio: float = 0.1  # Cosine decays to this fraction of the peak.
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  grad_accum_steps: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end.
  eval_batches: int = 8
  shuffle_buffer_docs: int = 0  # 0 = global shuffle of documents per epoch.
  # Learning-rate multiplier for A_f's own parameters (not the shared token table), applied
  # to AdamW's updates (scaling gradients would cancel in Adam). 1 is the paper's joint
  # training; 0 freezes A_f's parameters (their gradients still count in the global-norm clip).
  fgram_model_lr_scale: float = 1.0
  # Batches built ahead by one background thread (0 = build in the training thread).
  data_prefetch: int = 2
  # Peak dense TFLOP/s of one device for MFU; 0 = look up jax's device_kind in
  # scone_jax/train/metrics.py:PEAK_FLOPS (MFU is not logged when unknown, e.g. CPU).
  peak_tflops: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1 = all devices not used by the other axes.
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  keep: int = 2
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  # 'none', 'auto' (TPU pods / SLURM auto-detect), or 'explicit' (the fields below).
  mode: Literal['none', 'auto', 'explicit'] = 'none'
  coordinator_address: str = ''
  num_processes: int = 1
  process_id: int = 0
  cpu_collectives: str = 'gloo'


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  dtype: Literal['bfloat16', 'float16', 'float32'] = 'bfloat16'
  batch_size: int = 4096  # f-grams per A_f batch.
  chunk_rows: int = 65536  # zarr3 shard rows; also the resume granularity.


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  store_tier: Literal['ram', 'disk'] = 'ram'
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = 'scone'
  data: DataConfig = DataConfig()
  tokenizer: TokenizerConfig = TokenizerConfig()
  fgram: FgramConfig = FgramConfig()
  model: ModelConfig = ModelConfig()
  fgram_model: FgramModelConfig = FgramModelConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  distributed: DistributedConfig = DistributedConfig()
  export: ExportConfig = ExportConfig()
  serve: ServeConfig = ServeConfig()

  @property
  def is_scone(self) -> bool:
    return self.fgram_model.num_layers > 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Family defaults, resolved once here so layers see concrete strings.
_FAMILY_DEFAULTS = {
    'gpt2': dict(mlp_activation='gelu', norm='layernorm', position='learned'),
    'olmo': dict(mlp_activation='swiglu', norm='nonparametric', position='rope'),
}
_CHOICES = {
    ('model', 'mlp_activation'): ('gelu', 'swiglu', 'relu'),
    ('model', 'norm'): ('layernorm', 'rmsnorm', 'nonparametric'),
    ('model', 'position'): ('learned', 'rope'),
}


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults, as an (unlocked) ConfigDict for experiment files."""
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def _build(cls, values: dict[str, Any], path: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f'unknown config key(s) {", ".join(f"{path}{k}" for k in unknown)}; '
        f'valid keys under "{path or "config."}": {", ".join(sorted(fields))}')
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    key = f'{path}{name}'
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, dict):
        raise ConfigError(f'config.{key} must be a section, got {value!r}')
      kwargs[name] = _build(hint, value, key + '.')
      continue
    if typing.get_origin(hint) is Literal:
      allowed = typing.get_args(hint)
      if value not in allowed:
        raise ConfigError(f'config.{key}={value!r} is not one of {list(allowed)}')
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif hint in (int, float, str, bool) and not isinstance(value, hint):
      raise ConfigError(f'config.{key}={value!r} must be of type {hint.__name__}')
    elif hint is int and isinstance(value, bool):
      raise ConfigError(f'config.{key}={value!r} must be an int, not a bool')
    kwargs[name] = value
  return cls(**kwargs)


def _positive(cfg: Config, key: str, minimum: int = 1):
  section, name = key.split('.')
  value = getattr(getattr(cfg, section), name)
  if value < minimum:
    raise ConfigError(f'config.{key}={value} must be >= {minimum}')


def validate(cfg: Config) -> Config:
  """Checks cross-field constraints; returns cfg with family defaults resolved."""
  model = cfg.model
  defaults = _FAMILY_DEFAULTS[model.family]
  model = dataclasses.replace(
      model, **{k: getattr(model, k) or v for k, v in defaults.items()},
      mlp_dim=model.mlp_dim or 4 * model.d_model)
  for (section, name), allowed in _CHOICES.items():
    if getattr(model, name) not in allowed:
      raise ConfigError(f'config.{section}.{name}={getattr(model, name)!r} is not one of '
                        f'{list(allowed)}')
  cfg = dataclasses.replace(cfg, model=model)
  if cfg.fgram.max_len < 2:
    raise ConfigError(f'config.fgram.max_len={cfg.fgram.max_len}: f-grams have at least 2 '
                      'tokens, so max_len (K) must be >= 2')
  _positive(cfg, 'fgram.size')
  _positive(cfg, 'fgram.min_count')
  _positive(cfg, 'fgram.memory_budget_mb', 16)
  if cfg.fgram.use_size < 0 or cfg.fgram.use_size > cfg.fgram.size:
    raise ConfigError(f'config.fgram.use_size={cfg.fgram.use_size} must be in [0, '
                      f'fgram.size={cfg.fgram.size}] (0 = the whole table)')
  _positive(cfg, 'tokenizer.vocab_size', 16)
  for key in ('model.num_layers', 'model.d_model', 'model.num_heads', 'train.steps',
              'train.batch_size', 'train.seq_len', 'train.grad_accum_steps',
              'model.max_seq_len'):
    _positive(cfg, key)
  if cfg.fgram_model.num_layers < 0:
    raise ConfigError('config.fgram_model.num_layers must be >= 0 (0 = baseline, no SCONE)')
  if cfg.fgram_model.capacity < 0 or cfg.fgram_model.bucket_growth <= 1.0:
    raise ConfigError(f'config.fgram_model.capacity={cfg.fgram_model.capacity} must be >= 0 '
                      f'and bucket_growth={cfg.fgram_model.bucket_growth} > 1 (e.g. 1.2)')
  if model.vocab_size and model.vocab_size < cfg.tokenizer.vocab_size:
    raise ConfigError(
        f'config.model.vocab_size={model.vocab_size} is smaller than the tokenizer\'s '
        f'config.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: token ids past the table '
        'would embed as garbage; set model.vocab_size >= tokenizer.vocab_size (or 0 = same)')
  if model.d_model % model.num_heads:
    raise ConfigError(f'config.model.d_model={model.d_model} is not divisible by '
                      f'config.model.num_heads={model.num_heads}')
  if cfg.train.seq_len > model.max_seq_len:
    raise ConfigError(
        f'config.train.seq_len={cfg.train.seq_len} is larger than the position table '
        f'config.model.max_seq_len={model.max_seq_len}; raise model.max_seq_len or lower '
        'train.seq_len')
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={cfg.train.batch_size} is not divisible by '
                      f'config.train.grad_accum_steps={cfg.train.grad_accum_steps}')
  if cfg.data.source == 'files' and not cfg.data.train_files and not cfg.tokenizer.model_file:
    raise ConfigError("config.data.source='files' needs config.data.train_files (comma-"
                      "separated globs), e.g. --config.data.train_files='/data/*.txt'")
  return cfg


def from_configdict(cd: ml_collections.ConfigDict | dict) -> Config:
  """The one boundary: ConfigDict (or plain dict) -> validated frozen Config."""
  values = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  return validate(_build(Config, values, ''))


def from_json(text: str) -> Config:
  return from_configdict(json.loads(text))


def _get_dotted(values: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split('.'):
    values = values[part]
  return values


def replace(cfg: Config, **overrides: Any) -> Config:
  """Dotted-key overrides on a Config, e.g. replace(cfg, **{'model.num_layers': 4})."""
  values = dataclasses.asdict(cfg)
  # `cfg` holds family defaults already resolved; re-derive them when what they derive
  # from changes (unless the override sets them too).
  derived = {'model.family': ('mlp_activation', 'norm', 'position'), 'model.d_model': ('mlp_dim',)}
  for key, names in derived.items():
    if key in overrides and overrides[key] != _get_dotted(values, key):
      for name in names:
        if f'model.{name}' not in overrides:
          values['model'][name] = type(values['model'][name])()
  for dotted, value in overrides.items():
    node = values
    *parents, leaf = dotted.split('.')
    for p in parents:
      if p not in node or not isinstance(node[p], dict):
        raise ConfigError(f'unknown config key {dotted}')
      node = node[p]
    if leaf not in node:
      raise ConfigError(f'unknown config key {dotted}')
    node[leaf] = value
  return from_configdict(values)
