"""Choosing the next token from logits: greedy, temperature, top-k and top-p, on the
device (the decode step and the on-device loop call `sample` inside jit)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding rule: temperature 0 is greedy; top_k 0 and top_p 1.0 disable the filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  # Ids the tokenizer can decode: a model trained with model.vocab_size above the
  # tokenizer's has logits for ids no text maps to; they are never sampled. 0 = all.
  vocab_size: int = 0

  def __post_init__(self):
    if self.vocab_size < 0:
      raise ValueError(f'vocab_size={self.vocab_size} must be >= 0 (0 = every logit)')
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1 = off)')


def sample(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token per row under `sampling`; int32 [B]."""
  if 0 < sampling.vocab_size < logits_BxV.shape[-1]:
    ids_V = jnp.arange(logits_BxV.shape[-1])
    logits_BxV = jnp.where(ids_V < sampling.vocab_size, logits_BxV, -jnp.inf)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k > 0:
    k = min(sampling.top_k, logits_BxV.shape[-1])
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if sampling.top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_Bx1 = jnp.min(jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf),
                         axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
