"""The per-step f-gram lookup as an XLA FFI call on the CPU backend (no Python, no GIL).

Dimension letters: B batch, L = K - 1 matcher levels, D the store's row width (d_model,
or d_model + 4 for a quantised store), E = D + 1.

A device decode loop needs, every step, the f-gram row of the token it just sampled. On
the CPU backend a JAX host callback (`io_callback`) costs ~200 us per call on our 2-core
machines (a thread hand-off and the GIL), more than a whole tiny-model step. Here the same
compiled work as `HostLookup.step_slab` (`IncrementalMatcher.push` + the store gather + the
match flag; `sharded_slab_kernel` reads the 'ram' tier's matrix or the 'disk' tier's
memory-mapped shards) is registered as a typed XLA FFI handler:
a numba `cfunc` that reads XLA's C call frame directly, so XLA:CPU calls it inline like any
other op (the same ~2 us kernel as the host path at B = 1).

Contract with XLA (jaxlib/include/xla/ffi/api/c_api.h, API major version 0): the handler
gets an `XLA_FFI_CallFrame*`; with a metadata extension it only reports its API version;
at the execute stage it reads two operands (token_B int32 and a context vector holding the
host arrays' addresses, see `LookupContext`) and writes one result (slab_BxE in the
store's dtype). It never fails: tokens come from the model's own argmax/sampling (< V),
and the matcher yields only rows the store has (checked when the decoder is built).

`NativeLookup` is the decoder's lookup (serve/lookup.py) that calls it inside the device
loop; its prompt and host steps are `HostLookup`'s. serve.factory's lookup='auto' uses it
on the CPU backend and falls back to the `io_callback` lookup when registering the target
fails (e.g. a jaxlib without the FFI
API it reads); tests/test_decode.py checks its slabs and tokens against the host path and
the training forward.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numba
import numpy as np
from numba import types
from numba.core.extending import intrinsic

from scone_jax.fgrams.match import push_kernel
from scone_jax.serve.host_lookup import HostLookup

_TARGET = 'scone_jax_fgram_slab_u{bits}'
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE


@intrinsic
def _ptr(typingctx, addr):
  """An int64 address as a void pointer (numba has no cast for it)."""
  def codegen(context, builder, signature, args):
    return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
  return types.voidptr(types.int64), codegen


# The FFI C API version the handler reports. Minor versions only add to the structs (ABI
# compatible), and the handler reads only fields present since the first minor version.
_API_MAJOR, _API_MINOR = 0, 1


# Context vector (int64), built by `LookupContext`: the addresses and sizes of the host
# arrays the kernel reads and updates (the match index: its [C, 3] uint32 slots and the
# rows a probe may return, fgrams/index.py). Then per store shard j (address, rows) of its
# raw rows.
(_B, _LEVELS, _CODES, _INDEX, _SLOTS, _LIMIT, _IDS, _LENS, _SHARDS, _CHUNK, _D, _ONE,
 _HITS) = range(13)
_HEAD = 13


@numba.njit(nogil=True, inline='always')
def _views(address, count, cols, dtype):
  """A typed list of `count` C-order [rows, cols] arrays described by (address, rows)
  pairs at `address`."""
  info = numba.carray(_ptr(address), 2 * count, np.int64)
  out = numba.typed.List()
  for i in range(count):
    out.append(numba.carray(_ptr(info[2 * i]), (info[2 * i + 1], cols), dtype))
  return out


@numba.njit(nogil=True, cache=True)
def sharded_slab_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B, shards,
                        chunk_rows, slab_BxE, one):
  """IncrementalMatcher.push, then row r of the store from shard r // chunk_rows (zeros
  for no match) and the match flag into slab_BxE; returns the number of matches. The
  store's rows as one array ('ram': chunk_rows = S + 1) or as its memmapped shards
  ('disk'): one kernel for both tiers."""
  push_kernel(tokens_B, codes_BxL, index, limit, ids_B, lens_B)
  hits = 0
  for b in range(ids_B.size):
    r = ids_B[b]
    if r < 0:
      slab_BxE[b, :] = 0
    else:
      slab_BxE[b, :-1] = shards[r // chunk_rows][r % chunk_rows, :]
      slab_BxE[b, -1] = one
      hits += 1
  return hits


@numba.njit(nogil=True, cache=True)
def ffi_frame(call_frame):
  """Reads XLA's FFI call frame: answers the metadata stage (API version, no traits, no
  state) and returns (execute, data address of args[0], args[1], rets[0]); execute is
  False for any other stage, and the handler then returns 0 at once."""
  frame = numba.carray(call_frame, 16, np.int64)
  ext = frame[1]
  if ext != 0:
    if numba.carray(_ptr(ext), 4, np.int32)[2] == _METADATA_EXTENSION:
      meta_address = numba.carray(_ptr(ext), 4, np.int64)[3]
      meta = numba.carray(_ptr(meta_address), 12, np.int32)
      meta[6], meta[7], meta[8] = _API_MAJOR, _API_MINOR, 0  # api_version, traits
      numba.carray(_ptr(meta_address), 6, np.int64)[5] = 0  # state_type_id: none
      return False, 0, 0, 0
  if (frame[4] & 0xFFFFFFFF) != _EXECUTE:
    return False, 0, 0, 0
  # XLA_FFI_Args at byte 40: (struct_size, ext, size, types, args); Rets at byte 80.
  args = numba.carray(_ptr(frame[9]), 2, np.int64)
  rets = numba.carray(_ptr(frame[14]), 1, np.int64)
  # XLA_FFI_Buffer: (struct_size, ext, dtype, data, rank, dims): data is word 3.
  return (True, numba.carray(_ptr(args[0]), 4, np.int64)[3],
          numba.carray(_ptr(args[1]), 4, np.int64)[3],
          numba.carray(_ptr(rets[0]), 4, np.int64)[3])


@numba.njit(nogil=True, cache=True)
def _handle(call_frame, raw):
  """The FFI handler's body for a store of `raw` rows (np.uint8, np.uint16 or np.uint32
  bits)."""
  execute, token_data, ctx_address, out_data = ffi_frame(call_frame)
  if not execute:
    return 0
  ctx = numba.carray(_ptr(ctx_address), _HEAD, np.int64)
  b, levels, d = ctx[_B], ctx[_LEVELS], ctx[_D]
  index = numba.carray(_ptr(ctx[_INDEX]), (ctx[_SLOTS], 3), np.uint32)
  shards = _views(ctx_address + 8 * _HEAD, ctx[_SHARDS], d, raw)
  slab_BxE = numba.carray(_ptr(out_data), (b, d + 1), raw)
  hits = sharded_slab_kernel(
      numba.carray(_ptr(token_data), b, np.int32),
      numba.carray(_ptr(ctx[_CODES]), (b, levels), np.int64), index, ctx[_LIMIT],
      numba.carray(_ptr(ctx[_IDS]), b, np.int32),
      numba.carray(_ptr(ctx[_LENS]), b, np.int32), shards, ctx[_CHUNK], slab_BxE,
      raw(ctx[_ONE]))
  counters = numba.carray(_ptr(ctx[_HITS]), 2, np.int64)
  counters[0] += hits
  counters[1] += 1
  return 0


# One C entry point per element width (u8: quantised stores); module level and cached,
# so a process pays numba's compilation once per machine, not per run.
@numba.cfunc(types.intp(types.voidptr), nopython=True, cache=True)
def _handler_u8(call_frame):
  return _handle(call_frame, np.uint8)


@numba.cfunc(types.intp(types.voidptr), nopython=True, cache=True)
def _handler_u16(call_frame):
  return _handle(call_frame, np.uint16)


@numba.cfunc(types.intp(types.voidptr), nopython=True, cache=True)
def _handler_u32(call_frame):
  return _handle(call_frame, np.uint32)


def register_target(name: str, handler) -> str:
  """Registers a numba cfunc FFI handler as the CPU custom-call target `name`."""
  # jax.ffi.pycapsule sets ctypes.pythonapi.PyCapsule_New's argtypes process-wide, so
  # every capsule here is made through it (serve/ffi_gather.py's too).
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.c_void_p(handler.address)),
                              platform='cpu')
  return name


@functools.lru_cache(maxsize=None)
def _register(bits: int) -> str:
  handler = {8: _handler_u8, 16: _handler_u16, 32: _handler_u32}[bits]
  return register_target(_TARGET.format(bits=bits), handler)


def store_shards(store) -> tuple[list[np.ndarray], int] | None:
  """The store's rows as raw-bit arrays and the rows per array, or None if it has none
  in memory or memory-mapped (tensorstore reader). The one place that reads the store's
  internal arrays: 'ram' exposes `raw_rows` ([S + 1, d], the last row zeros); 'disk'
  (memmap reader) its shards' memmaps, each of `chunk_rows` rows (the last may be short).
  """
  if store.raw_rows is not None:
    return [store.raw_rows], store.raw_rows.shape[0]
  shards = getattr(store, '_shards', None)
  if not shards:
    return None
  raw = np.dtype(f'u{store.dtype.itemsize}')
  return [s.view(raw) for s in shards], int(store.manifest['chunk_rows'])


class LookupContext:
  """The host state one decoder's native lookup reads: matcher codes, hash slots, the
  store's rows (`store_shards`), scratch ids/lengths and hit counters, with their
  addresses packed for the FFI call (`operand`). Holds references to every array so none
  is freed while a compiled loop may still read it."""

  def __init__(self, kernel_args: tuple, shards: list[np.ndarray], chunk_rows: int,
               one_raw, batch_size: int):
    codes_BxL, index, limit = kernel_args
    for a in (codes_BxL, index, *shards):
      if not a.flags.c_contiguous:
        raise ValueError('the native lookup needs C-contiguous host arrays')
    self.bits = shards[0].dtype.itemsize * 8
    self._ids_B = np.empty(batch_size, np.int32)
    self._lens_B = np.empty(batch_size, np.int32)
    self.counters = np.zeros(2, np.int64)  # hits, calls
    self._keep = (codes_BxL, index, shards)
    ctx = np.zeros(_HEAD + 2 * len(shards), np.int64)
    ctx[[_B, _LEVELS, _SLOTS, _LIMIT, _SHARDS, _CHUNK, _D]] = (
        batch_size, codes_BxL.shape[1], index.shape[0], limit, len(shards), chunk_rows,
        shards[0].shape[1])
    ctx[_ONE] = int(one_raw)
    for i, a in ((_CODES, codes_BxL), (_INDEX, index), (_IDS, self._ids_B),
                 (_LENS, self._lens_B), (_HITS, self.counters)):
      ctx[i] = a.ctypes.data
    for i, a in enumerate(shards):
      ctx[_HEAD + 2 * i], ctx[_HEAD + 2 * i + 1] = a.ctypes.data, a.shape[0]
    self._ctx = ctx
    # Viewed as uint32 so the addresses survive jax's default 32-bit mode.
    self.operand = jnp.asarray(ctx.view(np.uint32))
    self.target = _register(self.bits)


def slab_call(ctx_operand: jax.Array, target: str, token_B: jax.Array, d_model: int,
              dtype) -> jax.Array:
  """Inside jit: the [B, W + 1] slab (f-gram rows, then the match flag) for token_B;
  `d_model` is W, the stored row width (D + 4 for a quantised store)."""
  out = jax.ShapeDtypeStruct((token_B.shape[0], d_model + 1), dtype)
  return jax.ffi.ffi_call(target, out, has_side_effect=True)(token_B.astype(jnp.int32),
                                                              ctx_operand)


@dataclasses.dataclass(frozen=True)
class NativeStep:
  """`loop_step` of the native lookup: the FFI call `target` (static, so decoders of one
  shape share a compilation)."""
  target: str
  row_width: int
  dtype: np.dtype

  def __call__(self, ctx_operand, token_B, state):
    return slab_call(ctx_operand, self.target, token_B, self.row_width, self.dtype), state


class NativeLookup(HostLookup):
  """lookup='native': `HostLookup` whose device-loop step is the FFI call (CPU backend, a
  store in memory or memory-mapped: `store_shards`)."""

  name = 'native'

  def __init__(self, store, table, batch_size: int, rule: str,
               shards: tuple[list[np.ndarray], int]):
    super().__init__(store, table, batch_size, rule)
    one = np.array(1, self.slab_dtype).view(shards[0][0].dtype)[()]
    self.context = LookupContext(self.matcher.kernel_args, *shards, one, batch_size)

  @property
  def loop_step(self):
    return NativeStep(self.context.target, self.row_width, self.slab_dtype)

  @property
  def loop_operand(self):
    return self.context.operand

  def counters(self) -> np.ndarray:
    return self.context.counters.copy()

  def settle(self, before: np.ndarray) -> dict[str, int]:
    # The FFI call counts (hits, calls) in place of store.gather's own counters.
    hits, calls = (int(x) for x in self.context.counters - before)
    self.store.stats.add(calls * self.batch_size, hits,
                         calls * self.batch_size * self.row_width * self.slab_dtype.itemsize,
                         0.0)
    return {}
