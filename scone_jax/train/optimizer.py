"""AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay applies to every parameter of rank >= 2 (projection kernels AND the
embedding tables: the token table T, the position tables, A_f's position table), the
GPT-2 / nanoGPT convention the paper's WebText runs follow. Rank-1 parameters (norm
scales, biases) are never decayed: shrinking a LayerNorm scale toward 0 or a bias toward 0
is not a useful prior. The rule is by rank, not by name, so it holds for every backbone
family without a list of module names to keep in sync.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from scone_jax.config import ConfigError, TrainConfig


def learning_rate_schedule(train_cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to peak over warmup_steps, then cosine to lr_end_ratio * peak.

  Indexed by the number of updates already applied (optax's count), shifted by one so the
  first update uses peak / warmup_steps (not 0: a wasted step) and the last update,
  count = steps - 1, uses exactly lr_end_ratio * peak.
  """
  peak = train_cfg.learning_rate
  warmup = min(train_cfg.warmup_steps, train_cfg.steps)
  if not 0.0 <= train_cfg.lr_end_ratio <= 1.0:
    raise ConfigError(f'config.train.lr_end_ratio={train_cfg.lr_end_ratio} must be in [0, 1]')
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      # optax counts decay_steps from step 0, including the warmup.
      decay_steps=max(train_cfg.steps, warmup + 1),
      end_value=peak * train_cfg.lr_end_ratio)
  return lambda count: base(count + 1)


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay (rank >= 2, see the module docstring)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW(schedule, masked decay). Gradients arrive already averaged
  over the whole global batch (accumulation happens in the train step)."""
  if train_cfg.grad_clip < 0:
    raise ConfigError(f'config.train.grad_clip={train_cfg.grad_clip} must be >= 0 (0 = off)')
  if train_cfg.fgram_model_lr_scale < 0:
    raise ConfigError(f'config.train.fgram_model_lr_scale={train_cfg.fgram_model_lr_scale} '
                      'must be >= 0 (1 = the paper\'s joint training at one learning rate)')
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
      eps=train_cfg.eps, weight_decay=train_cfg.weight_decay, mask=decay_mask)
  if train_cfg.fgram_model_lr_scale != 1.0:
    adamw = optax.chain(adamw, _scale_fgram_model(train_cfg.fgram_model_lr_scale))
  if train_cfg.grad_clip == 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)


def _scale_fgram_model(scale: float) -> optax.GradientTransformation:
  """Multiplies the updates (decay included) of A_f's own parameters by `scale`.

  Only parameters under the model's `fgram_model` attribute: the token table T is shared
  with the backbone and keeps the full rate.
  """
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * scale if "['fgram_model']" in jax.tree_util.keystr(path) else u,
        updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
