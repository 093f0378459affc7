"""Inference accounting: what sits on the accelerator, what is offloaded, FLOPs per token.

The paper's claim is that SCONE's extra capacity is free at inference: the accelerator
holds the backbone only, the f-gram embeddings live in host RAM or on disk, and a decode
step costs the backbone's FLOPs. This module reports those numbers for a decoder, both
analytically (`scone_jax.model.flops`) and as XLA counts them in the compiled step, next to
what TRAINING cost per token: A_f at the worst case (K A_f tokens per main-model token) and
at the run's measured rate (the mean of its logged batch/fgram_af_tokens_per_token).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from scone_jax import compat
from scone_jax.config import Config
from scone_jax.model import flops as flops_lib
from scone_jax.serve.decode import Decoder


@dataclasses.dataclass(frozen=True)
class Accounting:
  """Inference-time resources of one run (baseline runs have no offloaded table)."""
  accelerator_params: int  # Counted from the decoder's arrays (the backbone only).
  accelerator_bytes: int
  analytical_accelerator_params: int  # flops.param_counts(cfg).backbone_total
  # A_f (or the rows of kind='table'): needed to train and export, never at inference.
  fgram_model_params: int
  offloaded_params: int  # S x d, 0 for a baseline.
  offloaded_bytes: int  # In the store's dtype.
  store_tier: str  # 'ram' | 'disk' | 'none'
  analytical_flops_per_token: float  # flops_per_token(cfg).inference (context seq_len)
  xla_flops_per_token: float  # compiled decode step / batch (context = cache length)
  batch_size: int
  cache_len: int
  train_flops_per_token_worst: float  # Backbone + A_f at K A_f tokens per main-model token.
  af_tokens_per_token_measured: float | None  # From the run's metrics (None: not logged).
  train_flops_per_token_measured: float | None

  def table(self) -> str:
    """A plain-text table for the CLI."""
    rows = [
        ('accelerator params (backbone)', f'{self.accelerator_params:,}',
         f'{self.accelerator_bytes / 2**20:,.1f} MiB'),
        ('  analytical (flops.param_counts)', f'{self.analytical_accelerator_params:,}', ''),
        ('f-gram side params (A_f / table; train/export only)',
         f'{self.fgram_model_params:,}', ''),
        (f'offloaded f-gram table ({self.store_tier})', f'{self.offloaded_params:,}',
         f'{self.offloaded_bytes / 2**20:,.1f} MiB'),
        ('inference FLOPs/token (analytical)', f'{self.analytical_flops_per_token:.4g}', ''),
        (f'XLA decode FLOPs/token (B={self.batch_size}, S={self.cache_len})',
         f'{self.xla_flops_per_token:.4g}', ''),
        ('train FLOPs/token, A_f worst case', f'{self.train_flops_per_token_worst:.4g}', ''),
    ]
    if self.af_tokens_per_token_measured is not None:
      rows.append(('train FLOPs/token, A_f measured',
                   f'{self.train_flops_per_token_measured:.4g}',
                   f'{self.af_tokens_per_token_measured:.3f} A_f tokens per token'))
    width = max(len(r[0]) for r in rows)
    return '\n'.join(f'{a:<{width}}  {b:>18}  {c}' for a, b, c in rows)


def measured_af_tokens_per_token(workdir: str) -> float | None:
  """Mean of batch/fgram_af_tokens_per_token over the run's W/metrics.jsonl (None if the
  run logged none, e.g. a baseline or a run from before it was logged)."""
  values = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          value = json.loads(line).get('batch/fgram_af_tokens_per_token')
        except json.JSONDecodeError:
          continue  # A run killed mid-write leaves a partial last line.
        if value is not None and math.isfinite(value):
          values.append(value)
  return sum(values) / len(values) if values else None


def account(cfg: Config, decoder: Decoder, vocab_size: int,
            af_tokens_per_token: float | None = None) -> Accounting:
  """Accounting for `decoder` (built from the run configured by `cfg`); the training rows
  use `af_tokens_per_token` (measured) when given."""
  worst = flops_lib.flops_per_token(cfg, vocab_size)
  measured = (flops_lib.flops_per_token(cfg, vocab_size, af_tokens_per_token)
              if af_tokens_per_token is not None else None)
  counts = flops_lib.param_counts(cfg, vocab_size)
  leaves = jax.tree.leaves(decoder.state)
  store = decoder.store
  flops_step = compat.cost_flops(decoder.compiled_decode_step())
  return Accounting(
      accelerator_params=int(sum(np.prod(x.shape) for x in leaves)),
      accelerator_bytes=int(sum(x.nbytes for x in leaves)),
      analytical_accelerator_params=counts.backbone_total,
      fgram_model_params=counts.fgram_total,
      offloaded_params=store.num_rows * store.d_model if store else 0,
      offloaded_bytes=store.nbytes if store else 0,
      store_tier=store.tier if store else 'none',
      analytical_flops_per_token=flops_lib.flops_per_token(cfg, vocab_size).inference,
      xla_flops_per_token=flops_step / decoder.batch_size,
      batch_size=decoder.batch_size,
      cache_len=decoder.cache_len,
      train_flops_per_token_worst=worst.train_total,
      af_tokens_per_token_measured=af_tokens_per_token,
      train_flops_per_token_measured=measured.train_total if measured else None)
