"""A decoder's f-gram lookup: one interface, one module per way of serving it.

Dimension letters: B batch, T padded prompt length, W the stored row width (D, or D + 4
for a quantised store, export/quant.py), E = W + 1 (a slab row: the stored row, then the
match flag).

A `Lookup` gives the decoder (serve/decode.py) the rows its steps add to or put in place
of T(token), in three places:
  * `prompt_slab`: the prompts' slab_BxTxE, made on the host before the prefill;
  * `step_slab`: one decode step's slab_BxE on the host (the host loop, teacher forcing,
    and the callback of the device loop);
  * `loop_step` + `loop_operand` (+ `loop_state`): the same slab inside the on-device
    loop (serve/device_loop.py). `loop_step` is static (a frozen dataclass, equal for
    decoders of one shape, so they share compilations), the operand is traced.
`rule` is the combine rule the steps apply to the slab ('replace' | 'add',
model/combine.py). The implementations, chosen once by `serve.factory.make_lookup`:
  'none'      `NoLookup` (below): the baseline, T(token) alone.
  'callback'  serve/host_lookup.py (f-gram store: host matcher + gather) or
              serve/hashed.py (kind='hashed'), reached from the loop by `io_callback`.
  'native'    serve/native_lookup.py: the host lookup as an XLA FFI call (CPU backend).
  'cache'     serve/device_cache.py: the match on the device, hot rows resident there,
              misses by the compiled FFI gather (serve/ffi_gather.py) or the callback.
  'device'    serve/device_cache.py with the FFI gather required: no Python in the loop
              on CPU or a CUDA GPU ('auto' on a CUDA GPU).
Inside the loop, rows of ml_dtypes' types (bfloat16, float8) cross from the host as raw bits
(uint16/uint8, bitcast on the device): no float8 or bfloat16 goes through a callback.
"""

from __future__ import annotations

import abc
import dataclasses
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from scone_jax.serve.store import EmbeddingStore


class Lookup(abc.ABC):
  """What a decoder asks of its f-gram lookup (see the module docstring).

  Attributes:
    name: 'none' | 'callback' | 'native' | 'cache' | 'device' (config.serve.lookup's
      words; 'auto' resolves to one of them).
    store: the host store the rows come from (None for the baseline).
    batch_size: B.
    row_width: W, stored columns per row.
    slab_dtype: the slab's dtype (the store's, or the model's for a hashed store).
    rule: the combine rule of the steps: 'replace' | 'add' (model/combine.stored_rule).
  """

  name: str = ''

  def __init__(self, store: EmbeddingStore | None, batch_size: int, row_width: int,
               slab_dtype, rule: str):
    self.store, self.batch_size, self.row_width = store, batch_size, row_width
    self.slab_dtype, self.rule = np.dtype(slab_dtype), rule

  @abc.abstractmethod
  def prompt_slab(self, tokens_BxT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray | None:
    """slab_BxTxE of the prompts (None: nothing to add), and the lookup primed to
    continue after each row's last prompt token."""

  @abc.abstractmethod
  def step_slab(self, token_B: np.ndarray) -> jax.Array | np.ndarray:
    """slab_BxE for one new token per row (advancing the lookup's history)."""

  @property
  @abc.abstractmethod
  def loop_step(self) -> Callable[..., Any] | None:
    """Static, hashable: (operand, token_B, state) -> (slab_BxE, state) inside the device
    loop; None for the baseline (no slab)."""

  @property
  def loop_operand(self) -> Any:
    """The traced operand `loop_step` reads (a handle, addresses or device arrays)."""
    return np.int32(0)

  def loop_state(self, first_B: jax.Array) -> Any:
    """The lookup's loop-carried state after the prefill (default: none)."""
    del first_B
    return jnp.zeros((), jnp.int32)

  def counters(self) -> np.ndarray | None:
    """A copy of the counts the device loop's lookup keeps (None: it keeps none)."""
    return None

  def settle(self, before: np.ndarray | None) -> dict[str, int]:
    """Books the device loop's lookups since `counters()` returned `before` into
    `store.stats`; returns the `Generation` fields they fill."""
    del before
    return {}

  def stats(self) -> dict[str, Any]:
    """What this lookup is and has served: its name and the store's gather totals."""
    out: dict[str, Any] = {'name': self.name, 'rule': self.rule}
    if self.store is not None:
      s = self.store.stats
      out.update(calls=s.calls, rows=s.rows, hits=s.hits, bytes=s.bytes, seconds=s.seconds)
    return out


class NoLookup(Lookup):
  """The baseline: no f-gram rows; the steps embed with T alone."""

  name = 'none'

  def __init__(self, batch_size: int, d_model: int, dtype):
    super().__init__(None, batch_size, d_model, dtype, 'replace')
    # A device-resident all-unmatched slab: the host loop's step passes it unchanged.
    self._none_BxE = jnp.zeros((batch_size, d_model + 1), dtype)

  def prompt_slab(self, tokens_BxT, lengths_B):
    return None

  def step_slab(self, token_B):
    return self._none_BxE

  @property
  def loop_step(self):
    return None


# -- the host callback of the device loop ----------------------------------------------

# io_callback targets by handle: the handle is a traced operand, so every decoder of one
# shape shares one compilation (a Python callable captured in the trace would not).
_CALLBACKS: dict[int, Callable[[np.ndarray], np.ndarray]] = {}


def register_callback(method) -> np.int32:
  """Registers a bound method (held weakly) as a loop callback; returns its handle."""
  ref = weakref.WeakMethod(method)
  handle = len(_CALLBACKS)
  _CALLBACKS[handle] = lambda x: ref()(x)
  return np.int32(handle)


def _run_callback(handle, x):
  return _CALLBACKS[int(handle)](np.asarray(x))


def call_host(handle, x: jax.Array, out: jax.ShapeDtypeStruct) -> jax.Array:
  """Inside jit: the registered callback `handle` applied to x on the host."""
  # Unordered: the data dependence on x already orders the calls.
  return io_callback(_run_callback, out, handle, x, ordered=False)


def raw_dtype(dtype) -> np.dtype:
  """The unsigned integer dtype of dtype's width: how its values cross the host boundary."""
  return np.dtype(f'u{np.dtype(dtype).itemsize}')


def crossing_dtype(dtype) -> np.dtype:
  """The dtype a slab of `dtype` crosses a host callback in: itself for numpy's own types
  (float32, int8, ...), raw bits for ml_dtypes' (bfloat16, float8_*), which numpy and the
  callback know only as opaque records."""
  dtype = np.dtype(dtype)
  return dtype if dtype.kind in 'biuf' else raw_dtype(dtype)


@dataclasses.dataclass(frozen=True)
class CallbackStep:
  """`loop_step` of a host lookup: its `step_slab` through `io_callback` (bf16 and fp8 as
  raw bits, bitcast back on the device). Costs a device -> host -> device round trip per
  step (~200 us on the CPU backend, mostly the thread hand-off)."""
  row_width: int
  dtype: np.dtype

  def __call__(self, handle, token_B, state):
    crossing = crossing_dtype(self.dtype)
    out = jax.ShapeDtypeStruct((token_B.shape[0], self.row_width + 1), crossing)
    slab_BxE = call_host(handle, token_B, out)
    if crossing != self.dtype:  # A no-op XLA would still count as B x E FLOPs.
      slab_BxE = jax.lax.bitcast_convert_type(slab_BxE, self.dtype)
    return slab_BxE, state


class CallbackLookup(Lookup):
  """A lookup whose device-loop step is its own `step_slab`, called back on the host."""

  _handle: np.int32 | None = None

  @property
  def loop_step(self):
    return CallbackStep(self.row_width, self.slab_dtype)

  @property
  def loop_operand(self):
    if self._handle is None:  # Registered on first use: host-loop decoders never are.
      self._handle = register_callback(self.crossing_step_slab)
    return self._handle

  def crossing_step_slab(self, token_B: np.ndarray) -> np.ndarray:
    """`step_slab` as the callback hands it to the device (`crossing_dtype`)."""
    return np.asarray(self.step_slab(token_B)).view(crossing_dtype(self.slab_dtype))
