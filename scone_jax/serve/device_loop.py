"""Generation as an on-device loop: sampling, stopping and the f-gram lookup inside jit.

Dimension letters: B batch, C steps per chunk, D d_model, W the stored row width,
E = W + 1 (slab row: f-gram row, then the match flag), V vocab.

One jitted call runs up to C decode steps in a `lax.while_loop` with the KV cache as loop
state: each step embeds the last token (SCONE: asks the lookup for its f-gram row, see
below), runs `Backbone.decode`, samples (greedy / temperature / top-k / top-p, the same
`sample` as the host loop, keyed by the output column) and marks rows that emitted EOS.
The cache is donated to each call and carried by the loop, and `Backbone.decode` writes
only each step's new rows and reads keys only up to the filled length, so XLA updates it
in place: the compiled chunk holds no copy of it (tests/test_decode_inplace.py reads the
HLO). The loop exits early when every row is done or `max_new_tokens` is reached. Tokens
come back in chunks: the host dispatches chunk k + 1 before reading chunk k, so reading and
bookkeeping overlap device work, and the host never waits between steps.

The f-gram lookup of a step needs the token sampled by the previous one, so it runs inside
the loop as the decoder's `Lookup.loop_step` (serve/lookup.py: the host callback, the
native FFI call, or the device cache, whose matcher state the loop carries as
`lookup_state`); None is the baseline, which embeds the token with T only. Every lookup
runs the same step (`steps.inputs` + `Backbone.decode`), so SCONE's per-step FLOPs equal
the baseline's (tests compare XLA's counts), plus D adds per token for the rule 'add'
(combine add / gate, kind='hashed'; model/combine.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scone_jax.model import KVCache
from scone_jax.serve import steps
from scone_jax.serve.sampling import sample


def decode_chunk(graphdef, sampling, loop_step, chunk: int, state, operand, token_B,
                 lookup_state, cache: KVCache, done_B, emitted, limit, eos_id, key,
                 combine: str = 'replace'):
  """Up to `chunk` decode steps on the device.

  Static: loop_step, the lookup's in-loop step ((operand, token_B, lookup_state) ->
  (slab_BxE, lookup_state); None: the baseline); combine, how the slab joins T(token)
  (the store's rule, as in steps.inputs).

  Args (traced): operand the lookup's; token_B the last emitted token per row;
  lookup_state the lookup's loop state; done_B rows that emitted EOS; emitted the tokens
  emitted per row so far (the prefill's counts as 1); limit max_new_tokens; eos_id (-1:
  none); key the generation's key (step n samples with fold_in(key, n), as the host loop
  does).

  Returns:
    (tokens_BxC: the new tokens in columns [0, emitted' - emitted), token_B,
    lookup_state, cache, done_B, emitted').
  """
  backbone = nnx.merge(graphdef, state)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < chunk) & (emitted + i < limit) & ~jnp.all(done)

  def body(carry):
    i, tok_B, look, cache, done, out_BxC = carry
    if loop_step is None:
      x_Bx1xD = backbone.embed(tok_B[:, None])
    else:
      slab_BxE, look = loop_step(operand, tok_B, look)
      x_Bx1xD = steps.inputs(backbone, tok_B[:, None], slab_BxE[:, None, :-1],
                             slab_BxE[:, -1:] > 0, combine)
    logits_Bx1xV, cache = backbone.decode(x_Bx1xD, cache)
    nxt_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, emitted + i), sampling)
    out_BxC = jax.lax.dynamic_update_slice(out_BxC, nxt_B[:, None], (0, i))
    return i + 1, nxt_B, look, cache, done | (nxt_B == eos_id), out_BxC

  b = token_B.shape[0]
  # The prefill's token may itself be EOS: checked here, not by a separate host dispatch.
  done_B = done_B | (token_B == eos_id)
  init = (jnp.int32(0), token_B, lookup_state, cache, done_B,
          jnp.zeros((b, chunk), jnp.int32))
  n, token_B, lookup_state, cache, done_B, out_BxC = jax.lax.while_loop(cond, body, init)
  return out_BxC, token_B, lookup_state, cache, done_B, emitted + n


DECODE_CHUNK = jax.jit(decode_chunk, static_argnums=(0, 1, 2, 3),
                       static_argnames=('combine',), donate_argnames=('cache',))


class ChunkRunner:
  """Runs `DECODE_CHUNK` calls back to back for one generation, reading each chunk while
  the next one runs; `run` returns the [B, n] tokens (n = emitted, the prefill's first)."""

  def __init__(self, compiled, first_B: jax.Array, lookup_state, cache: KVCache,
               eos_id: int | None, max_new_tokens: int, chunk: int):
    """compiled: (token_B, lookup_state, cache, done_B, emitted, limit, eos_id) -> the
    outputs of `decode_chunk`."""
    self._compiled, self._chunk = compiled, chunk
    self._lookup_state = lookup_state
    self._eos = np.int32(-1 if eos_id is None else eos_id)
    self._limit = np.int32(max_new_tokens)
    self._first_B, self._cache = first_B, cache

  def run(self) -> tuple[np.ndarray, int]:
    """(tokens_BxN of the generation, decode steps run)."""
    token_B, look, cache = self._first_B, self._lookup_state, self._cache
    # Host numpy arguments: passed with the call, no extra device dispatches.
    done_B = np.zeros(self._first_B.shape, bool)
    emitted = np.int32(1)
    cols = [np.asarray(self._first_B)[:, None]]
    pending = self._compiled(token_B, look, cache, done_B, emitted, self._limit, self._eos)
    reach = 1 + self._chunk  # Tokens emitted at most once the dispatched chunks are done.
    while pending is not None:
      out_BxC, token_B, look, cache, done_B, emitted = pending
      # Dispatch the next chunk before reading this one, unless this one surely ends the
      # generation at max_new_tokens; if it ends it by EOS, the next runs zero steps.
      pending = None
      if reach < self._limit:
        pending = self._compiled(token_B, look, cache, done_B, emitted, self._limit,
                                 self._eos)
        reach += self._chunk
      before = sum(c.shape[1] for c in cols)
      n = int(emitted)
      cols.append(np.asarray(out_BxC)[:, :n - before])
      if n - before < self._chunk:  # Stopped early: max_new_tokens or every row at EOS.
        break
    jax.block_until_ready(pending)  # The lookup state may not change under a running call.
    tokens_BxN = np.concatenate(cols, axis=1)
    return tokens_BxN, tokens_BxN.shape[1] - 1
