"""A safetensors reader that never holds a whole checkpoint: the header is parsed (8-byte
little-endian length, then JSON {name: {dtype, shape, data_offsets}}) and a tensor's rows
are read by byte range into a buffer the caller owns, so a reader holds only the rows it
asked for.

Local files and gs:// objects are read the same way (`paths.path(...).open`, seek, then
readinto; one open handle per file): no memory map, whose pages would count against the
process for as long as it lives. bfloat16 comes from ml_dtypes (safetensors' own numpy
API has none) and keeps its bits: a tensor is the file's bytes reinterpreted, never
converted.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import ml_dtypes
import numpy as np

from scone_jax import paths
from scone_jax.errors import UserError

# safetensors dtype names -> numpy dtypes (the float ones checkpoints store weights in).
DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
          'BF16': np.dtype(ml_dtypes.bfloat16)}
# A header larger than this is a corrupt length field, not a header.
_MAX_HEADER = 100 << 20


class CheckpointError(UserError, ValueError):
  """A Hugging Face checkpoint directory or file is unusable; names the file and field."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes are: absolute [start, end) in `file`."""
  file: str
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


def read_header(file: str) -> dict[str, TensorInfo]:
  """The tensors of one .safetensors file, checked against the file's size."""
  size = paths.getsize(file)
  with paths.path(file).open('rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f'{file}: {size} bytes, shorter than a safetensors header')
    (n,) = struct.unpack('<Q', head)
    if n > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f'{file}: header length {n} exceeds the file ({size} bytes); '
                            'the file is truncated or not safetensors')
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointError(f'{file}: the safetensors header is not JSON ({e})') from e
  base, out = 8 + n, {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = DTYPES.get(entry.get('dtype'))
    if dtype is None:
      raise CheckpointError(f'{file}: tensor {name} has dtype {entry.get("dtype")!r}; '
                            f'weights must be one of {sorted(DTYPES)}')
    shape = tuple(int(d) for d in entry['shape'])
    start, end = (base + int(o) for o in entry['data_offsets'])
    if end - start != int(np.prod(shape)) * dtype.itemsize or end > size:
      raise CheckpointError(f'{file}: tensor {name} ({entry["dtype"]} {list(shape)}) has '
                            f'data_offsets {entry["data_offsets"]} that do not fit its shape '
                            f'or the file ({size} bytes); the file is corrupt or truncated')
    out[name] = TensorInfo(file, name, dtype, shape, start, end)
  return out


class TensorFiles:
  """Reads the tensors of one or more safetensors files by byte range."""

  def __init__(self, tensors: dict[str, TensorInfo]):
    self.tensors = tensors
    self._files: dict[str, Any] = {}

  def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) of tensor `name` (along its first axis) into `out`, a
    C-contiguous array of exactly those rows' bytes: one ranged read."""
    info = self.tensors[name]
    row = int(np.prod(info.shape[1:])) * info.dtype.itemsize
    offset, want = info.start + start * row, (stop - start) * row
    if not out.flags.c_contiguous or out.nbytes != want:
      raise ValueError(f'{name} rows [{start}, {stop}) are {want} contiguous bytes; out is '
                       f'{out.nbytes} bytes, c_contiguous={out.flags.c_contiguous}')
    view = memoryview(out.reshape(-1).view(np.uint8))
    f = self._files.get(info.file)
    if f is None:
      f = self._files[info.file] = (open(info.file, 'rb', buffering=0)  # pylint: disable=consider-using-with
                                    if not paths.is_remote(info.file) else
                                    paths.path(info.file).open('rb'))
    f.seek(offset)
    done = 0
    while done < want:  # A local read returns at most ~2 GiB per call.
      n = f.readinto(view[done:])
      if not n:
        raise CheckpointError(f'{info.file}: tensor {name} ends at byte {offset + done} of '
                              f'{offset + want}; the file is truncated')
      done += n

  def array(self, name: str) -> np.ndarray:
    """The whole tensor, read."""
    info = self.tensors[name]
    out = np.empty(info.shape, info.dtype)
    self.read_rows(name, 0, info.shape[0] if info.shape else 1, out)
    return out


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_file(file: str, tensors: dict[str, np.ndarray]) -> None:
  """One .safetensors file (header, then each tensor's bytes in name order), written to a
  temporary name and renamed, so a reader never sees half a file."""
  header, offset = {}, 0
  for name in sorted(tensors):
    array = tensors[name]
    header[name] = {'dtype': _NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # Data starts 8-byte aligned, as safetensors writes it.
  tmp = file + '.partial'
  with paths.path(tmp).open('wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  paths.path(tmp).rename(file)
