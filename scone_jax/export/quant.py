"""Quantised store rows: int8 or float8_e4m3fn values with a float32 scale per row.

Dimension letters: R rows, D d_model, W = D + 4 (a stored row: D quantised values, then
the 4 bytes of its float32 scale, little-endian).

A quantised store is a zarr3 array of [S, W] in the quantised dtype ('int8' or
'float8_e4m3fn'; tensorstore's zarr3 has both): the scale sits beside its row, so one
gather of W bytes fetches both and every lookup path (the host gather, the fused decode
kernels, the XLA FFI lookup, the io_callback) moves rows as opaque bytes, unchanged. The
slab's dtype then says how to decode it: `dequantize` (on the device, after the gather)
turns [..., W] int8/fp8 back into [..., D] float32 with D multiplies per row.

Rules (x one row, a = max |x|):
  int8: scale = a / 127, q = round(x / scale) in [-127, 127];
        |x - q * scale| <= scale / 2 per element (round to nearest).
  fp8:  scale = a / 448 (e4m3fn's largest finite value), q = fp8(x / scale) rounded to
        nearest even; 3 mantissa bits give a relative error <= 2^-4 where x / scale is a
        normal fp8 number (|x / scale| >= 2^-6) and an absolute error <= scale * 2^-10
        below that (subnormal spacing 2^-9):
        |x - dq| <= max(|x| * 2^-4, scale * 2^-10).
A zero row has scale 0 and dequantises to zeros; an all-zero stored row (no match) too.
"""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np

Quant = Literal['none', 'int8', 'fp8']
QUANTS = ('none', 'int8', 'fp8')
SCALE_BYTES = 4  # One float32 per row.
# The stored (zarr3) dtype of each quantisation; their numpy dtypes identify a quantised
# slab on the device (no export dtype is an 8-bit type).
STORAGE_DTYPE = {'int8': 'int8', 'fp8': 'float8_e4m3fn'}
NP_DTYPES = {'int8': np.dtype(np.int8), 'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn)}
_QMAX = {'int8': 127.0, 'fp8': float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}
# fp8 round-trip bound (see the module docstring): relative, and absolute in scale units.
FP8_RELATIVE_ERROR = 2.0 ** -4
FP8_ABSOLUTE_ERROR_PER_SCALE = 2.0 ** -10


def quant_of(dtype) -> str:
  """'int8' | 'fp8' for a quantised storage dtype, 'none' for any other dtype."""
  name = np.dtype(dtype).name
  for quant, stored in STORAGE_DTYPE.items():
    if name == stored:
      return quant
  return 'none'


def row_width(d_model: int, dtype) -> int:
  """W, the stored columns of a row of d_model values in `dtype` (D + 4 when quantised)."""
  return d_model + SCALE_BYTES if quant_of(dtype) != 'none' else d_model


def row_bytes(d_model: int, quant: str, dtype_bytes: int) -> int:
  """Host bytes of one stored row: D * dtype bytes unquantised, D + 4 quantised."""
  return d_model + SCALE_BYTES if quant != 'none' else d_model * dtype_bytes


def quantize(x_RxD: np.ndarray, quant: str) -> np.ndarray:
  """[R, D] float rows -> [R, D + 4] rows in STORAGE_DTYPE[quant] (values, then scale)."""
  if quant not in STORAGE_DTYPE:
    raise ValueError(f"quant={quant!r} must be one of {sorted(STORAGE_DTYPE)} (or 'none', "
                     'which stores rows unquantised)')
  x_RxD = np.asarray(x_RxD, np.float32)
  r, d = x_RxD.shape
  if not np.isfinite(x_RxD).all():
    raise ValueError('cannot quantise non-finite rows (NaN/Inf in the exported embeddings)')
  scale_R = np.abs(x_RxD).max(axis=1) / np.float32(_QMAX[quant])
  safe_R = np.where(scale_R > 0, scale_R, np.float32(1))[:, None]
  dtype = NP_DTYPES[STORAGE_DTYPE[quant]]
  out_RxW = np.empty((r, d + SCALE_BYTES), dtype)
  y_RxD = x_RxD / safe_R
  if quant == 'int8':
    out_RxW[:, :d] = np.clip(np.rint(y_RxD), -127, 127).astype(np.int8)
  else:
    # |y| <= 448 by construction; ml_dtypes rounds to nearest even.
    out_RxW[:, :d] = y_RxD.astype(dtype)
  # Raw bytes: copied as uint8 so no float8 conversion can touch the scale's bits.
  out_RxW.view(np.uint8)[:, d:] = scale_R.astype('<f4').view(np.uint8).reshape(r, SCALE_BYTES)
  return out_RxW


def dequantize_np(q_RxW: np.ndarray) -> np.ndarray:
  """The numpy reference of `dequantize`: [R, D + 4] stored rows -> [R, D] float32."""
  q_RxW = np.ascontiguousarray(q_RxW)
  if quant_of(q_RxW.dtype) == 'none':
    raise ValueError(f'dequantize_np expects int8/float8_e4m3fn rows, got {q_RxW.dtype}')
  d = q_RxW.shape[-1] - SCALE_BYTES
  scale_R = np.ascontiguousarray(q_RxW[..., d:]).view(np.uint8).view('<f4')
  return q_RxW[..., :d].astype(np.float32) * scale_R


def dequantize(q_xW, d_model: int):
  """On the device: [..., D + 4] int8/fp8 rows -> [..., D] float32 (other dtypes pass
  through unchanged). Cost per row: D converts and D multiplies, plus assembling the scale
  from its 4 bytes (`dequant_xla_flops_per_row`). The dtype is static, so the choice
  happens at trace time."""
  import jax  # pylint: disable=g-import-not-at-top  (keeps the writer free of JAX)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if quant_of(q_xW.dtype) == 'none':
    return q_xW
  if q_xW.shape[-1] != d_model + SCALE_BYTES:
    raise ValueError(f'quantised rows have {q_xW.shape[-1]} columns, expected d_model + '
                     f'{SCALE_BYTES} = {d_model + SCALE_BYTES}')
  # Bitcasting 4 one-byte values to one float32 reads them little-endian, as written.
  scale_x = jax.lax.bitcast_convert_type(q_xW[..., d_model:], jnp.float32)
  return q_xW[..., :d_model].astype(jnp.float32) * scale_x[..., None]



def dequant_xla_flops_per_row(d_model: int, quant: str) -> int:
  """What XLA:CPU's cost analysis counts for `dequantize` per row inside the decode step
  (over the unquantised store's step). The arithmetic is D multiplies; XLA also counts
  the D converts to float32 (int8: 1 op each; fp8: 9, as XLA:CPU converts float8 in
  software, integer ops on its bits) and 20 integer ops that assemble the float32 scale
  from its 4 bytes (the 8 -> 32-bit bitcast lowers to convert, shift and an or-reduce).
  tests/test_quant.py checks the decode step's count is the unquantised step's plus this
  times B. (fp8 alone in a jit counts 5 D + 32: XLA fuses its software convert
  differently there; int8 counts 2 D + 20 either way.)"""
  converts = {'int8': 1, 'fp8': 9}[quant]
  return (converts + 1) * d_model + 20
