"""The config schema: frozen dataclasses, one per section, with their defaults and the facts
derived from them (S in use, the stored-row rule, A_f's own architecture), and the model
families' defaults. scone_jax/config.py is the API (build, validate, override);
config_checks.py holds the value and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from scone_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the key and the fix."""


# Eval corpora whose name starts with this are VALIDATION sets (hyperparameter selection);
# all other eval corpora are test sets (what a report states as results).
VALID_PREFIX = 'valid.'


def is_validation_corpus(name: str) -> bool:
  return name.startswith(VALID_PREFIX)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # 'embedded' builds the default corpus from Python's stdlib docstrings (no network);
  # 'files' reads `train_files` / `eval_files`.
  source: Literal['embedded', 'files'] = 'embedded'
  # Comma-separated globs. eval_files entries may be named: "wiki=/d/wiki*.txt,code=/d/c*.jsonl".
  train_files: str = ''
  eval_files: str = ''
  # 'lines': one document per line; 'blank_lines': documents separated by blank lines;
  # 'jsonl': one JSON object per line, text under `text_field`; 'parquet': the string
  # column `text_field`, one document per row, streamed by row group; 'arrayrecord': one
  # UTF-8 document per record; 'arrayrecord_tokens': one document per record as token ids
  # (little-endian uint32, no BOS/EOS; needs the tokenizer that made them in
  # tokenizer.model_file). Layouts: scone_jax/corpus/columnar.py.
  # 'sft' / 'chat': supervised fine-tuning JSONL ({prompt, response} / {messages}), the loss
  # on response tokens only (scone_jax/corpus/sft.py; chat templates from the tokenizer's
  # tokenizer_config.json).
  format: Literal['lines', 'blank_lines', 'jsonl', 'parquet', 'arrayrecord',
                  'arrayrecord_tokens', 'sft', 'chat'] = 'lines'
  text_field: str = 'text'
  # Invalid UTF-8: 'replace' with U+FFFD (counted and reported) or 'error' (names file+line).
  on_bad_utf8: Literal['replace', 'error'] = 'replace'
  # Embedded corpus: fraction of stdlib modules held out for evaluation (split by module).
  embedded_eval_fraction: float = 0.05
  # Embedded corpus: a further fraction of modules held out as the VALIDATION corpus
  # (eval corpus 'valid.stdlib'), disjoint from both train and the test corpus 'stdlib'.
  # Learning rates are selected on it (scone_jax.sweeps.study), never on the test corpus.
  # 0 = no validation split (the corpus is then exactly what it was before this option).
  embedded_valid_fraction: float = 0.0
  # Validation corpora for files: named globs like eval_files; each becomes the eval corpus
  # 'valid.<name>'. They must not share a file with eval_files (the reported test sets).
  valid_files: str = ''
  # Where prepared artifacts (tokenizer, token shards, f-gram table) live; '' means
  # <workdir>/prepare. Sweep points point this at one shared directory: stages are keyed
  # by their inputs' fingerprints, so points with the same data prepare once.
  artifacts_dir: str = ''
  # False in the paper presets (experiments/gpt2.py, olmo.py): prepare and train refuse
  # source='embedded' unless this is set, since a paper-sized run on the small stdlib
  # corpus is almost always a forgotten data flag (config_runtime.check_data_source).
  allow_embedded: bool = True
  # source='files' without eval_files is refused at prepare (a run with no held-out test
  # set reports nothing); True trains without one (eval.json then has no corpora).
  allow_no_eval: bool = False
  # Text formats (lines, blank_lines, jsonl): each file's first 64 KiB must look like its
  # data.format (no compressed/binary/columnar magic bytes, NULs or mostly invalid UTF-8;
  # for lines/blank_lines, not every line a JSON object). False reads every file as
  # data.format says (e.g. a corpus of JSON text on purpose). scone_jax/corpus/readers.py.
  check_format: bool = True


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  # 'sentencepiece': train one on the corpus or load a .model (model_file);
  # 'huggingface': load a local tokenizer.json (model_file) with the `tokenizers`
  # library, e.g. GPT-2's or GPT-NeoX-20B's; it cannot be trained here.
  kind: Literal['sentencepiece', 'huggingface'] = 'sentencepiece'
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
  # huggingface only: the special tokens scone_jax uses ('' = the rule in
  # scone_jax/tokenizer/hf.py: EOS is <|endoftext|> or </s>; BOS is <s> if present, else
  # EOS, as GPT-2 and GPT-NeoX mark document starts with <|endoftext|>; pad is <pad> or
  # <|padding|>, else EOS; padded positions are masked, so its id never reaches a loss).
  bos_token: str = ''
  eos_token: str = ''
  pad_token: str = ''
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
  # Mined fewer rows than requested_rows (min_count cut the table short): prepare refuses,
  # naming the rows and the min_count that gives more, unless this is True; then the run
  # uses all rows and W/run.json's fgram_table_rows records them (S = rows_used(rows)).
  allow_short_table: bool = False
  # A given f-gram table (an FgramTable directory, e.g. a pretrained run's A/fgrams) instead
  # of mining: prepare copies it after checking its tokenizer and max_len ('' = mine).
  table_dir: str = ''

  # The ONE derivation of S (the paper's number of f-grams) from this section. Every module asks
  # these two; none reads `use_size` itself (tests/test_config_facts.py checks that).
  @property
  def requested_rows(self) -> int:
    """S as the config asks for it: use_size, or the whole mined size when use_size is 0.
    What a dry run states before any table exists."""
    return self.use_size or self.size

  def rows_used(self, table_rows: int) -> int:
    """S in use for a mined table of `table_rows` rows: the first min(requested, mined)
    rows (a table's top-S' rows are exactly a smaller table)."""
    return min(int(table_rows), self.requested_rows)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Family defaults (_FAMILY_DEFAULTS) fill every '' / 0 below; gpt2 and olmo are the
  # paper's; llama, qwen2, qwen3, olmo2 (and olmo) are what Hugging Face checkpoints use.
  family: Literal['gpt2', 'olmo', 'llama', 'qwen2', 'qwen3', 'olmo2'] = 'gpt2'
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
  # Activation memory of the block stack in the backward pass: 'none' keeps every block's
  # activations; 'block' recomputes each block (jax.checkpoint, the least memory); 'dots'
  # keeps the matmul outputs without a batch dimension (the projections and MLP) and
  # recomputes the rest, attention included (jax.checkpoint_policies.
  # dots_with_no_batch_dims_saveable): most of 'block''s saving for less recompute.
  remat: Literal['none', 'block', 'dots'] = 'none'
  # Self-attention (training, eval, A_f, prefill): 'auto' picks per backend and shape
  # (compat.attention_backend: cuDNN flash attention on NVIDIA GPUs in bfloat16, the Pallas
  # splash kernel on TPU, else exactly 'einsum'); 'einsum' (XLA, any backend); 'cudnn'
  # (forces cuDNN; NVIDIA GPUs, bfloat16 compute only). Decode steps always use einsum.
  attention: Literal['auto', 'einsum', 'cudnn'] = 'auto'
  # Training loss: 0 computes the [B, T, V] float32 logits at once; N > 0 computes logits
  # and cross-entropy N tokens of the sequence at a time, recomputed in the backward, so
  # the full logits never exist (model/loss.py). Same loss up to float summation order.
  loss_chunk: int = 0
  # 'scan' compiles one block for all layers; 'unrolled' compiles each layer (slower to
  # compile) and is what XLA's cost analysis needs to count every layer (it counts a scan
  # body once).
  layer_loop: Literal['scan', 'unrolled'] = 'scan'
  # Architecture details of pretrained checkpoints ('' / 0 = the family's default).
  num_kv_heads: int = 0  # Grouped-query attention: K/V heads (0 = num_heads).
  head_dim: int = 0  # 0 = d_model // num_heads; else independent of d_model.
  # Biases: 'all' (GPT-2: q, k, v, o, MLP), 'qkv' (Qwen2), 'none'.
  bias: Literal['', 'all', 'qkv', 'none'] = ''
  # RMSNorm of q and k before RoPE: 'head' per head (Qwen3), 'full' over all heads (OLMo-2).
  qk_norm: Literal['', 'none', 'head', 'full'] = ''
  # 'pre' normalises each sublayer's input; 'post' its output before the residual (OLMo-2).
  norm_position: Literal['', 'pre', 'post'] = ''
  norm_eps: float = 0.0  # 0 = the norm's default (layernorm 1e-5, rmsnorm 1e-6).
  # RoPE frequency scaling: '' none; 'llama3' with factor, low/high_freq_factor and the
  # original context length (Llama 3.1's config.json rope_scaling).
  rope_scaling: Literal['', 'llama3'] = ''
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  clip_qkv: float = 0.0  # Clamp q, k, v to [-c, c] after projection (OLMo-1); 0 = off.
  # A local (or gs://) Hugging Face checkpoint directory (config.json, safetensors,
  # tokenizer.json): its config.json sets the model.* keys above (scone_jax/hf/).
  init_from: str = ''

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    """E: the per-head width (head_dim, or d_model // num_heads)."""
    return self.head_dim or self.d_model // self.num_heads


COMBINES = ('replace', 'add', 'gate')


def stored_rule(combine: str) -> Literal['replace', 'add']:
  """The rule a decode step applies to a row of the exported store (model/combine.py):
  'replace' for combine='replace'; 'add' for add, for gate (its gate is folded into the
  stored row at export) and for kind='hashed' (whose combine is derived as 'add': Over-
  Encoding adds to T(x_i)). The one derivation; model/combine.py re-exports it."""
  if combine not in COMBINES:
    raise ValueError(f'combine={combine!r} is not one of {list(COMBINES)}')
  return 'replace' if combine == 'replace' else 'add'


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
  # positions (measurements: BENCHMARKS.md, "A_f's output norm and init").
  final_norm: Literal['same', 'none'] = 'none'
  # 'identity': A_f's residual-branch output projections (wo, w_out) and its position
  # table start at zero, so at step 0 A_f(x_j..x_i) = T(x_i) exactly and SCONE computes the
  # baseline's function; training then learns what the f-gram adds. 'random': the
  # backbone's init (random blocks add noise comparable to the 0.02-scale token signal at
  # every matched position; BENCHMARKS.md, "A_f's output norm and init").
  init: Literal['identity', 'random'] = 'identity'
  # Scale of A_f's output e (after final_norm): 'none' = as computed; 'scalar' = g * e with
  # one learned g; 'channel' = g_D * e with a learned gain per channel (both g start at 1,
  # so with init='identity' e = T(x_i) at step 0); 'rmsnorm_gain' = g_D * e / rms(e) with g
  # starting at the token embeddings' init scale (model.init_std), which bounds the output
  # at the token embeddings' scale. The gain is part of A_f, so export stores what the
  # backbone saw. Measured in STUDY.md ("A_f output scale").
  output_scale: Literal['none', 'scalar', 'channel', 'rmsnorm_gain'] = 'none'
  # What computes the f-gram side of the input embedding (beyond the paper: STUDY.md,
  # "Competing input-embedding arms"). 'network' = A_f (the paper; num_layers >= 1 turns it
  # on); 'table' = a directly trained [S, d] table on the same f-gram keys; 'hashed' =
  # Over-Encoding-style hashed n-gram tables (orders 2..hash_max_n, hash_buckets rows each).
  # 'table' and 'hashed' have no A_f: num_layers stays 0 and `enabled` says the side is on.
  kind: Literal['network', 'table', 'hashed'] = 'network'
  # How the f-gram embedding e joins T(x_i) where a position has one: 'replace' (the
  # paper's rule) x = e; 'add' x = T(x_i) + e; 'gate' x = T(x_i) + sigmoid(g) * (e - T(x_i))
  # with a learned per-channel g (init 0). The rule, what the export store holds for each
  # mode and the decode step's extra FLOPs (D adds per token for add and gate):
  # scone_jax/model/combine.py. kind='table' rows start at T(last token) (0 for 'add').
  combine: Literal['replace', 'add', 'gate'] = 'replace'
  # kind='hashed' (scone_jax/model/hashed.py): n-gram orders 2..hash_max_n, each hashed into
  # hash_buckets rows of its own table; combine is derived as 'add' (Over-Encoding adds;
  # 'gate' is refused) and there is no A_f.
  hash_max_n: int = 3
  hash_buckets: int = 0
  # A_f of its own width (docs/METHOD.md, "Post-training"). 0 = the backbone's d_model: A_f
  # reads the shared token table. > 0: A_f owns a token table [V, d_model], blocks of that
  # width (num_heads, mlp_dim: 0 = the backbone's heads, 4 d_model), the family's positions
  # (RoPE, or a learned table of K rows) and a learned projection [d_model, D] to the
  # backbone's width; `arch` is its ModelConfig.
  d_model: int = 0
  num_heads: int = 0
  mlp_dim: int = 0
  num_kv_heads: int = 0  # 0 = num_heads (a checkpoint's GQA: set it and head_dim to its).
  head_dim: int = 0  # 0 = d_model / num_heads.
  # True: A_f's output goes through a projection [d_f, D] that starts at ZERO, so with
  # combine='add' (required) x = T(x_i) + 0 and step 0 is exactly the backbone (a trained
  # one from train.init_from_run). False: no projection unless d_model is set (today's A_f).
  zero_init_out: bool = False
  # A_f's token table, positions (first K rows), first num_layers blocks and final norm start
  # from a pretrained backbone: one of our runs or a Hugging Face checkpoint directory, of
  # A_f's architecture (train/init_from.py). init_from_run: its older name (`source`).
  init_from: str = ''
  init_from_run: str = ''

  @property
  def source(self) -> str:
    """The pretrained backbone A_f starts from ('' = none)."""
    return self.init_from or self.init_from_run

  def arch(self, model: 'ModelConfig') -> 'ModelConfig':
    """A_f's block architecture: the backbone's, at A_f's own width when d_model is set."""
    if not self.d_model:
      return model
    # Its own width means its own heads (the backbone's num_kv_heads / head_dim describe
    # the backbone's checkpoint only): fgram_model.num_kv_heads / head_dim, 0 = the usual.
    return dataclasses.replace(model, d_model=self.d_model,
                               num_heads=self.num_heads or model.num_heads,
                               mlp_dim=self.mlp_dim or 4 * self.d_model,
                               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

  @property
  def projects(self) -> bool:
    """Whether A_f's output goes through a learned projection to the backbone's width."""
    return bool(self.d_model) or self.zero_init_out

  @property
  def enabled(self) -> bool:
    """Whether the run has an f-gram side at all (False = the plain baseline)."""
    return self.num_layers > 0 or self.kind != 'network'

  @property
  def uses_fgram_table(self) -> bool:
    """Whether batches, eval and serving need the mined f-gram table (kind='hashed' hashes
    raw n-grams and needs none)."""
    return self.enabled and self.kind != 'hashed'

  @property
  def stored_rule(self) -> Literal['replace', 'add']:
    """The rule a decode step applies to a row of the exported store (`stored_rule`)."""
    return stored_rule(self.combine)


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
  # Batches per eval corpus; 0 = the whole held-out set (every output states the fraction
  # of each set a limited eval covered).
  eval_batches: int = 0
  shuffle_buffer_docs: int = 0  # 0 = global shuffle of documents per epoch.
  # Learning-rate multiplier for A_f's own parameters (not the shared token table), applied
  # to AdamW's updates (scaling gradients would cancel in Adam). 1 is the paper's joint
  # training; 0 freezes A_f's parameters (their gradients still count in the global-norm clip).
  fgram_model_lr_scale: float = 1.0
  # Batches built ahead by one background thread (0 = build in the training thread).
  data_prefetch: int = 2
  # Peak dense TFLOP/s of one device for MFU; 0 = look up jax's device_kind in
  # scone_jax/model/flops.py:PEAK_FLOPS (MFU is not logged when unknown, e.g. CPU).
  peak_tflops: float = 0.0
  # One device's memory for kind='table''s fit check; 0 = its memory_stats (host RAM over
  # the local devices on CPU).
  device_memory_bytes: int = 0
  # A NEW run (its workdir holds no checkpoint) starts from the latest params of the run
  # in this directory instead of its init; every param's shape must match. The optimizer
  # state, step and data order start fresh. '' = the usual init.
  init_from_run: str = ''


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
  # Store rows quantised after A_f: 'none' keeps `dtype`; 'int8' = int8 rows with a float32
  # scale per row; 'fp8' = float8_e4m3fn rows with a scale per row (`dtype` is then unused:
  # rows are quantised from A_f's float32 output). Decode dequantises on device after the
  # gather (scone_jax/export/quant.py states the round-trip error bounds).
  quant: Literal['none', 'int8', 'fp8'] = 'none'
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
  # Generation loop: on-device while loop (default) or one jitted step per token.
  decode_loop: Literal['device', 'host'] = 'device'
  # SCONE's per-step lookup in the device loop (serve/device_loop.py); 'cache': match on
  # the device, the cache_rows most frequent f-grams' rows resident there (cache_rows x
  # d_model x the store's itemsize bytes, plus 12 bytes per table row for the match
  # index), the host asked only for misses (serve/device_cache.py); 'device': the same
  # with the compiled FFI gather required ('auto' on a CUDA GPU, serve/factory.py).
  lookup: Literal['auto', 'native', 'callback', 'cache', 'device'] = 'auto'
  cache_rows: int = 0
  # Tensor-parallel decode over this many of the host's devices (heads/MLP/vocab and the
  # KV cache's heads split, serve/session.serving_mesh); 1 = one device.
  tensor: int = 1
  # Each process holds only its row shards of the store and exchanges rows every step
  # (serve/sharded_store.py; decode_loop='host'); False: each loads the whole store.
  store_sharded: bool = False


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
  def has_fgram_side(self) -> bool:
    """Any f-gram side (A_f, a trained table or hashed tables): every arm but the
    baseline. SCONE proper is `fgram_model.kind == 'network'` with A_f layers."""
    return self.fgram_model.enabled

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Family defaults, resolved once here so layers see concrete strings.
_ROPE_FAMILY = dict(mlp_activation='swiglu', norm='rmsnorm', position='rope', bias='none',
                    qk_norm='none', norm_position='pre')
_FAMILY_DEFAULTS = {
    'gpt2': dict(mlp_activation='gelu', norm='layernorm', position='learned', bias='all',
                 qk_norm='none', norm_position='pre'),
    'olmo': dict(_ROPE_FAMILY, norm='nonparametric'),
    'llama': _ROPE_FAMILY,
    'qwen2': dict(_ROPE_FAMILY, bias='qkv'),
    'qwen3': dict(_ROPE_FAMILY, qk_norm='head'),
    'olmo2': dict(_ROPE_FAMILY, qk_norm='full', norm_position='post'),
}
_CHOICES = {
    ('model', 'mlp_activation'): ('gelu', 'swiglu', 'relu'),
    ('model', 'norm'): ('layernorm', 'rmsnorm', 'nonparametric'),
    ('model', 'position'): ('learned', 'rope'),
}



def get_value(cfg: Config, key: str) -> Any:
  """The value of a dotted key, e.g. get_value(cfg, 'train.steps')."""
  value = cfg
  for part in key.split('.'):
    value = getattr(value, part)
  return value
