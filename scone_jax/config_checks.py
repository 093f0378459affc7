"""The config's rules: every single-value rule (key, test, what the value must be) and every
cross-field rule, checked by `validate` before any work (no devices, no files). Rules that
need the runtime, the data source or a resumed run: config_runtime.py.
"""

from __future__ import annotations

import dataclasses
import math

from scone_jax.config_schema import (_CHOICES, _FAMILY_DEFAULTS, Config, ConfigError,
                                     FgramModelConfig, ModelConfig, get_value)


def _finite(v) -> bool:
  return math.isfinite(v)


# Every single-value rule, as (dotted key, test, what the value must be). `validate` checks
# them all before any cross-field rule; the message names the key, the value and the range.
_VALUE_RULES = (
    ('data.embedded_eval_fraction', lambda v: 0 < v < 1, 'must be in (0, 1)'),
    ('data.embedded_valid_fraction', lambda v: 0 <= v < 1,
     'must be in [0, 1) (0 = no validation split)'),
    ('tokenizer.vocab_size', lambda v: v >= 16, 'must be >= 16'),
    ('tokenizer.max_sentence_length', lambda v: v >= 16, 'must be >= 16 (bytes)'),
    ('tokenizer.train_chars', lambda v: v >= 1, 'must be >= 1'),
    ('fgram.max_len', lambda v: v >= 2,
     'must be >= 2: f-grams have at least 2 tokens, so max_len (K) must be >= 2'),
    ('fgram.size', lambda v: v >= 1, 'must be >= 1'),
    ('fgram.min_count', lambda v: v >= 1, 'must be >= 1'),
    ('fgram.memory_budget_mb', lambda v: v >= 16, 'must be >= 16'),
    ('model.num_layers', lambda v: v >= 1, 'must be >= 1'),
    ('model.d_model', lambda v: v >= 1, 'must be >= 1'),
    ('model.num_heads', lambda v: v >= 1, 'must be >= 1'),
    ('model.mlp_dim', lambda v: v >= 0, 'must be >= 0 (0 = 4 * d_model)'),
    ('model.max_seq_len', lambda v: v >= 1, 'must be >= 1'),
    ('model.vocab_size', lambda v: v >= 0, "must be >= 0 (0 = the tokenizer's)"),
    ('model.rope_theta', lambda v: v > 0 and _finite(v), 'must be > 0'),
    ('model.init_std', lambda v: v > 0 and _finite(v), 'must be > 0'),
    ('model.num_kv_heads', lambda v: v >= 0, 'must be >= 0 (0 = num_heads)'),
    ('model.head_dim', lambda v: v >= 0, 'must be >= 0 (0 = d_model // num_heads)'),
    ('model.norm_eps', lambda v: v >= 0 and _finite(v), "must be >= 0 (0 = the norm's)"),
    ('model.clip_qkv', lambda v: v >= 0 and _finite(v), 'must be >= 0 (0 = off)'),
    ('model.rope_factor', lambda v: v >= 1 and _finite(v), 'must be >= 1'),
    ('model.rope_low_freq_factor', lambda v: v > 0 and _finite(v), 'must be > 0'),
    ('model.rope_original_max_len', lambda v: v >= 1, 'must be >= 1'),
    ('fgram_model.num_layers', lambda v: v >= 0, 'must be >= 0 (0 = baseline, no SCONE)'),
    ('fgram_model.capacity', lambda v: v >= 0,
     'must be >= 0 (the smallest A_f row bucket; 0 = 8 rows)'),
    ('fgram_model.bucket_growth', lambda v: v > 1 and _finite(v),
     'must be > 1 (the A_f row bucket ladder\'s ratio, e.g. 1.2)'),
    ('train.steps', lambda v: v >= 1, 'must be >= 1'),
    ('train.batch_size', lambda v: v >= 1, 'must be >= 1'),
    ('train.seq_len', lambda v: v >= 1, 'must be >= 1'),
    ('train.learning_rate', lambda v: v > 0 and _finite(v), 'must be > 0'),
    ('train.warmup_steps', lambda v: v >= 0, 'must be >= 0'),
    ('train.lr_end_ratio', lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
    ('train.weight_decay', lambda v: v >= 0 and _finite(v), 'must be >= 0'),
    ('train.b1', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
    ('train.b2', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
    ('train.eps', lambda v: v > 0 and _finite(v), 'must be > 0'),
    ('train.grad_clip', lambda v: v >= 0 and _finite(v), 'must be >= 0 (0 = off)'),
    ('train.grad_accum_steps', lambda v: v >= 1, 'must be >= 1'),
    ('train.seed', lambda v: v >= 0, 'must be >= 0'),
    ('train.log_every', lambda v: v >= 1, 'must be >= 1'),
    ('train.eval_every', lambda v: v >= 0, 'must be >= 0 (0 = only at the end)'),
    ('train.eval_batches', lambda v: v >= 0, 'must be >= 0 (0 = the whole eval corpus)'),
    ('train.shuffle_buffer_docs', lambda v: v >= 0, 'must be >= 0 (0 = global shuffle)'),
    ('train.fgram_model_lr_scale', lambda v: v >= 0 and _finite(v),
     "must be >= 0 (0 freezes A_f's parameters)"),
    ('train.data_prefetch', lambda v: v >= 0, 'must be >= 0'),
    ('train.peak_tflops', lambda v: v >= 0 and _finite(v), 'must be >= 0 (0 = look up)'),
    ('train.device_memory_bytes', lambda v: v >= 0, 'must be >= 0 (0 = look up)'),
    ('mesh.data', lambda v: v == -1 or v >= 1, 'must be >= 1 or -1 (= the remaining devices)'),
    ('mesh.fsdp', lambda v: v >= 1, 'must be >= 1'),
    ('mesh.tensor', lambda v: v >= 1, 'must be >= 1'),
    ('checkpoint.every_steps', lambda v: v >= 0, 'must be >= 0 (0 = only at the end)'),
    ('checkpoint.keep', lambda v: v >= 1, 'must be >= 1 (checkpoints kept)'),
    ('distributed.num_processes', lambda v: v >= 1, 'must be >= 1'),
    ('distributed.process_id', lambda v: v >= 0, 'must be >= 0'),
    ('distributed.cpu_collectives', lambda v: v in ('', 'gloo', 'mpi'),
     "must be one of ['', 'gloo', 'mpi']"),
    ('export.batch_size', lambda v: v >= 1, 'must be >= 1'),
    ('export.chunk_rows', lambda v: v >= 1, 'must be >= 1'),
    ('serve.max_new_tokens', lambda v: v >= 1, 'must be >= 1'),
    ('serve.temperature', lambda v: v >= 0 and _finite(v), 'must be >= 0 (0 = greedy)'),
    ('serve.top_k', lambda v: v >= 0, 'must be >= 0 (0 = off)'),
    ('serve.top_p', lambda v: 0 < v <= 1, 'must be in (0, 1] (1 = off)'),
    ('serve.batch_size', lambda v: v >= 1, 'must be >= 1'),
    ('serve.cache_rows', lambda v: v >= 0, 'must be >= 0 (rows of the device cache)'),
    ('serve.tensor', lambda v: v >= 1, 'must be >= 1 (devices to decode on; 1 = one)'),
)


def _validate_hashed(fm: FgramModelConfig) -> None:
  """The rules of fgram_model.kind='hashed' (scone_jax/model/hashed.py)."""
  if fm.num_layers != 0:
    raise ConfigError(f"config.fgram_model.kind='hashed' has no A_f: set "
                      f'config.fgram_model.num_layers=0 (got {fm.num_layers})')
  if fm.combine != 'add':  # validate() derives 'add' from the default 'replace'.
    raise ConfigError(f"config.fgram_model.kind='hashed' adds its n-gram embeddings to "
                      f"T(x_i) (Over-Encoding): leave config.fgram_model.combine unset (or "
                      f"'add'), got {fm.combine!r}")
  if fm.hash_max_n < 2:
    raise ConfigError(f'config.fgram_model.hash_max_n={fm.hash_max_n} must be >= 2 (orders '
                      '2..hash_max_n are hashed)')
  if fm.hash_buckets < 1:
    raise ConfigError(f'config.fgram_model.hash_buckets={fm.hash_buckets} must be >= 1 '
                      '(rows per n-gram order, the m of Over-Encoding)')
  if (fm.hash_max_n - 1) * fm.hash_buckets >= 2**31:
    raise ConfigError(f'config.fgram_model.hash_buckets={fm.hash_buckets} x '
                      f'{fm.hash_max_n - 1} orders must be < 2**31 rows (int32 row ids)')


def validate(cfg: Config) -> Config:
  """Checks every value and cross-field rule; returns cfg with family defaults resolved.

  Needs no devices and touches no file, so entry points call it (through
  `from_configdict`) before any work. Rules that need the device or process count are in
  `config_runtime.validate_runtime`.
  """
  for key, ok, must in _VALUE_RULES:
    value = get_value(cfg, key)
    if not ok(value):
      raise ConfigError(f'config.{key}={value!r} {must}')
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
  if cfg.fgram.use_size < 0 or cfg.fgram.use_size > cfg.fgram.size:
    raise ConfigError(f'config.fgram.use_size={cfg.fgram.use_size} must be in [0, '
                      f'fgram.size={cfg.fgram.size}] (0 = the whole table)')
  if cfg.fgram_model.output_scale == 'rmsnorm_gain' and cfg.fgram_model.final_norm != 'none':
    raise ConfigError("config.fgram_model.output_scale='rmsnorm_gain' normalises A_f's output "
                      "itself; set config.fgram_model.final_norm='none' (or choose "
                      "output_scale='scalar'/'channel' to scale the normed output)")
  if cfg.serve.store_sharded and cfg.serve.decode_loop != 'host':
    raise ConfigError("config.serve.store_sharded=True exchanges rows in a collective every "
                      "step, which the host loop runs: set config.serve.decode_loop='host'")
  if cfg.export.quant != 'none' and not cfg.fgram_model.enabled:
    raise ConfigError(f'config.export.quant={cfg.export.quant!r} quantises the exported '
                      'f-gram store, but this run has no f-gram side (fgram_model.num_layers'
                      "=0, kind='network'); leave config.export.quant='none'")
  if cfg.fgram_model.kind == 'hashed':
    if cfg.fgram_model.combine == 'replace':
      # Derived, like the family defaults: Over-Encoding adds, so a hashed arm never
      # spells combine='add' (an explicit 'gate' is still refused below).
      cfg = dataclasses.replace(
          cfg, fgram_model=dataclasses.replace(cfg.fgram_model, combine='add'))
    _validate_hashed(cfg.fgram_model)
    if cfg.export.quant != 'none':
      raise ConfigError(f"config.export.quant={cfg.export.quant!r} is for f-gram stores; "
                        "kind='hashed' sums its orders' rows on the host in float32 before "
                        "the decode step, so leave config.export.quant='none'")
  _check_fgram_side(cfg.fgram_model)
  if cfg.data.embedded_eval_fraction + cfg.data.embedded_valid_fraction >= 1:
    raise ConfigError(f'config.data.embedded_valid_fraction={cfg.data.embedded_valid_fraction}'
                      f' + data.embedded_eval_fraction={cfg.data.embedded_eval_fraction} must '
                      'be < 1: train keeps the rest of the modules')
  if model.vocab_size and model.vocab_size < cfg.tokenizer.vocab_size:
    raise ConfigError(
        f'config.model.vocab_size={model.vocab_size} is smaller than the tokenizer\'s '
        f'config.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: token ids past the table '
        'would embed as garbage; set model.vocab_size >= tokenizer.vocab_size (or 0 = same)')
  _check_architecture(model)
  af = cfg.fgram_model.arch(model)
  if af is not model and (af.d_model < 1 or (not af.head_dim and af.d_model % af.num_heads)
                          or af.num_heads % af.kv_heads or
                          (model.position == 'rope' and af.head_size % 2)):
    raise ConfigError(f'config.fgram_model.d_model={af.d_model} must be >= 1 and split into '
                      f'fgram_model.num_heads={af.num_heads} heads (0 = the backbone\'s; or '
                      'set fgram_model.head_dim), of even size for RoPE, in equal groups per '
                      f'fgram_model.num_kv_heads={af.num_kv_heads}')
  if model.loss_chunk < 0:
    raise ConfigError(f'config.model.loss_chunk={model.loss_chunk} must be >= 0 (tokens '
                      'per cross-entropy chunk; 0 = the whole sequence at once)')
  if model.attention == 'cudnn' and model.dtype != 'bfloat16':
    raise ConfigError("config.model.attention='cudnn' needs config.model.dtype='bfloat16' "
                      "(cuDNN flash attention has no float32 kernel); or use 'einsum'")
  if cfg.train.seq_len > model.max_seq_len:
    raise ConfigError(
        f'config.train.seq_len={cfg.train.seq_len} is larger than the position table '
        f'config.model.max_seq_len={model.max_seq_len}; raise model.max_seq_len or lower '
        'train.seq_len')
  if model.init_from and cfg.train.init_from_run:
    raise ConfigError('config.model.init_from and config.train.init_from_run both set the '
                      'initial weights; give one')
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={cfg.train.batch_size} is not divisible by '
                      f'config.train.grad_accum_steps={cfg.train.grad_accum_steps}')
  tc = cfg.tokenizer
  if tc.kind == 'huggingface' and not tc.model_file:
    raise ConfigError("config.tokenizer.kind='huggingface' loads an existing tokenizer.json: "
                      "set --config.tokenizer.model_file=/path/to/tokenizer.json")
  if tc.kind == 'sentencepiece' and (tc.bos_token or tc.eos_token or tc.pad_token):
    raise ConfigError('config.tokenizer.bos_token/eos_token/pad_token apply to '
                      "tokenizer.kind='huggingface' only; sentencepiece models carry their "
                      'own special ids')
  if cfg.data.format == 'arrayrecord_tokens' and not tc.model_file:
    raise ConfigError("config.data.format='arrayrecord_tokens' holds token ids already: set "
                      'config.tokenizer.model_file (and tokenizer.kind) to the tokenizer '
                      'that produced them')
  if cfg.data.source == 'files' and not cfg.data.train_files and not cfg.tokenizer.model_file:
    raise ConfigError("config.data.source='files' needs config.data.train_files (comma-"
                      "separated globs), e.g. --config.data.train_files='/data/*.txt'")
  dist = cfg.distributed
  if dist.mode == 'explicit':
    if not dist.coordinator_address:
      raise ConfigError("config.distributed.mode='explicit' needs "
                        'config.distributed.coordinator_address (host:port of process 0)')
    if dist.process_id >= dist.num_processes:
      raise ConfigError(f'config.distributed.process_id={dist.process_id} must be in '
                        f'[0, num_processes={dist.num_processes})')
  return cfg


def _check_architecture(model: ModelConfig) -> None:
  """Heads, head width and the checkpoint-architecture keys against each other."""
  if not model.head_dim and model.d_model % model.num_heads:
    raise ConfigError(f'config.model.d_model={model.d_model} is not divisible by '
                      f'config.model.num_heads={model.num_heads} (or set model.head_dim)')
  if model.num_heads % model.kv_heads:
    raise ConfigError(f'config.model.num_heads={model.num_heads} is not a multiple of '
                      f'config.model.num_kv_heads={model.num_kv_heads} (query heads share '
                      'K/V heads in equal groups)')
  if model.position == 'rope' and model.head_size % 2:
    raise ConfigError(f"config.model.position='rope' needs an even head dimension, but "
                      f'the head dimension (model.head_dim or d_model/num_heads) is '
                      f'{model.head_size}')
  if model.rope_scaling and model.position != 'rope':
    raise ConfigError(f'config.model.rope_scaling={model.rope_scaling!r} scales RoPE; set '
                      "model.position='rope' or leave rope_scaling=''")
  if model.rope_scaling == 'llama3' and model.rope_high_freq_factor <= model.rope_low_freq_factor:
    raise ConfigError(f'config.model.rope_high_freq_factor={model.rope_high_freq_factor} '
                      f'must exceed model.rope_low_freq_factor={model.rope_low_freq_factor}')
  if model.qk_norm != 'none' and model.norm != 'rmsnorm':
    raise ConfigError(f'config.model.qk_norm={model.qk_norm!r} is an RMSNorm (Qwen3, '
                      f"OLMo-2); set model.norm='rmsnorm' (got {model.norm!r})")


def _check_fgram_side(fm: FgramModelConfig) -> None:
  """fgram_model.kind / combine against the A_f options."""
  if fm.kind == 'table':
    if fm.num_layers:
      raise ConfigError(f"config.fgram_model.kind='table' learns the f-gram rows directly and "
                        f'has no A_f, but config.fgram_model.num_layers={fm.num_layers}; set '
                        "it to 0 (or use kind='network' for A_f)")
    for key, default in (('final_norm', 'none'), ('output_scale', 'none')):
      if getattr(fm, key) != default:
        raise ConfigError(f'config.fgram_model.{key}={getattr(fm, key)!r} shapes A_f\'s '
                          f"output; kind='table' has no A_f: leave it {default!r}")
  own = (fm.d_model or fm.num_heads or fm.mlp_dim or fm.num_kv_heads or fm.head_dim or
         fm.zero_init_out or fm.source)
  if own and (fm.kind != 'network' or not fm.num_layers):
    raise ConfigError('config.fgram_model.d_model/num_heads/mlp_dim/num_kv_heads/head_dim/'
                      "zero_init_out/init_from shape A_f: they need kind='network' and "
                      'num_layers >= 1')
  if (fm.num_heads or fm.mlp_dim or fm.num_kv_heads or fm.head_dim) and not fm.d_model:
    raise ConfigError('config.fgram_model.num_heads/mlp_dim/num_kv_heads/head_dim give A_f '
                      'its own shape: set config.fgram_model.d_model too (0 = A_f is the '
                      'backbone\'s width)')
  if fm.init_from and fm.init_from_run:
    raise ConfigError('config.fgram_model.init_from and init_from_run both name A_f\'s '
                      'source; give init_from only (init_from_run is its older name)')
  if fm.zero_init_out and fm.combine != 'add':
    raise ConfigError(f'config.fgram_model.zero_init_out=True starts A_f\'s output at 0, which '
                      f'keeps the backbone\'s step-0 function only with combine=\'add\' (got '
                      f'{fm.combine!r}: x would be 0 or T/2); set config.fgram_model.combine='
                      "'add' (for 'replace', init='identity' without zero_init_out starts at "
                      'the backbone exactly when A_f shares its width)')
  if fm.combine != 'replace' and not fm.enabled:
    raise ConfigError(f'config.fgram_model.combine={fm.combine!r} joins an f-gram embedding '
                      'to the token embedding, but this run has none (fgram_model.'
                      "num_layers=0, kind='network': the baseline); set num_layers >= 1, "
                      "or kind='table', or leave combine='replace'")
