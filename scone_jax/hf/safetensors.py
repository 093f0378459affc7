"""A safetensors reader that never holds a whole checkpoint: the header is parsed (8-byte
little-endian length, then JSON {name: {dtype, shape, data_offsets}}) and each tensor is a
numpy view of the file, so slicing it reads only the bytes of the slice.

Local files are memory-mapped; a gs:// file is read one tensor at a time by byte range
(`paths.path(...).open`), so a host holds at most the tensor it is slicing. bfloat16 comes
from ml_dtypes (safetensors' own numpy API has none) and keeps its bits: a tensor is the
file's bytes reinterpreted, never converted.
"""

from __future__ import annotations

import dataclasses
import json
import struct

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
  """Opens tensors of one or more safetensors files as numpy arrays without reading them."""

  def __init__(self, tensors: dict[str, TensorInfo]):
    self.tensors = tensors
    self._maps: dict[str, np.memmap] = {}

  def array(self, name: str) -> np.ndarray:
    """The tensor as an array: a view of the memory map (local), or its bytes (gs://)."""
    info = self.tensors[name]
    if paths.is_remote(info.file):
      with paths.path(info.file).open('rb') as f:
        f.seek(info.start)
        data = f.read(info.end - info.start)
      return np.frombuffer(data, info.dtype).reshape(info.shape)
    if info.file not in self._maps:
      self._maps[info.file] = np.memmap(info.file, np.uint8, mode='r')
    raw = self._maps[info.file][info.start:info.end]
    return raw.view(info.dtype).reshape(info.shape)


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
