"""Inference accounting: what sits on the accelerator, what is offloaded, FLOPs per token.

The paper's claim is that SCONE's extra capacity is free at inference: the accelerator
holds the backbone only, the f-gram embeddings live in host RAM or on disk, and a decode
step costs the backbone's FLOPs (plus a stated elementwise extra for the add / gate rules,
hashed tables and quantised stores). `generate --accounting_only` prints those numbers for
a decoder: the analytical figures from model/arm_accounting.py (the same `ArmAccounting`
the sweep dry run and the report print), what the decoder's arrays and opened store hold,
and XLA's count of the compiled step; plus what TRAINING cost per token: A_f at the worst
case (K A_f tokens per main-model token) and at the run's measured rate (the mean of its
logged batch/fgram_af_tokens_per_token).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from scone_jax import compat
from scone_jax import metrics_file
from scone_jax.config import Config
from scone_jax.model import arm_accounting
from scone_jax.run import RunDir
from scone_jax.serve.decode import Decoder

AF_RATE_KEY = 'batch/fgram_af_tokens_per_token'

# Labels of the analytical figures (`figure_rows`); tests/test_accounting.py reads them.
ACCEL_PARAMS = 'accelerator params, analytical'
SIDE_PARAMS = 'f-gram side params (A_f / table / hashed; train/export only)'
HOST_ROWS = 'offloaded store rows, analytical'
INFER_FLOPS = 'inference FLOPs/token (analytical, elementwise extras included)'
TRAIN_WORST = 'train FLOPs/token, A_f worst case'
TRAIN_MEASURED = 'train FLOPs/token, A_f measured'


@dataclasses.dataclass(frozen=True)
class Accounting:
  """Inference-time resources of one run (baseline runs have no offloaded store)."""
  arm: arm_accounting.ArmAccounting  # Every analytical figure.
  accelerator_params: int  # Counted from the decoder's arrays (the backbone only).
  accelerator_bytes: int
  offloaded_params: int  # The opened store's rows x d (0 for a baseline).
  offloaded_bytes: int  # In the store's dtype.
  store_tier: str  # 'ram' | 'disk' | 'none'
  xla_flops_per_token: float  # compiled decode step / batch (context = cache length)
  batch_size: int
  cache_len: int

  def table(self) -> str:
    """A plain-text table for the CLI."""
    rows = [('accelerator params (decoder arrays)', f'{self.accelerator_params:,}',
             f'{self.accelerator_bytes / 2**20:,.1f} MiB'),
            (f'offloaded f-gram store ({self.store_tier})', f'{self.offloaded_params:,}',
             f'{self.offloaded_bytes / 2**20:,.1f} MiB'),
            (f'XLA decode FLOPs/token (B={self.batch_size}, context={self.cache_len})',
             f'{self.xla_flops_per_token:.4g}', '')]
    return format_rows(figure_rows(self.arm) + rows)


def figure_rows(arm: arm_accounting.ArmAccounting) -> list[tuple[str, str, str]]:
  """The analytical figures `generate --accounting_only` prints, as (label, value, note)."""
  rows = [
      (ACCEL_PARAMS, f'{arm.infer_accel_params:,}',
       f'{arm.infer_accel_bytes / 2**20:,.1f} MiB'),
      (SIDE_PARAMS, f'{arm.side_params:,}', ''),
      (HOST_ROWS, f'{arm.host_rows:,}', f'{arm.host_bytes / 2**20:,.1f} MiB'),
      (INFER_FLOPS, f'{arm.infer_flops_per_token:.4g}',
       f'{arm.elementwise_flops_per_token:g} elementwise'),
      (TRAIN_WORST, f'{arm.train_flops_per_token:.4g}', ''),
  ]
  if arm.af_tokens_per_token_measured is not None:
    rows.append((TRAIN_MEASURED, f'{arm.train_flops_per_token_measured:.4g}',
                 f'{arm.af_tokens_per_token_measured:.3f} A_f tokens per token'))
  return rows


def format_rows(rows: list[tuple[str, str, str]]) -> str:
  width = max(len(r[0]) for r in rows)
  return '\n'.join(f'{a:<{width}}  {b:>18}  {c}' for a, b, c in rows)


def measured_af_tokens_per_token(workdir: str) -> float | None:
  """Mean of batch/fgram_af_tokens_per_token over the run's W/metrics.jsonl, local or
  gs:// (None if the run logged none, e.g. a baseline or a run from before it was logged)."""
  return metrics_file.mean(RunDir(workdir).metrics(), AF_RATE_KEY)


def account(cfg: Config, decoder: Decoder, vocab_size: int,
            af_tokens_per_token: float | None = None) -> Accounting:
  """Accounting for `decoder` (built from the run configured by `cfg`); the training rows
  use `af_tokens_per_token` (measured) when given."""
  leaves = jax.tree.leaves(decoder.state)
  store = decoder.store
  # A network / table store holds the S rows the run used, so S = rows_used(its rows).
  arm = arm_accounting.account(cfg, vocab_size, af_tokens_per_token,
                               table_rows=store.num_rows if store else None)
  return Accounting(
      arm=arm,
      accelerator_params=int(sum(np.prod(x.shape) for x in leaves)),
      accelerator_bytes=int(sum(x.nbytes for x in leaves)),
      offloaded_params=store.num_rows * store.d_model if store else 0,
      offloaded_bytes=store.nbytes if store else 0,
      store_tier=store.tier if store else 'none',
      xla_flops_per_token=compat.cost_flops(decoder.compiled_decode_step()) /
      decoder.batch_size,
      batch_size=decoder.batch_size,
      cache_len=decoder.cache_len)
