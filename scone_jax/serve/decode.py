"""KV-cache decoding fed with INPUT EMBEDDINGS; the f-gram rows come from a `Lookup`.

Dimension letters: B batch (sequences), T padded prompt length, W the stored row width (D;
D + 4 for a quantised store, export/quant.py), E = W + 1 (a decode slab row: the f-gram
row, then the match flag), V vocab. `cache_len` is the KV cache's length in tokens.

One jitted prefill and one jitted decode step (serve/steps.py) serve the baseline and
SCONE: each takes token ids plus a slab of f-gram rows and a match flag and computes
x = combine(T(token), slab, flag) on the device with the store's rule. The slab comes from
the decoder's `Lookup` (serve/lookup.py), chosen once when the decoder is built
(`serve.factory.make_lookup`): the prompt's slab before the prefill, then one slab per
decode step. The prompt's lookup and transfer are issued before the prefill is dispatched,
sampled tokens stay on the device as the next step's input, and the host's bookkeeping of
token t runs while step t+1 runs on the device.

Two loops drive the steps: `loop='host'`, one jitted step per token from Python, the
lookup's `step_slab` between two steps; and the default, `loop='device'`, the same step in
an on-device `lax.while_loop` (serve/device_loop.py), with sampling, EOS and
max_new_tokens decided on the device, tokens back in chunks, and the lookup's `loop_step`
inside the loop.

With a `mesh` the same steps run tensor-parallel over a host's devices (weights and KV
cache split by model/sharding.py's table, each host slab replicated to every device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scone_jax import compat
from scone_jax.model import SconeLM
from scone_jax.model.sharding import model_shardings
from scone_jax.serve import device_loop, steps
from scone_jax.serve.factory import LookupMode, make_lookup
from scone_jax.serve.sampling import Sampling
from scone_jax.serve.store import EmbeddingStore

Loop = Literal['device', 'host']


def _on_mesh(method):
  """Runs a Decoder method with its mesh current (if it has one), so the backbone's
  activation and KV-cache constraints (model/sharding.py) apply when its steps trace."""
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with (contextlib.nullcontext() if self.mesh is None else compat.set_mesh(self.mesh)):
      return method(self, *args, **kwargs)
  return wrapper


@dataclasses.dataclass
class Generation:
  """Result of `Decoder.generate`: new tokens per prompt and where the time went."""
  tokens: list[np.ndarray]
  prefill_seconds: float
  decode_seconds: float
  # Steps timed in decode_seconds: all of them for the device loop (compiled beforehand),
  # all but the first (its compilation) for the host loop.
  decode_steps: int
  batch_size: int
  lookup_seconds: float = 0.0  # host match + gather + device_put, the timed steps
  # This process's CPU time over the timed steps (all threads): on a CPU backend shared with
  # other jobs, the work done, not the time spent waiting for a core.
  decode_cpu_seconds: float = 0.0
  prompt_lookup_seconds: float = 0.0  # host match + gather of the prompts (in prefill)
  # lookup='cache': the timed steps' host calls (steps with a cache miss) and rows served
  # by the host.
  host_calls: int = 0
  host_rows: int = 0

  @property
  def tokens_per_second(self) -> float:
    """Decode throughput: generated tokens (all rows) per second after the prefill."""
    return self.decode_steps * self.batch_size / max(self.decode_seconds, 1e-12)


class Decoder:
  """Batched KV-cache generation through the host-side f-gram store.

  Args:
    lm: the trained model; only `lm.backbone` is put on the accelerator.
    store: the exported store: f-gram rows (with `table`), a hashed n-gram store
      (kind='hashed', without a table; its manifest says so), or None (baseline); or a
      `ShardedStore` (serve/sharded_store.py: rows sharded across processes, served with
      loop='host', every process decoding its own prompts in lockstep).
    table: the f-gram table the f-gram store was exported from.
    batch_size: B, rows decoded together (prompts are padded to it).
    bos_id: prepended to every prompt; no f-gram contains it, so matches never reach
      before it.
    cache_len: the KV cache's length in tokens (default and maximum:
      model.max_seq_len).
    loop: 'device' (an on-device while loop, tokens streamed in chunks of `chunk_steps`)
      or 'host' (one jitted step per token from Python).
    lookup: config.serve.lookup: 'native' (XLA FFI call, CPU backend, store in memory or
      memory-mapped), 'callback' (host callback), 'auto' (native where it applies), or
      'cache' (match on the device, `cache_rows` hottest rows resident there, the host
      only for misses: serve/device_cache.py).
    cache_rows: C for lookup='cache' (C x W x the store's itemsize bytes on the device,
      plus 12 bytes per table row for the match index).
    chunk_steps: decode steps per device call (the streaming granularity).
    mesh: None (default): one device, as it always was. A (data, fsdp, tensor) mesh
      (`serving_mesh`): the backbone's weights are sharded on it by the one table of
      model/sharding.py (heads, MLP and vocab over `tensor`), the KV cache by heads
      (`Backbone.init_cache`'s logical axes), and every host slab (the store's rows) is
      replicated to all of its devices.

  Attributes: `lookup` (the chosen `Lookup`: `.name`, `.stats()`), `store`, `batch_size`,
  `cache_len`, `state` (the backbone's parameters on the accelerator, its blocks in the
  serving layout of `Backbone.for_serving`).
  """

  def __init__(self, lm: SconeLM, store: EmbeddingStore | None = None, table: Any = None,
               *, batch_size: int = 1, bos_id: int = 1, cache_len: int | None = None,
               loop: Loop = 'device', lookup: LookupMode = 'auto', chunk_steps: int = 64,
               cache_rows: int = 0, mesh: jax.sharding.Mesh | None = None):
    cfg = lm.backbone.cfg
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    self.cache_len = cache_len or cfg.max_seq_len
    if self.cache_len > cfg.max_seq_len:
      raise ValueError(f'cache_len={self.cache_len} exceeds the context (config.model.'
                       f'max_seq_len={cfg.max_seq_len})')
    if loop not in ('device', 'host'):
      raise ValueError(f"loop={loop!r} must be 'device' or 'host'")
    if chunk_steps < 1:
      raise ValueError(f'chunk_steps={chunk_steps} must be >= 1')
    if mesh is not None and loop == 'device' and jax.default_backend() == 'cpu':
      # The CPU backend's native FFI lookups are side-effecting custom calls that XLA's SPMD
      # partitioner refuses; the host callback runs on one device and feeds all of them.
      if lookup in ('native', 'cache') and store is not None:
        raise ValueError(f"lookup={lookup!r} cannot run in a decode loop sharded over "
                         f"{mesh.size} CPU devices; use lookup='callback' (or 'auto'), "
                         "loop='host', or one device (serve.tensor=1)")
      lookup = 'callback'
    self.lookup = make_lookup(store, table, combine=lm.combine, d_model=cfg.d_model,
                              dtype=jnp.dtype(cfg.dtype), batch_size=batch_size,
                              mode=lookup, cache_rows=cache_rows, loop=loop)
    self.store = self.lookup.store
    # A store sharded across processes (serve/sharded_store.py) exchanges rows in every
    # gather, a collective: each process decodes its own prompts, all in lockstep (the
    # same padded length and number of steps, no early stop), from the host loop.
    self._lockstep = getattr(self.store, 'collective', False)
    if self._lockstep and loop != 'host':
      raise ValueError("a store sharded across processes is served by the host loop (its "
                       "per-step exchange is a collective every process joins): use "
                       "loop='host' (config.serve.decode_loop)")
    self.batch_size, self.bos_id = batch_size, bos_id
    self.loop, self.chunk_steps = loop, chunk_steps
    # The serving layout (fused q/k/v, per-layer weights) is prepared once here, so no
    # step slices or transposes weights (Backbone.for_serving).
    self.graphdef, self.state = nnx.split(lm.backbone.for_serving())
    self.mesh = mesh
    if mesh is not None:
      self.state = jax.device_put(self.state, model_shardings(self.state, mesh))
      self._slab_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    elif self.lookup.loop_step is not None and loop == 'device':
      devices = {d for leaf in jax.tree.leaves(self.state) for d in leaf.devices()}
      if len(devices) > 1:
        # XLA's SPMD partitioner cannot split a side-effecting call (the lookup), so a
        # loop that makes one runs on one device; weights spread over several are copied
        # there (use loop='host' to decode with them sharded).
        self.state = jax.device_put(self.state, jax.devices()[0])
    self._init_cache = jax.jit(functools.partial(lm.backbone.init_cache, batch_size,
                                                 self.cache_len))
    self._chunk_programs = {}

  def _prompt_batch(self, prompts: Sequence[np.ndarray], max_new_tokens: int):
    """Validates prompts; returns BOS-prepended, right-padded tokens_BxT and lengths_B."""
    if not 1 <= len(prompts) <= self.batch_size:
      raise ValueError(f'got {len(prompts)} prompts for a decoder of batch_size='
                       f'{self.batch_size}; pass 1..{self.batch_size} prompts')
    rows = []
    for i, p in enumerate(prompts):
      p = np.asarray(p, np.int32).reshape(-1)
      if p.size == 0:
        raise ValueError(f'prompt {i} is empty; give at least one token (BOS is added)')
      rows.append(np.concatenate([[self.bos_id], p]).astype(np.int32))
    longest = max(r.size for r in rows)
    if longest + max_new_tokens > self.cache_len:
      raise ValueError(
          f'prompt of {longest} tokens (with BOS) + max_new_tokens={max_new_tokens} exceeds '
          f'the context of {self.cache_len} tokens (config.model.max_seq_len); shorten the '
          'prompt or lower max_new_tokens')
    # Padding T up to a multiple of 16 bounds the number of prefill compilations.
    t = min(-(-longest // 16) * 16, self.cache_len)
    if self._lockstep:
      t = self.store.agree(t, self.batch_size, max_new_tokens)
    tokens_BxT = np.zeros((self.batch_size, t), np.int32)
    lengths_B = np.ones(self.batch_size, np.int32)  # Unused rows hold just BOS.
    tokens_BxT[:, 0] = self.bos_id
    for b, r in enumerate(rows):
      tokens_BxT[b, :r.size] = r
      lengths_B[b] = r.size
    return tokens_BxT, lengths_B

  def _prompt_slab(self, tokens_BxT: np.ndarray, lengths_B: np.ndarray):
    """The lookup's prompt slab on the device (None for the baseline)."""
    slab_BxTxE = self.lookup.prompt_slab(tokens_BxT, lengths_B)
    if slab_BxTxE is None:
      return None
    return jax.device_put(slab_BxTxE, None if self.mesh is None else self._slab_sharding)

  def _step_slab(self, token_B: np.ndarray):
    """The lookup's slab for one host-loop step (on every mesh device when sharded)."""
    slab_BxE = self.lookup.step_slab(token_B)
    if self.mesh is None or slab_BxE is None:
      return slab_BxE
    return jax.device_put(slab_BxE, self._slab_sharding)

  # -- generation ----------------------------------------------------------------------

  @_on_mesh
  def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0,
               eos_id: int | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt (token ids, no BOS).

    Rows stop at `eos_id` (kept in the output); the batch stops when all rows have.
    """
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
    tokens_BxT, lengths_B = self._prompt_batch(prompts, max_new_tokens)
    key = jax.random.key(seed)
    if self.loop == 'device':
      return self._generate_device(len(prompts), tokens_BxT, lengths_B, max_new_tokens,
                                   sampling, key, eos_id)
    start = time.perf_counter()
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    _, next_B, cache = steps.PREFILL(self.graphdef, sampling, False, self.state, tokens_BxT,
                                     slab_BxTxE, lengths_B, self._init_cache(),
                                     jax.random.fold_in(key, 0), combine=self.lookup.rule)
    out_BxN = np.zeros((self.batch_size, max_new_tokens), np.int32)
    # The sampled tokens stay on the device as the next step's input; the host copy
    # (token_B) only feeds the matcher and the output.
    token_B = np.asarray(next_B)
    prefill_seconds = time.perf_counter() - start
    done_B = np.zeros(self.batch_size, bool)
    lookup = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    n_steps = 0
    for n in range(max_new_tokens):
      if n + 1 < max_new_tokens and (self._lockstep or not done_B.all()):
        t0 = time.perf_counter()
        slab_BxE = self._step_slab(token_B)
        lookup += time.perf_counter() - t0
        _, next_B, cache = steps.DECODE(self.graphdef, sampling, self.state, next_B,
                                        slab_BxE, cache, key, np.int32(n + 1),
                                        combine=self.lookup.rule)
        n_steps += 1
      else:
        next_B = None
      # Bookkeeping for token n overlaps the device's work on token n + 1.
      out_BxN[:, n] = token_B
      if eos_id is not None:
        done_B |= token_B == eos_id
      if next_B is None:
        break
      token_B = np.asarray(next_B)
      if n == 0 and max_new_tokens > 2:
        # The first decode step may include its compilation: time the steady state.
        start, n_steps, lookup = time.perf_counter(), 0, 0.0
        cpu_start = time.process_time()
    decode_seconds = time.perf_counter() - start
    decode_cpu_seconds = time.process_time() - cpu_start
    return Generation(tokens=_cut_at_eos(out_BxN[:len(prompts), :n + 1], eos_id),
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                      decode_steps=n_steps, batch_size=self.batch_size, lookup_seconds=lookup,
                      decode_cpu_seconds=decode_cpu_seconds)

  @_on_mesh
  def compiled_loop_chunk(self, sampling: Sampling = Sampling()):
    """The compiled device-loop chunk for `sampling`, bound to this decoder's weights,
    lookup and key (for XLA cost analysis; compiled before a generation is timed)."""
    if sampling not in self._chunk_programs:
      cache = jax.eval_shape(self._init_cache)
      token_B = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
      scalar = jax.ShapeDtypeStruct((), jnp.int32)
      self._chunk_programs[sampling] = device_loop.DECODE_CHUNK.lower(
          self.graphdef, sampling, self.lookup.loop_step, self.chunk_steps, self.state,
          self.lookup.loop_operand, token_B, jax.eval_shape(self.lookup.loop_state, token_B),
          cache, jax.ShapeDtypeStruct((self.batch_size,), bool), scalar, scalar, scalar,
          jax.random.key(0), combine=self.lookup.rule).compile()
    return self._chunk_programs[sampling]

  def _generate_device(self, num_prompts, tokens_BxT, lengths_B, max_new_tokens,
                       sampling, key, eos_id) -> Generation:
    program = self.compiled_loop_chunk(sampling)
    start = time.perf_counter()
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    prompt_lookup = time.perf_counter() - start
    _, first_B, cache = steps.PREFILL(self.graphdef, sampling, False, self.state, tokens_BxT,
                                      slab_BxTxE, lengths_B, self._init_cache(),
                                      jax.random.fold_in(key, 0), combine=self.lookup.rule)
    first_B.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    before = self.lookup.counters()
    start, cpu_start = time.perf_counter(), time.process_time()
    run = functools.partial(program, self.state, self.lookup.loop_operand)
    tokens_BxN, n = device_loop.ChunkRunner(
        lambda *a: run(*a, key), first_B, self.lookup.loop_state(first_B), cache, eos_id,
        max_new_tokens, self.chunk_steps).run()
    decode_seconds = time.perf_counter() - start
    decode_cpu_seconds = time.process_time() - cpu_start
    return Generation(tokens=_cut_at_eos(tokens_BxN[:num_prompts], eos_id),
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                      decode_steps=n, batch_size=self.batch_size,
                      decode_cpu_seconds=decode_cpu_seconds,
                      prompt_lookup_seconds=prompt_lookup, **self.lookup.settle(before))

  @_on_mesh
  def teacher_forced_logits(self, prompts: Sequence[np.ndarray],
                            continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Float32 logits at every position of BOS+prompt+continuation via prefill + decode.

    The prompt goes through the prefill, each continuation token through one decode step
    (the serving path, store lookups included). Row i of the result has
    1 + len(prompt) + len(continuation) - 1 positions: the distribution after each input
    token except the last continuation token. Continuations must have equal lengths.
    """
    n = {len(c) for c in continuations}
    if len(n) != 1 or len(continuations) != len(prompts):
      raise ValueError('give one continuation per prompt, all of the same length')
    n = n.pop()
    tokens_BxT, lengths_B = self._prompt_batch(prompts, n)
    slab_BxTxE = self._prompt_slab(tokens_BxT, lengths_B)
    greedy, key = Sampling(), jax.random.key(0)
    logits_BxTxV, _, cache = steps.PREFILL(self.graphdef, greedy, True, self.state,
                                           tokens_BxT, slab_BxTxE, lengths_B,
                                           self._init_cache(), key, combine=self.lookup.rule)
    step_logits = []
    cont_BxN = np.zeros((self.batch_size, n), np.int32)
    for b, c in enumerate(continuations):
      cont_BxN[b] = c
    for i in range(max(n - 1, 0)):
      logits_BxV, _, cache = steps.DECODE(self.graphdef, greedy, self.state, cont_BxN[:, i],
                                          self._step_slab(cont_BxN[:, i]), cache, key,
                                          np.int32(0), combine=self.lookup.rule)
      step_logits.append(np.asarray(logits_BxV))
    logits_BxTxV = np.asarray(logits_BxTxV)
    out = []
    for b in range(len(prompts)):
      rows = [logits_BxTxV[b, :lengths_B[b]]] + [s[b:b + 1] for s in step_logits]
      out.append(np.concatenate(rows, axis=0))
    return out

  @_on_mesh
  def compiled_decode_step(self, sampling: Sampling = Sampling()):
    """The compiled decode step for this decoder's shapes (for XLA cost analysis)."""
    cache = jax.eval_shape(self._init_cache)
    token_B = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
    slab_BxE = jax.ShapeDtypeStruct((self.batch_size, self.lookup.row_width + 1),
                                    self.lookup.slab_dtype)
    return steps.DECODE.lower(self.graphdef, sampling, self.state, token_B, slab_BxE, cache,
                              jax.random.key(0), np.int32(0), combine=self.lookup.rule).compile()


def _cut_at_eos(tokens_BxN: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
  """Each row's tokens up to and including its first `eos_id`."""
  out = []
  for row in tokens_BxN:
    if eos_id is not None and (row == eos_id).any():
      row = row[:int(np.argmax(row == eos_id)) + 1]
    out.append(row)
  return out
