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
import math
import typing
from typing import Any, Literal

import ml_collections
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


def get_value(cfg: Config, key: str) -> Any:
  """The value of a dotted key, e.g. get_value(cfg, 'train.steps')."""
  value = cfg
  for part in key.split('.'):
    value = getattr(value, part)
  return value


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
  derived = {'model.family': ('model.mlp_activation', 'model.norm', 'model.position',
                              'model.bias', 'model.qk_norm', 'model.norm_position'),
             'model.d_model': ('model.mlp_dim',),
             'fgram_model.kind': ('fgram_model.combine',)}
  defaults = dataclasses.asdict(Config())
  for key, names in derived.items():
    if key in overrides and overrides[key] != _get_dotted(values, key):
      for name in names:
        if name not in overrides:
          section, leaf = name.split('.')
          values[section][leaf] = defaults[section][leaf]
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
