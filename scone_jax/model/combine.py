"""How the f-gram embedding joins the token embedding: the ONE rule of training and serving.

Dimension letters: B batch, T length (1 in a decode step), D d_model, U f-grams.

`fgram_model.combine` (config.FgramModelConfig) at a position i that has an f-gram
embedding e (A_f's output, or a table row for kind='table'); elsewhere x = T(x_i):
  replace  x = e                                  (the paper's rule)
  add      x = T(x_i) + e
  gate     x = T(x_i) + sigmoid(g) * (e - T(x_i)) (g: a learned per-channel gate, [D])

`combine` applies the rule. The training forward (`SconeLM.input_embeddings`) calls it
with the run's mode; every decode step (serve/steps.py prefill and step, serve/
device_loop.py) calls it with `stored_rule(mode)` on the rows of the exported store,
which `store_rows` computes from e at export:
  replace  store e;                    step: where(mask, row, T(x_i))      (the baseline's
                                                                            select)
  add      store e;                    step: where(mask, T(x_i) + row, T(x_i))
  gate     store sigmoid(g) * (e - T(last token));  step: as add
At a matched position x_i IS the f-gram's last token, so the gate's whole f-gram-dependent
term is known at export and the step never sees g: gate costs the decode step what add
does. Extra elementwise FLOPs per decoded token over the baseline's step:
`extra_decode_flops_per_token` (0 for replace, D adds for add and gate): the one
statement of it, which model/arm_accounting.py adds to every printed inference figure
and tests/test_accounting_arms.py checks against XLA's count of each arm's step.

Starting points: replace and gate start at the baseline's function whenever e starts at
T(x_i) (A_f's identity init; kind='table' rows initialised to T(last token)). add starts
there only when e starts at 0: kind='table' initialises its rows to 0 for add, but A_f's
identity init gives x = 2 T(x_i) at matched positions at step 0 (stated, not changed:
the A_f arm keeps one init for every combine mode).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from scone_jax.config import COMBINES, stored_rule  # noqa: F401  (the one rule, re-exported)

Combine = Literal['replace', 'add', 'gate']
# The gate's init: g = 0, sigmoid(g) = 1/2, the sigmoid's steepest point, so the gate moves
# toward either side fastest. At step 0 e = T(x_i) anyway (A_f's identity init, the
# table's T(last) init), so the gate's value does not change the starting function.
GATE_INIT = 0.0


def combine(x_BxTxD: jax.Array, e_BxTxD: jax.Array, mask_BxT: jax.Array, mode: str,
            gate_D: jax.Array | None = None) -> jax.Array:
  """x where mask is False; the `mode` rule of T(x_i) = x and e where it is True.

  e is cast to x's dtype first; the gate's arithmetic runs in that dtype too, so a
  float32 model computes exactly what export + decode compute (same ops, same order).
  """
  e_BxTxD = e_BxTxD.astype(x_BxTxD.dtype)
  if mode == 'replace':
    joined_BxTxD = e_BxTxD
  elif mode == 'add':
    joined_BxTxD = x_BxTxD + e_BxTxD
  elif mode == 'gate':
    if gate_D is None:
      raise ValueError("combine='gate' needs the gate's logits g [D]")
    joined_BxTxD = x_BxTxD + gate_weight(gate_D, x_BxTxD.dtype) * (e_BxTxD - x_BxTxD)
  else:
    raise ValueError(f'combine={mode!r} is not one of {list(COMBINES)}')
  return jnp.where(mask_BxT[..., None], joined_BxTxD, x_BxTxD)


def gate_weight(gate_D: jax.Array, dtype) -> jax.Array:
  """sigmoid(g) in `dtype` (computed in float32)."""
  return jax.nn.sigmoid(gate_D.astype(jnp.float32)).astype(dtype)


def store_rows(e_UxD: jax.Array, last_UxD: jax.Array, mode: str,
               gate_D: jax.Array | None = None) -> jax.Array:
  """What the exported store holds for f-grams with embeddings e_UxD whose last tokens
  embed to last_UxD = T(last token): e (replace, add) or sigmoid(g) * (e - T(last))
  (gate), so that `combine(T, row, mask, stored_rule(mode))` equals the training rule."""
  if mode == 'gate':
    e_UxD = e_UxD.astype(last_UxD.dtype)
    return gate_weight(gate_D, last_UxD.dtype) * (e_UxD - last_UxD)
  stored_rule(mode)  # Validates the mode.
  return e_UxD


def extra_decode_flops_per_token(mode: str, d_model: int) -> int:
  """Elementwise FLOPs a decode step spends per token over the baseline's (replace's)
  step: the D adds of T(x_i) + row for add and gate (gate's multiply is in the store)."""
  return 0 if stored_rule(mode) == 'replace' else d_model
