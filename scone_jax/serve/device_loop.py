"""Generation as an on-device loop: sampling, stopping and the f-gram lookup inside jit.

Dimension letters: B batch, C steps per chunk, D d_model, E = D + 1 (slab row: f-gram
row, then the match flag), V vocab.

One jitted call runs up to C decode steps in a `lax.while_loop` with the KV cache as loop
state: each step embeds the last token (SCONE: asks the host store for its f-gram row,
see below), runs `Backbone.decode`, samples (greedy / temperature / top-k / top-p, the
same `sample` as the host loop, keyed by the output column) and marks rows that emitted
EOS. The loop exits early when every row is done or `max_new_tokens` is reached. Tokens
come back in chunks: the host dispatches chunk k + 1 before reading chunk k, so reading
and bookkeeping overlap device work, and the host never waits between steps.

The f-gram lookup of a step needs the token sampled by the previous one, so it runs inside
the loop, on the host's data, through one of:
  'native'    an XLA FFI call into the compiled match + gather kernel (serve/
              native_lookup.py): CPU backend, 'ram' tier. ~1 us at B = 1.
  'callback'  `jax.experimental.io_callback` into `Decoder.step_slab` (any backend, any
              tier). Costs a device -> host -> device round trip per step (~200 us on
              the CPU backend, mostly the thread hand-off).
  'cache'     the match on the device, the hottest rows resident there, the host asked
              only for cache misses (serve/device_cache.py); the loop's token state is
              then (token_B, matcher state codes_BxL).
  'none'      the baseline: the step embeds the token with T only.
All three run the same step (`decode._inputs` + `Backbone.decode`), so SCONE's per-step
FLOPs equal the baseline's (tests compare XLA's counts), plus D adds per token for the
combine modes 'add' / 'gate' (`combine`, model/combine.py).
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from scone_jax.export import quant
from scone_jax.model import KVCache
from scone_jax.serve.sampling import sample

Lookup = Literal['none', 'native', 'callback', 'cache']

# io_callback targets by handle: the handle is a traced operand, so every decoder of one
# shape shares one compilation (a Python callable captured in the trace would not).
_CALLBACKS: dict[int, Callable[[np.ndarray], np.ndarray]] = {}


def register_callback(step_slab) -> int:
  """Registers a bound `Decoder.step_slab` for the 'callback' lookup; returns its handle."""
  ref = weakref.WeakMethod(step_slab)
  handle = len(_CALLBACKS)
  _CALLBACKS[handle] = lambda token_B: ref()(token_B)
  return handle


def _host_slab(handle, token_B):
  return _CALLBACKS[int(handle)](np.asarray(token_B))


def _lookup_slab(lookup: Lookup, target: str, operand, token_B, d_model: int, dtype):
  """slab_BxE of the f-gram rows for token_B (the token each row just produced)."""
  out = jax.ShapeDtypeStruct((token_B.shape[0], d_model + 1), dtype)
  if lookup == 'native':
    from scone_jax.serve import native_lookup  # pylint: disable=g-import-not-at-top
    return native_lookup.slab_call(operand, target, token_B, d_model, dtype)
  # Unordered: the token's data dependence already orders the calls.
  return io_callback(_host_slab, out, operand, token_B, ordered=False)


def decode_chunk(graphdef, sampling, lookup: Lookup, target: str, chunk: int, slab_dtype,
                 state, operand, token_B, cache: KVCache, done_B, emitted, limit, eos_id,
                 key, combine: str = 'replace'):
  """Up to `chunk` decode steps on the device.

  combine (static): how the slab joins T(token), as in decode._inputs (the store's rule,
  model/combine.stored_rule: 'add' for combine add / gate and for kind='hashed').

  Args (traced): token_B the last emitted token per row ('cache': the pair (token_B,
  codes_BxL), see serve/device_cache.py); done_B rows that emitted EOS;
  emitted the tokens emitted per row so far (the prefill's counts as 1); limit
  max_new_tokens; eos_id (-1: none); key the generation's key (step n samples with
  fold_in(key, n), as the host loop does).

  Returns:
    (tokens_BxC: the new tokens in columns [0, emitted' - emitted), token_B, cache,
    done_B, emitted').
  """
  from scone_jax.serve.decode import _inputs  # pylint: disable=g-import-not-at-top
  backbone = nnx.merge(graphdef, state)
  d = backbone.cfg.d_model

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < chunk) & (emitted + i < limit) & ~jnp.all(done)

  def body(carry):
    i, tok_B, codes_BxL, cache, done, out_BxC = carry
    if lookup == 'none':
      x_Bx1xD = backbone.embed(tok_B[:, None])
    elif lookup == 'cache':
      from scone_jax.serve import device_cache  # pylint: disable=g-import-not-at-top
      slab_BxE, codes_BxL = device_cache.lookup(operand, target, tok_B, codes_BxL,
                                                quant.row_width(d, slab_dtype), slab_dtype)
      x_Bx1xD = _inputs(backbone, tok_B[:, None], slab_BxE[:, None, :-1],
                        slab_BxE[:, -1:] > 0, combine)
    else:
      slab_BxE = _lookup_slab(lookup, target, operand, tok_B,
                              quant.row_width(d, slab_dtype), slab_dtype)
      x_Bx1xD = _inputs(backbone, tok_B[:, None], slab_BxE[:, None, :-1],
                        slab_BxE[:, -1:] > 0, combine)
    logits_Bx1xV, cache = backbone.decode(x_Bx1xD, cache)
    nxt_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, emitted + i), sampling)
    out_BxC = jax.lax.dynamic_update_slice(out_BxC, nxt_B[:, None], (0, i))
    return i + 1, nxt_B, codes_BxL, cache, done | (nxt_B == eos_id), out_BxC

  token_B, codes_BxL = token_B if lookup == 'cache' else (token_B, jnp.zeros((), jnp.int32))
  b = token_B.shape[0]
  # The prefill's token may itself be EOS: checked here, not by a separate host dispatch.
  done_B = done_B | (token_B == eos_id)
  init = (jnp.int32(0), token_B, codes_BxL, cache, done_B, jnp.zeros((b, chunk), jnp.int32))
  steps, token_B, codes_BxL, cache, done_B, out_BxC = jax.lax.while_loop(cond, body, init)
  if lookup == 'cache':
    token_B = (token_B, codes_BxL)
  return out_BxC, token_B, cache, done_B, emitted + steps


DECODE_CHUNK = jax.jit(decode_chunk, static_argnums=(0, 1, 2, 3, 4, 5),
                       static_argnames=('combine',), donate_argnames=('cache',))


class ChunkRunner:
  """Runs `DECODE_CHUNK` calls back to back for one generation, reading each chunk while
  the next one runs; `run` returns the [B, n] tokens (n = emitted, the prefill's first)."""

  def __init__(self, compiled, first_B: jax.Array, cache: KVCache, eos_id: int | None,
               max_new_tokens: int, chunk: int, token_state=None):
    """token_state: the loop's first token state if not first_B ('cache': (first_B,
    codes_BxL))."""
    self._compiled, self._chunk = compiled, chunk
    self._token_state = first_B if token_state is None else token_state
    self._eos = np.int32(-1 if eos_id is None else eos_id)
    self._limit = np.int32(max_new_tokens)
    self._first_B, self._cache = first_B, cache

  def run(self) -> tuple[np.ndarray, int]:
    """(tokens_BxN of the generation, decode steps run)."""
    token_B, cache = self._token_state, self._cache
    # Host numpy arguments: passed with the call, no extra device dispatches.
    done_B = np.zeros(self._first_B.shape, bool)
    emitted = np.int32(1)
    cols = [np.asarray(self._first_B)[:, None]]
    pending = self._compiled(token_B, cache, done_B, emitted, self._limit, self._eos)
    reach = 1 + self._chunk  # Tokens emitted at most once the dispatched chunks are done.
    while pending is not None:
      out_BxC, token_B, cache, done_B, emitted = pending
      # Dispatch the next chunk before reading this one, unless this one surely ends the
      # generation at max_new_tokens; if it ends it by EOS, the next runs zero steps.
      pending = None
      if reach < self._limit:
        pending = self._compiled(token_B, cache, done_B, emitted, self._limit, self._eos)
        reach += self._chunk
      before = sum(c.shape[1] for c in cols)
      n = int(emitted)
      cols.append(np.asarray(out_BxC)[:, :n - before])
      if n - before < self._chunk:  # Stopped early: max_new_tokens or every row at EOS.
        break
    jax.block_until_ready(pending)  # The lookup state may not change under a running call.
    tokens_BxN = np.concatenate(cols, axis=1)
    return tokens_BxN, tokens_BxN.shape[1] - 1
