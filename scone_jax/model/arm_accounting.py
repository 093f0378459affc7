"""Per-arm memory and FLOPs from the config alone: training vs inference, accelerator vs host.

What a reviewer compares across the input-embedding arms (SCONE's A_f with each combine
rule, a directly trained f-gram table, hashed n-gram tables, quantised stores) at equal
inference accelerator memory and FLOPs. Symbols as in `flops.py` (d, L, V, S, K), plus
n = fgram_model.hash_max_n and m = fgram_model.hash_buckets.

The f-gram side, per kind (`fgram_model.kind`):
  network  A_f: its parameters (flops.param_counts) train on the accelerator; export runs
           it over the S f-grams; S rows are offloaded at inference.
  table    an [S, d] table trained on the accelerator (S d params, with gradients and
           both AdamW moments: dense, though a step touches few rows); no A_f FLOPs;
           the same S rows are offloaded at inference.
  hashed   (n - 1) tables of m rows (orders 2..n), trained on the accelerator; their
           (n - 1) m rows are offloaded at inference (the host sums a position's n - 1
           rows before the transfer, so the device sees one row as for SCONE).
Combine rule (`fgram_model.combine`), elementwise work per token in the decode step:
  replace  0 (a select); add: D (x = T(x_i) + e); gate: D as well: x = T(x_i) +
  sigmoid(g) (e - T(x_i)) where T(x_i) is the f-gram's own last token, so export folds
  sigmoid(g) (e - T(last)) into the stored row (model/combine.py) and the step adds it; the
  learned D-vector g is trained on the accelerator and never needed at inference. Hashed
  embeddings are added to T(x_i) (Over-Encoding): D per token.
Quantised store (`export.quant` int8 | fp8): host bytes per row d + 4 (the float32
scale) instead of d x export.dtype bytes; the decode step dequantises with D multiplies
per token (export/quant.py states what XLA counts on CPU).

Training memory counts parameters, their gradients and AdamW's two moments, all in
model.param_dtype (optax keeps the moments in the parameters' dtype): 4 x param bytes per
trained parameter. Activations are not estimated here: the train step logs XLA's own
memory analysis of the compiled step ("train step memory per device") at start-up.
Inference accelerator memory is the backbone's parameters in param_dtype,
plus the KV cache: 2 L max_seq_len d x model.dtype bytes per sequence.
FLOPs per token follow `flops.flops_per_token` (matmuls; A_f at the worst case of K A_f
tokens per token); inference adds the elementwise extras above, which matmul-only
conventions would drop.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scone_jax.config import Config
from scone_jax.model import flops as flops_lib

_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
# Bytes per trained parameter: the parameter, its gradient and AdamW's mu and nu.
TRAIN_COPIES = 4
QUANT_SCALE_BYTES = 4  # export/quant.py: one float32 scale per quantised row.


@dataclasses.dataclass(frozen=True)
class ArmAccounting:
  """One arm's resources (see the module docstring for every formula)."""
  kind: str  # fgram_model.kind, or 'baseline'
  combine: str  # the rule the decode step applies ('hashed' + 'replace' adds)
  quant: str
  backbone_params: int
  side_params: int  # Trained f-gram side: A_f, the [S, d] table, or the hashed tables.
  gate_params: int  # D for combine='gate' (trained; folded into the store), else 0.
  train_accel_params: int  # backbone + side + gate
  train_accel_bytes: int  # TRAIN_COPIES x params x param bytes (no activations)
  infer_accel_params: int  # backbone only (the gate is folded into the store)
  infer_accel_bytes: int  # params x param bytes
  kv_bytes_per_seq: int  # 2 L max_seq_len d x compute bytes
  host_rows: int  # offloaded rows at inference (0 for the baseline)
  host_bytes_per_row: int
  host_bytes: int
  train_flops_per_token: float  # backbone + A_f worst case (table/hashed: backbone)
  infer_flops_per_token: float  # backbone matmuls + elementwise_flops_per_token
  elementwise_flops_per_token: float  # combine rule + dequantisation, decode step


def host_rows(cfg: Config) -> int:
  """Rows of the offloaded store: S for 'network' and 'table', (n - 1) m for 'hashed'."""
  fm = cfg.fgram_model
  if not fm.enabled:
    return 0
  if fm.kind == 'hashed':
    if fm.hash_buckets < 1 or fm.hash_max_n < 2:
      raise ValueError(f"fgram_model.kind='hashed' needs hash_buckets >= 1 and hash_max_n "
                       f'>= 2, got {fm.hash_buckets} and {fm.hash_max_n}')
    return (fm.hash_max_n - 1) * fm.hash_buckets
  return cfg.fgram.use_size or cfg.fgram.size


def host_bytes_per_row(cfg: Config) -> int:
  """d x export.dtype bytes, or d + 4 for an int8/fp8 store (values + float32 scale)."""
  d = cfg.model.d_model
  if cfg.export.quant != 'none':
    return d + QUANT_SCALE_BYTES
  return d * _BYTES[cfg.export.dtype]


def elementwise_flops_per_token(cfg: Config) -> float:
  """The decode step's elementwise work over the baseline's, per generated token."""
  fm, d = cfg.fgram_model, cfg.model.d_model
  if not fm.enabled:
    return 0.0
  combine = fm.combine
  if fm.kind == 'hashed' and combine == 'replace':
    combine = 'add'  # Over-Encoding adds the hashed n-gram embeddings to T(x_i).
  extra = {'replace': 0, 'add': d, 'gate': d}[combine]
  if cfg.export.quant != 'none':
    extra += d  # Dequantisation: one multiply by the row's scale per value.
  return float(extra)


def account(cfg: Config, vocab_size: int | None = None) -> ArmAccounting:
  """The arm `cfg` describes (a resolved Config), at its own scale."""
  fm, m = cfg.fgram_model, cfg.model
  d = m.d_model
  counts = flops_lib.param_counts(cfg, vocab_size)
  per_token = flops_lib.flops_per_token(cfg, vocab_size)
  rows = host_rows(cfg)
  if not fm.enabled:
    side = 0
  elif fm.kind == 'network':
    side = counts.fgram_total  # The combine gate is counted on its own (gate below).
  else:  # 'table' and 'hashed' train their offloaded rows themselves.
    side = rows * d
  gate = d if fm.enabled and fm.combine == 'gate' else 0
  param_bytes = _BYTES[m.param_dtype]
  train_params = counts.backbone_total + side + gate
  infer_params = counts.backbone_total
  row_bytes = host_bytes_per_row(cfg) if rows else 0
  train_flops = per_token.train_total if fm.kind == 'network' else per_token.train_backbone
  extra = elementwise_flops_per_token(cfg)
  combine = fm.combine
  if fm.kind == 'hashed' and combine == 'replace':
    combine = 'add'  # What the decode step does (see elementwise_flops_per_token).
  return ArmAccounting(
      kind=fm.kind if fm.enabled else 'baseline', combine=combine if fm.enabled else '-',
      quant=cfg.export.quant if fm.enabled else '-',
      backbone_params=counts.backbone_total, side_params=side, gate_params=gate,
      train_accel_params=train_params,
      train_accel_bytes=TRAIN_COPIES * train_params * param_bytes,
      infer_accel_params=infer_params, infer_accel_bytes=infer_params * param_bytes,
      kv_bytes_per_seq=2 * m.num_layers * m.max_seq_len * d * _BYTES[m.dtype],
      host_rows=rows, host_bytes_per_row=row_bytes, host_bytes=rows * row_bytes,
      train_flops_per_token=float(train_flops),
      infer_flops_per_token=float(per_token.inference + extra),
      elementwise_flops_per_token=extra)


def table_row(cfg: Config, vocab_size: int | None = None) -> dict[str, object]:
  """`account` as the columns of the sweep dry run's per-arm table."""
  a = account(cfg, vocab_size)
  return {'kind': a.kind, 'combine': a.combine, 'quant': a.quant,
          'train_accel_params': a.train_accel_params,
          'train_accel_GiB': _gib(a.train_accel_bytes),
          'infer_accel_params': a.infer_accel_params,
          'infer_accel_GiB': _gib(a.infer_accel_bytes),
          'kv_MiB_per_seq': round(a.kv_bytes_per_seq / 2**20, 1),
          'host_rows': a.host_rows, 'host_B_per_row': a.host_bytes_per_row,
          'host_GiB': _gib(a.host_bytes),
          'train_flops_tok': a.train_flops_per_token,
          'infer_flops_tok': a.infer_flops_per_token,
          'elementwise_tok': a.elementwise_flops_per_token}


def _gib(nbytes: int) -> float:
  return float(np.round(nbytes / 2**30, 2))
