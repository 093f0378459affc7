"""Parameter and FLOP accounting from the config alone (MFU, sweep dry runs, accounting CLI).

Symbols: d = d_model, f = mlp_dim, L = backbone layers, L_f = A_f layers, V = vocab,
T = train.seq_len, K = fgram.max_len, S = f-grams used: cfg.fgram.rows_used(rows) of a mined
table of `rows` rows, else cfg.fgram.requested_rows (what a dry run knows); 0 for arms with
no mined table (the baseline, kind='hashed'). n = fgram_model.hash_max_n,
m = fgram_model.hash_buckets.

Per block: attention 2 d (h + k) e matmul weights (q and o: h heads of width e; k and v:
k key/value heads; 4 d^2 when h e = d and k = h) and an MLP of 2 d f (3 d f for SwiGLU's
gate); biases 'all' (GPT-2) add (h + 2 k) e + d + f + d, 'qkv' (Qwen2) (h + 2 k) e;
LayerNorm adds 2 d per norm (RMSNorm d, non-parametric 0), two norms per block; q/k norms
add 2 e ('head') or (h + k) e ('full'). The counts below equal the parameters of the built
`SconeLM` exactly (tested).
"""

from __future__ import annotations

import dataclasses

from scone_jax.config import Config, ModelConfig
from scone_jax.model import trained_table

_NORM_PARAMS = {'layernorm': 2, 'rmsnorm': 1, 'nonparametric': 0}

# Dense bf16 peak FLOP/s per device (= per chip; per TensorCore on TPU v2/v3 where each
# core is a jax device). Sources: NVIDIA A100/H100/H200 data sheets (SXM, without
# sparsity); Google Cloud TPU system architecture pages.
PEAK_FLOPS = {
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'TPU v2': 22.5e12,
    'TPU v3': 61.5e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5': 459e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override (TFLOP/s) if > 0, else the table, else None."""
  if override_tflops > 0:
    return override_tflops * 1e12
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  # Device kinds carry suffixes on some platforms ('NVIDIA H200 NVL'): longest prefix wins.
  matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def _attention_width(m: ModelConfig) -> int:
  """h e: the width of the queries (and of the attention output)."""
  return m.num_heads * m.head_size


def _block_matmul_params(m: ModelConfig) -> int:
  """Matmul weights of one block: 2 d (h + k) e + (2 or 3) d f."""
  mlp_mats = 3 if m.mlp_activation == 'swiglu' else 2
  attn = 2 * m.d_model * (m.num_heads + m.kv_heads) * m.head_size
  return attn + mlp_mats * m.d_model * m.mlp_dim


def _block_params(m: ModelConfig) -> int:
  qkv_biases = (m.num_heads + 2 * m.kv_heads) * m.head_size
  biases = {'all': qkv_biases + 2 * m.d_model + m.mlp_dim, 'qkv': qkv_biases}.get(m.bias, 0)
  qk_norms = {'head': 2 * m.head_size,
              'full': (m.num_heads + m.kv_heads) * m.head_size}.get(m.qk_norm, 0)
  return (_block_matmul_params(m) + biases + qk_norms +
          2 * _NORM_PARAMS[m.norm] * m.d_model)


def _vocab(cfg: Config, vocab_size: int | None) -> int:
  vocab = vocab_size or cfg.model.vocab_size or cfg.tokenizer.vocab_size
  if vocab < 1:
    raise ValueError(f'vocab_size={vocab} must be >= 1 (pass the tokenizer\'s vocab size)')
  return vocab


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts; `backbone_total` is what sits on the accelerator at inference."""
  backbone_non_embedding: int  # L blocks + final norm.
  token_embedding: int  # V d (the shared table T).
  output_head: int  # d V when untied, else 0.
  position_table: int  # max_seq_len d for learned positions, else 0.
  fgram_non_embedding: int  # L_f blocks + A_f's final norm (0 for the baseline).
  fgram_position_table: int  # K d_f (0 for the baseline and a RoPE A_f of its own width).
  # The exported store's rows (S; (n - 1) m for kind='hashed'; 0 for the baseline), in
  # host RAM / on disk at inference, and their values (rows x d).
  offloaded_rows: int
  offloaded: int
  # The trained rows of kind='table' ([P, d], P = S rounded up, model/trained_table.py) or
  # kind='hashed' ((n - 1) m rows of d), on the accelerator during training only (exported
  # to the store like A_f's outputs).
  trained_rows: int = 0
  combine_gate: int = 0  # d for combine='gate' (training only: export folds it in).
  # A_f of its own width d_f (fgram_model.d_model): its own token table V d_f.
  fgram_token_embedding: int = 0

  @property
  def backbone_total(self) -> int:
    """Accelerator-resident parameters at inference, equal for SCONE and its baseline."""
    return (self.backbone_non_embedding + self.token_embedding + self.output_head +
            self.position_table)

  @property
  def fgram_total(self) -> int:
    """The f-gram side's own trainable parameters: A_f's (it also reads the shared token
    table), or the rows of kind='table' / 'hashed'. The combine gate is counted apart
    (`combine_gate`; model/arm_accounting.py adds it)."""
    return (self.fgram_non_embedding + self.fgram_position_table + self.trained_rows +
            self.fgram_token_embedding)

  @property
  def train_total(self) -> int:
    """Trainable parameters during training (backbone + A_f)."""
    return self.backbone_total + self.fgram_total


def num_fgrams(cfg: Config, table_rows: int | None = None) -> int:
  """S: the mined table's rows the arm uses; 0 for arms without one (baseline, hashed).

  Args:
    cfg: a resolved Config.
    table_rows: the mined table's rows when known (a finished run's W/run.json
      `fgram_table_rows`); None = what the config asks for.
  """
  if not cfg.fgram_model.uses_fgram_table:
    return 0
  if table_rows is None:
    return cfg.fgram.requested_rows
  return cfg.fgram.rows_used(table_rows)


def offloaded_rows(cfg: Config, table_rows: int | None = None) -> int:
  """Rows of the exported store: S for 'network' and 'table', (n - 1) m for 'hashed'."""
  fm = cfg.fgram_model
  if fm.enabled and fm.kind == 'hashed':
    return (fm.hash_max_n - 1) * fm.hash_buckets
  return num_fgrams(cfg, table_rows)


def param_counts(cfg: Config, vocab_size: int | None = None,
                 table_rows: int | None = None) -> ParamCounts:
  """Counts of a resolved Config (`config.from_configdict`).

  Args:
    cfg: the config.
    vocab_size: the model's vocab; default `model.vocab_size`, else `tokenizer.vocab_size`.
    table_rows: as in `num_fgrams`.
  """
  m = cfg.model
  v, d = _vocab(cfg, vocab_size), m.d_model
  final_norm = _NORM_PARAMS[m.norm] * d
  fm = cfg.fgram_model
  scone = fm.kind == 'network' and fm.num_layers > 0  # A_f
  rows = offloaded_rows(cfg, table_rows)
  trained_rows = {'table': trained_table.padded_rows(rows), 'hashed': rows}.get(
      fm.kind, 0) if fm.enabled else 0
  af = fm.arch(m)  # A_f's blocks: the backbone's, or of its own width d_f.
  own = af is not m
  af_norm = _NORM_PARAMS[af.norm] * af.d_model if fm.final_norm == 'same' else 0
  af_proj = af.d_model * d if fm.projects else 0
  return ParamCounts(
      backbone_non_embedding=m.num_layers * _block_params(m) + final_norm,
      token_embedding=v * d,
      output_head=0 if m.tied_embeddings else d * v,
      position_table=m.max_seq_len * d if m.position == 'learned' else 0,
      fgram_non_embedding=(fm.num_layers * _block_params(af) + af_norm + af_proj
                           if scone else 0),
      fgram_position_table=(cfg.fgram.max_len * af.d_model
                            if scone and not (own and af.position == 'rope') else 0),
      fgram_token_embedding=v * af.d_model if scone and own else 0,
      offloaded_rows=rows,
      offloaded=rows * d,
      trained_rows=trained_rows * d,
      combine_gate=d if fm.enabled and fm.combine == 'gate' else 0)


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  """FLOPs per (training or generated) token; see `flops_per_token` for the formulas.

  A_f's training work is counted in "A_f tokens per main-model token" as the paper does:
  the tokens of the packed A_f rows a step runs (batches/tagging.py) over the step's
  B * T main-model tokens. `af_tokens_basis` says which figure was used: 'worst case'
  (every position a distinct K-token f-gram: K per token) or 'measured' (from batches).
  """
  train_backbone: float
  train_fgram_per_af_token: float  # One A_f token (packed row slot), forward + backward.
  af_tokens_per_token: float  # A_f tokens per main-model token.
  af_tokens_basis: str  # 'worst case' | 'measured' | 'baseline'
  inference: float  # Per generated token; identical for SCONE and its backbone.
  fgram_forward_per_fgram: float  # One f-gram through A_f, forward only (export).

  @property
  def train_fgram(self) -> float:
    """A_f's training FLOPs amortised per main-model token."""
    return self.train_fgram_per_af_token * self.af_tokens_per_token

  @property
  def train_total(self) -> float:
    return self.train_backbone + self.train_fgram


def worst_case_af_tokens_per_token(cfg: Config) -> float:
  """Every position a distinct f-gram of K tokens: K A_f tokens per main-model token (what
  A_f ran when its rows were B * T padded to K)."""
  return float(cfg.fgram.max_len) if cfg.fgram_model.num_layers > 0 else 0.0


def flops_per_token(cfg: Config, vocab_size: int | None = None,
                    af_tokens_per_token: float | None = None) -> FlopsPerToken:
  """Matmul FLOPs per token (the PaLM/MaxText convention: 2 FLOPs per multiply-add,
  backward = 2x forward, attention counted over the full (not causal-halved) context).

  With N = L (2 d (h + k) e + (2|3) d f) the backbone's block matmul weights (h query and
  k K/V heads of width e), N_f = L_f (...) (+ d_f d for A_f's output projection) A_f's, d_f
  A_f's width (d unless fgram_model.d_model), a = h e the query width (= d unless head_dim
  is set), a_f A_f's, and W = 2 K the packed A_f row width:
    train_backbone            = 6 (N + d V) + 12 L a T
    train_fgram_per_af_token  = 6 N_f + 12 L_f a_f W      (attention over its packed row)
    train_fgram (per token)   = train_fgram_per_af_token * af_tokens_per_token
    inference                 = 2 (N + d V) + 4 L a T   (context T, an upper bound)
    fgram_forward_per_fgram   = 2 N_f K + 4 L_f a_f K^2   (export: one f-gram per row of K)
  Embedding lookups, norms, biases and softmax are not counted. Inference is the same
  for SCONE and its baseline: the f-gram embedding is a host-side table lookup.

  Args:
    cfg: a resolved Config.
    vocab_size: as in `param_counts`.
    af_tokens_per_token: measured A_f tokens per main-model token (the logged
      batch/fgram_af_tokens_per_token, or sum of distinct f-gram lengths / tokens for the
      useful work); None = the worst case (`worst_case_af_tokens_per_token`).
  """
  m = cfg.model
  v, d, t, k = _vocab(cfg, vocab_size), m.d_model, cfg.train.seq_len, cfg.fgram.max_len
  a = _attention_width(m)
  n = m.num_layers * _block_matmul_params(m)
  fm = cfg.fgram_model
  lf, af = fm.num_layers, fm.arch(m)
  d_f, a_f = af.d_model, _attention_width(af)
  n_f = lf * _block_matmul_params(af) + (d_f * d if lf and fm.projects else 0)
  if not lf:
    rate, basis = 0.0, 'baseline'
  elif af_tokens_per_token is None:
    rate, basis = worst_case_af_tokens_per_token(cfg), 'worst case'
  else:
    rate, basis = float(af_tokens_per_token), 'measured'
  return FlopsPerToken(
      train_backbone=6.0 * (n + d * v) + 12.0 * m.num_layers * a * t,
      # Attention spans the packed row, W = 2 K (batches.tagging.pack_width).
      train_fgram_per_af_token=6.0 * n_f + 12.0 * lf * a_f * 2 * k,
      af_tokens_per_token=rate,
      af_tokens_basis=basis,
      inference=2.0 * (n + d * v) + 4.0 * m.num_layers * a * t,
      fgram_forward_per_fgram=2.0 * n_f * k + 4.0 * lf * a_f * k * k)
