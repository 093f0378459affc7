"""Per-arm memory and FLOPs from the config alone: training vs inference, accelerator vs host.

What a reviewer compares across the input-embedding arms (SCONE's A_f with each combine
rule, a directly trained f-gram table, hashed n-gram tables, quantised stores) at equal
inference accelerator memory and FLOPs. Symbols as in `flops.py` (d, L, V, S, K), plus
n = fgram_model.hash_max_n and m = fgram_model.hash_buckets.

The f-gram side, per kind (`fgram_model.kind`):
  network  A_f: its parameters (flops.param_counts) train on the accelerator; export runs
           it over the S f-grams; S rows are offloaded at inference.
  table    an [S, d] table trained on the accelerator (P d params, P = S rounded up to
           trained_table.ROW_MULTIPLE as built, with gradients and both AdamW moments:
           dense, though a step touches few rows); no A_f FLOPs; the S rows are
           offloaded at inference.
  hashed   (n - 1) tables of m rows (orders 2..n), trained on the accelerator; their
           (n - 1) m rows are offloaded at inference (the host sums a position's n - 1
           rows before the transfer, so the device sees one row as for SCONE).
Combine rule (`fgram_model.combine`), elementwise work per token in the decode step:
  replace  0 (a select); add: D (x = T(x_i) + e); gate: D as well: x = T(x_i) +
  sigmoid(g) (e - T(x_i)) where T(x_i) is the f-gram's own last token, so export folds
  sigmoid(g) (e - T(last)) into the stored row (model/combine.py) and the step adds it; the
  learned D-vector g is trained on the accelerator and never needed at inference. Hashed
  embeddings are added to T(x_i) (Over-Encoding): D per token.
The combine rule's extra is `combine.extra_decode_flops_per_token` (the one place that
states it; the XLA-count tests check the compiled step against it).
Quantised store (`export.quant` int8 | fp8): host bytes per row d + 4 (the float32
scale) instead of d x export.dtype bytes; the decode step dequantises with D multiplies
per token (export/quant.py states what XLA counts on CPU, converts included).

Training memory counts parameters, their gradients and AdamW's two moments, all in
model.param_dtype (optax keeps the moments in the parameters' dtype): 4 x param bytes per
trained parameter. Activations are not estimated here: the train step logs XLA's own
memory analysis of the compiled step ("train step memory per device") at start-up.
Inference accelerator memory is the backbone's parameters in param_dtype,
plus the KV cache: 2 L max_seq_len d x model.dtype bytes per sequence.
FLOPs per token follow `flops.flops_per_token` (matmuls; A_f at the worst case of K A_f
tokens per token, and at a measured rate when one is given); inference adds the
elementwise extras above, which matmul-only conventions would drop.

`account` is the ONE source of these figures: the sweep dry run, results.csv and REPORT.md
(scone_jax/report.py), the report's plots and `generate --accounting_only`
(serve/accounting.py) all print from its `ArmAccounting`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from scone_jax.config import Config
from scone_jax.errors import UserError
from scone_jax.model import combine as combine_lib
from scone_jax.model import flops as flops_lib
from scone_jax.model import sharding

_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
# Bytes per trained parameter: the parameter, its gradient and AdamW's mu and nu.
TRAIN_COPIES = 4
QUANT_SCALE_BYTES = 4  # export/quant.py: one float32 scale per quantised row.


@dataclasses.dataclass(frozen=True)
class ArmAccounting:
  """One arm's resources (see the module docstring for every formula)."""
  kind: str  # fgram_model.kind, or 'baseline'
  combine: str  # fgram_model.combine ('add' for hashed, derived by config.validate)
  quant: str
  num_fgrams: int  # S: rows of the mined table in use (0: baseline, hashed)
  fgram_max_len: int  # K
  af_layers: int  # L_f (0 without A_f)
  train_tokens: int  # steps x batch x seq_len
  seq_len: int
  backbone_params: int  # Accelerator-resident at inference, equal for every arm.
  # Trained f-gram side: A_f, the [P, d] table or the hashed tables (flops.ParamCounts).
  side_params: int
  gate_params: int  # D for combine='gate' (trained; folded into the store), else 0.
  train_accel_params: int  # backbone + side + gate
  train_accel_bytes: int  # TRAIN_COPIES x params x param bytes (no activations)
  infer_accel_params: int  # backbone only (the gate is folded into the store)
  infer_accel_bytes: int  # params x param bytes
  kv_bytes_per_seq: int  # 2 L max_seq_len k e x compute bytes (k e = d without GQA)
  host_rows: int  # offloaded rows at inference (0 for the baseline)
  host_bytes_per_row: int
  host_bytes: int
  offloaded_params: int  # host_rows x d
  train_flops_backbone: float  # per main-model token
  train_flops_af: float  # A_f per main-model token, worst case (0 without A_f)
  af_tokens_per_token: float  # worst case: K with A_f, else 0
  train_flops_per_token: float  # backbone + A_f worst case (table/hashed: backbone)
  infer_flops_backbone: float  # flops.flops_per_token(cfg).inference (context seq_len)
  combine_flops_per_token: float  # decode step: the combine rule's extra (D or 0)
  dequant_flops_per_token: float  # decode step: D multiplies for an int8/fp8 store
  # The same A_f figures at a measured A_f tokens per main-model token (None: none given).
  af_tokens_per_token_measured: float | None = None
  train_flops_af_measured: float | None = None
  train_flops_per_token_measured: float | None = None

  @property
  def elementwise_flops_per_token(self) -> float:
    """The decode step's elementwise work over the baseline's, per generated token."""
    return self.combine_flops_per_token + self.dequant_flops_per_token

  @property
  def infer_flops_per_token(self) -> float:
    """Backbone matmuls at context seq_len (an upper bound) + the elementwise extras."""
    return self.infer_flops_backbone + self.elementwise_flops_per_token


def host_bytes_per_row(cfg: Config) -> int:
  """d x export.dtype bytes, or d + 4 for an int8/fp8 store (values + float32 scale)."""
  d = cfg.model.d_model
  if cfg.export.quant != 'none':
    return d + QUANT_SCALE_BYTES
  return d * _BYTES[cfg.export.dtype]


def account(cfg: Config, vocab_size: int | None = None, measured: float | None = None,
            table_rows: int | None = None) -> ArmAccounting:
  """Every parameter, memory and FLOPs figure of the arm `cfg` describes, at its own scale.

  Args:
    cfg: a resolved Config.
    vocab_size: as in `flops.param_counts`.
    measured: a measured A_f tokens per main-model token (the mean of a run's logged
      batch/fgram_af_tokens_per_token, or a dry run's --af_tokens_per_token): fills the
      *_measured figures.
    table_rows: the mined table's rows when known (W/run.json `fgram_table_rows`): S is
      then cfg.fgram.rows_used(table_rows) instead of what the config requests.
  """
  fm, m = cfg.fgram_model, cfg.model
  d = m.d_model
  counts = flops_lib.param_counts(cfg, vocab_size, table_rows)
  per_token = flops_lib.flops_per_token(cfg, vocab_size)
  on = fm.enabled
  rows = counts.offloaded_rows
  side, gate = counts.fgram_total, counts.combine_gate
  param_bytes = _BYTES[m.param_dtype]
  train_params = counts.backbone_total + side + gate
  infer_params = counts.backbone_total
  row_bytes = host_bytes_per_row(cfg) if rows else 0
  at_rate = (flops_lib.flops_per_token(cfg, vocab_size, measured)
             if measured is not None else None)
  tc = cfg.train
  return ArmAccounting(
      kind=fm.kind if on else 'baseline', combine=fm.combine if on else '-',
      quant=cfg.export.quant if on else '-',
      num_fgrams=flops_lib.num_fgrams(cfg, table_rows), fgram_max_len=cfg.fgram.max_len,
      af_layers=fm.num_layers, train_tokens=tc.steps * tc.batch_size * tc.seq_len,
      seq_len=tc.seq_len,
      backbone_params=counts.backbone_total, side_params=side, gate_params=gate,
      train_accel_params=train_params,
      train_accel_bytes=TRAIN_COPIES * train_params * param_bytes,
      infer_accel_params=infer_params, infer_accel_bytes=infer_params * param_bytes,
      # K and V [L, S, k, e] (k e = d without grouped-query attention or head_dim).
      kv_bytes_per_seq=(2 * m.num_layers * m.max_seq_len * m.kv_heads * m.head_size *
                        _BYTES[m.dtype]),
      host_rows=rows, host_bytes_per_row=row_bytes, host_bytes=rows * row_bytes,
      offloaded_params=counts.offloaded,
      train_flops_backbone=per_token.train_backbone,
      train_flops_af=per_token.train_fgram,
      af_tokens_per_token=per_token.af_tokens_per_token,
      train_flops_per_token=per_token.train_total,
      combine_flops_per_token=float(
          combine_lib.extra_decode_flops_per_token(fm.combine, d) if on else 0),
      # Dequantisation: one multiply by the row's scale per value.
      dequant_flops_per_token=float(d if on and cfg.export.quant != 'none' else 0),
      af_tokens_per_token_measured=at_rate.af_tokens_per_token if at_rate else None,
      train_flops_af_measured=at_rate.train_fgram if at_rate else None,
      train_flops_per_token_measured=at_rate.train_total if at_rate else None,
      infer_flops_backbone=per_token.inference)


class TableMemoryError(UserError, MemoryError):
  """A kind='table' run whose trained rows cannot fit the devices' memory."""


def check_table_fits(cfg: Config, table_rows: int, mesh: jax.sharding.Mesh,
                     device_bytes: int, source: str) -> None:
  """kind='table': refuses, before any work, a table whose trained rows (params, their
  gradients and AdamW's moments: `account`'s TRAIN_COPIES) take more than one device's
  memory once split as the sharding rules split them on `mesh`.

  Args:
    cfg: the run's config.
    table_rows: the mined table's rows (S = cfg.fgram.rows_used(table_rows)).
    mesh: the training mesh.
    device_bytes, source: one device's memory and where that figure comes from
      (`mesh.device_memory`).

  Raises:
    TableMemoryError: naming the bytes needed and a mesh of these devices that would fit
      (or how many devices it needs).
  """
  counts = flops_lib.param_counts(cfg, table_rows=table_rows)
  d = cfg.model.d_model
  rows = counts.trained_rows // d  # P: S padded (trained_table.padded_rows).
  total = TRAIN_COPIES * counts.trained_rows * _BYTES[cfg.model.param_dtype]
  spec = sharding.logical_to_spec(('fgram_rows', 'embed'), (rows, d), mesh, partial=True)
  split = sharding.shard_count(spec, mesh)
  if total <= device_bytes * split:
    return
  need = -(-total // device_bytes)
  fits = next((n for n in range(need, mesh.size + 1)
               if mesh.size % n == 0 and rows % n == 0), None)
  fix = (f'set --config.mesh.fsdp={fits} --config.mesh.tensor=1 (data = devices / '
         f'{fits}): {-(-total // fits):,} bytes per device' if fits else
         f'no mesh of these {mesh.size} devices fits it: it needs at least {need} devices '
         'of this memory on mesh.fsdp, or a smaller fgram.use_size')
  raise TableMemoryError(
      f"config.fgram_model.kind='table': the [{rows:,}, {d}] {cfg.model.param_dtype} rows "
      f'with their gradients and AdamW moments need {total:,} bytes, {-(-total // split):,} '
      f'per device split {split} ways on mesh {dict(mesh.shape)}: more than one device\'s '
      f'{device_bytes:,} bytes ({source}). To fit, {fix}')


def run_columns(a: ArmAccounting) -> dict[str, Any]:
  """`a` as the per-run accounting columns of results.csv and the dry run's first table.

  accel_params is what sits on the accelerator at inference (equal for SCONE and its
  backbone); offloaded_params the exported store (S d, or (n - 1) m d for hashed);
  af_params the trained f-gram side (A_f, or the table / hashed rows). A_f's training cost
  is per main-model token and per sequence (train.seq_len tokens) at the WORST case
  (af_tok_per_tok_worst = K: every position a distinct K-gram) and, when `a` has a
  measured rate, at that rate (*_measured columns). infer_flops includes the decode
  step's elementwise extras (combine rule, dequantisation).
  """
  row = {
      'accel_params': a.infer_accel_params,
      'offloaded_params': a.offloaded_params,
      'af_params': a.side_params,
      'train_flops_backbone': a.train_flops_backbone,
      'train_flops_af': a.train_flops_af,
      'af_tok_per_tok_worst': a.af_tokens_per_token,
      'train_flops_seq_worst': a.train_flops_per_token * a.seq_len,
      'infer_flops': a.infer_flops_per_token,
      # What the paper's tables vary, so a dry run can be checked against them.
      'af_layers': a.af_layers,
      'S': a.num_fgrams,
      'K': a.fgram_max_len,
      'train_tokens': a.train_tokens,
  }
  if a.af_tokens_per_token_measured is not None:
    row.update(af_tok_per_tok_measured=a.af_tokens_per_token_measured,
               train_flops_af_measured=a.train_flops_af_measured,
               train_flops_seq_measured=a.train_flops_per_token_measured * a.seq_len)
  return row


def arm_columns(a: ArmAccounting) -> dict[str, Any]:
  """`a` as the per-arm resource columns (the dry run's second table, REPORT.md's
  "Resources per arm")."""
  return {'kind': a.kind, 'combine': a.combine, 'quant': a.quant, 'S': a.num_fgrams,
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
