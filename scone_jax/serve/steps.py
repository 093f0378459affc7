"""The jitted prefill and decode step, and the decode-time embedding rule they share with
the device loop (serve/device_loop.py).

Dimension letters: B batch, T padded prompt length, D d_model, W the stored row width (D;
D + 4 for a quantised store, export/quant.py), E = W + 1 (a slab row: the stored row, then
the match flag), V vocab.

Each step takes token ids plus a host-made slab of f-gram rows and computes
x = combine(T(token), slab, flag, rule) on the device (`model.combine.combine` with the
store's rule: where(flag, slab, T(token)) for 'replace', where(flag, T(token) + slab,
T(token)) for 'add', D more adds per token); the baseline passes no slab. Only the
backbone's parameters go to the accelerator: A_f was folded into the exported store, so a
SCONE step costs what the baseline's does (tests assert XLA's FLOP counts agree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scone_jax.export import quant
from scone_jax.model import Backbone, KVCache
from scone_jax.model import combine as combine_lib
from scone_jax.serve.sampling import Sampling, sample


def inputs(backbone: Backbone, tokens_BxT: jax.Array, slab_BxTxW: jax.Array,
           mask_BxT: jax.Array, rule: str = 'replace') -> jax.Array:
  """The combine rule (model/combine.py) with precomputed f-gram rows: `rule` is the
  store's (`combine.stored_rule`): where mask, slab ('replace') or T(token) + slab
  ('add': combine add / gate, and kind='hashed', serve/hashed.py; D adds per token more
  than 'replace'), else T(token).

  slab_BxTxW holds the store's rows as gathered: W = D, or D + 4 for a quantised store,
  dequantised here on the device (its int8/fp8 dtype says so at trace time; D converts
  and D multiplies per position, the step's only extra over the baseline's:
  quant.dequant_xla_flops_per_row).
  """
  x_BxTxD = backbone.embed(tokens_BxT)
  slab_BxTxD = quant.dequantize(slab_BxTxW, x_BxTxD.shape[-1])
  return combine_lib.combine(x_BxTxD, slab_BxTxD, mask_BxT, rule)


def _prefill(graphdef, sampling: Sampling, all_logits: bool, state, tokens_BxT, slab_BxTxE,
             lengths_B, cache: KVCache, key, combine: str = 'replace'):
  """slab_BxTxE: the prompts' f-gram rows with the match flag last (None: baseline)."""
  backbone = nnx.merge(graphdef, state)
  if slab_BxTxE is None:
    x_BxTxD = backbone.embed(tokens_BxT)
  else:
    x_BxTxD = inputs(backbone, tokens_BxT, slab_BxTxE[..., :-1], slab_BxTxE[..., -1] > 0,
                     combine)
  logits_BxTxV, cache = backbone.prefill(x_BxTxD, lengths_B, cache)
  last_BxV = jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return (logits_BxTxV if all_logits else last_BxV), sample(last_BxV, key, sampling), cache


def _decode(graphdef, sampling: Sampling, state, token_B, slab_BxE, cache: KVCache, key,
            step, combine: str = 'replace'):
  backbone = nnx.merge(graphdef, state)
  mask_B = slab_BxE[:, -1] > 0
  x_Bx1xD = inputs(backbone, token_B[:, None], slab_BxE[:, None, :-1], mask_B[:, None],
                   combine)
  logits_Bx1xV, cache = backbone.decode(x_Bx1xD, cache)
  next_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, step), sampling)
  return logits_Bx1xV[:, 0], next_B, cache


# Module level, so decoders of one model shape share compilations.
PREFILL = jax.jit(_prefill, static_argnums=(0, 1, 2), static_argnames=('combine',),
                  donate_argnames=('cache',))
DECODE = jax.jit(_decode, static_argnums=(0, 1), static_argnames=('combine',),
                 donate_argnames=('cache',))
