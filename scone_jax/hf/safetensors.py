"""A safetensors reader that never holds a whole checkpoint: the header is parsed (8-byte
little-endian length, then JSON {name: {dtype, shape, data_offsets}}) and a tensor's rows
are read by byte range into a buffer the caller owns, so a reader holds only the rows it
asked for.

Every read is one byte range: locally read calls into the caller's buffer (no memory map,
whose pages would count against the process for as long as it lives); on gs:// one ranged
GET (fsspec's `cat_file`; a file object's read-ahead would fetch megabytes past the range,
the whole of a small file). bfloat16 comes from ml_dtypes (safetensors' own numpy
API has none) and keeps its bits: a tensor is the file's bytes reinterpreted, never
converted.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import fsspec
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


def read_at(file: str, offset: int, out: memoryview) -> None:
  """Fills `out` (bytes) from `file` at `offset`: one ranged read.

  Raises:
    CheckpointError: the file ends before the range does.
  """
  if paths.is_remote(file):
    fs, path = fsspec.core.url_to_fs(file)
    data = fs.cat_file(path, start=offset, end=offset + out.nbytes)
    done = len(data)
    out[:done] = data
  else:
    with open(file, 'rb', buffering=0) as f:
      f.seek(offset)
      done = 0
      while done < out.nbytes:  # A local read returns at most ~2 GiB per call.
        n = f.readinto(out[done:])
        if not n:
          break
        done += n
  if done != out.nbytes:
    raise CheckpointError(f'{file} ends at byte {offset + done}, inside bytes [{offset}, '
                          f'{offset + out.nbytes}) its header promises; the file is truncated')


def read_header(file: str) -> dict[str, TensorInfo]:
  """The tensors of one .safetensors file, checked against the file's size."""
  size = paths.getsize(file)
  if size < 8:
    raise CheckpointError(f'{file}: {size} bytes, shorter than a safetensors header')
  head = bytearray(8)
  read_at(file, 0, memoryview(head))
  (n,) = struct.unpack('<Q', head)
  if n > min(_MAX_HEADER, size - 8):
    raise CheckpointError(f'{file}: header length {n} exceeds the file ({size} bytes); '
                          'the file is truncated or not safetensors')
  blob = bytearray(n)
  read_at(file, 8, memoryview(blob))
  try:
    header = json.loads(blob)
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

  def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) of tensor `name` (along its first axis) into `out`, a
    C-contiguous array of exactly those rows' bytes: one ranged read."""
    info = self.tensors[name]
    row = int(np.prod(info.shape[1:])) * info.dtype.itemsize
    if not out.flags.c_contiguous or out.nbytes != (stop - start) * row:
      raise ValueError(f'{name} rows [{start}, {stop}) are {(stop - start) * row} contiguous '
                       f'bytes; out is {out.nbytes}, c_contiguous={out.flags.c_contiguous}')
    read_at(info.file, info.start + start * row, memoryview(out.reshape(-1).view(np.uint8)))

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
