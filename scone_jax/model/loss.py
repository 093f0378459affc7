"""The token loss, shared by the train step and held-out evaluation.

Dimension letters: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

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


def chunked_cross_entropy_sums(project: Callable[[jax.Array], jax.Array], h_BxTxD: jax.Array,
                               targets_BxT: jax.Array, weights_BxT: jax.Array,
                               chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_sums(project(h_BxTxD), ...)` computed `chunk` positions at a time.

  `project` maps hidden states [B, C, D] to float32 logits [B, C, V]. A `lax.scan` over
  sequence chunks runs it under `jax.checkpoint`, so the backward recomputes each chunk's
  logits instead of keeping them: the [B, T, V] float32 logits (6.6 GB for GPT-2 125M at
  batch 32 x 1024) never exist, only one [B, C, V] chunk at a time. A ragged last chunk is
  padded with zero-weight positions. Equal to the unchunked sums up to summation order.
  """
  b, t, d = h_BxTxD.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    weights_BxT = jnp.pad(weights_BxT, ((0, 0), (0, pad)))
  # Chunks lead so the scan walks them: [N, B, C, ...].
  by_chunk = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sums(h_BxCxD, targets_BxC, weights_BxC):
    return cross_entropy_sums(project(h_BxCxD), targets_BxC, weights_BxC)

  def body(carry, xs):
    loss_sum, weight_sum = chunk_sums(*xs)
    return (carry[0] + loss_sum, carry[1] + weight_sum), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, weight_sum), _ = jax.lax.scan(
      body, (zero, zero), (by_chunk(h_BxTxD), by_chunk(targets_BxT), by_chunk(weights_BxT)))
  return loss_sum, weight_sum
