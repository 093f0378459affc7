"""The token loss, shared by the train step and held-out evaluation.

Dimension letters: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weight * token cross-entropy, sum of weights), in float32.

  Sums rather than a mean so microbatches and data shards combine exactly: the loss of the
  whole batch is sum(loss_sums) / sum(weight_sums) however the batch was split.
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  weights_BxT = weights_BxT.astype(jnp.float32)
  return jnp.sum((logz_BxT - target_logit_BxT) * weights_BxT), jnp.sum(weights_BxT)
