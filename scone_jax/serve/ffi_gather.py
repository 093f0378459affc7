"""The device lookups' host-store gather (serve/device_cache.py) as a compiled XLA FFI
handler: serve/ffi/gather.cc, built with the system C++ compiler at first use and
registered for the backend the decoder runs on.

Dimension letters: B batch, W the stored row width (D, or D + 4 quantised).

One C++ source, two builds: the CPU handler gathers into XLA's output buffer; the CUDA
handler (the CUDA runtime's headers and libcudart: the nvidia-cuda-runtime wheel jax's
GPU plugin installs, $CUDA_HOME or /usr/local/cuda*; no nvcc) copies the ids to pinned
host staging on the handler's stream, gathers there and copies the rows back. Neither
runs Python: the loop body stays one compiled program. Rows cross as raw bits (uint8,
uint16 or uint32 of the store's dtype) and are bitcast on the device, so float32, bf16,
int8 and fp8 rows arrive unchanged.

Builds are cached in $SCONE_JAX_FFI_CACHE (default ~/.cache/scone_jax/ffi), named by a
hash of the source and the command (written to a temporary name, then renamed), so a
machine compiles once (~2 s of CPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('ffi') / 'gather.cc'
TARGET = 'scone_jax_fgram_rows'
# jax backend -> (the handler's symbol, XLA's platform name for it).
_HANDLERS = {'cpu': ('SconeGatherHost', 'cpu'), 'gpu': ('SconeGatherCuda', 'CUDA')}
# Context vector (int64): B, W, shards, rows per shard, counters' address; then per shard
# (address, rows). serve/ffi/gather.cc reads the same layout.
_B, _W, _SHARDS, _CHUNK, _COUNTERS = range(5)
_HEAD = 5


class GatherUnavailable(RuntimeError):
  """The handler cannot be built or loaded here; the message says why."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('SCONE_JAX_FFI_CACHE') or
                      pathlib.Path.home() / '.cache' / 'scone_jax' / 'ffi')


def _cudart(root: pathlib.Path) -> pathlib.Path | None:
  """libcudart's shared library under root/lib or root/lib64, if root has the headers."""
  if not (root / 'include' / 'cuda_runtime_api.h').is_file():
    return None
  for lib in ('lib', 'lib64'):
    found = sorted((root / lib).glob('libcudart.so*'), key=lambda p: len(p.name))
    if found:
      return found[0]
  return None


def cuda_runtime() -> tuple[pathlib.Path, pathlib.Path] | None:
  """(include dir, libcudart) of the first CUDA runtime found: the nvidia wheels beside
  jax's GPU plugin first (the runtime jax itself loads), then $CUDA_HOME / $CUDA_PATH,
  then /usr/local/cuda*."""
  roots = []
  spec = importlib.util.find_spec('nvidia')
  for base in (spec.submodule_search_locations or []) if spec else []:
    roots += sorted(pathlib.Path(base).iterdir())  # cuda_runtime/ (cu12), cu13/, ...
  roots += [pathlib.Path(os.environ[v]) for v in ('CUDA_HOME', 'CUDA_PATH') if v in os.environ]
  roots += sorted(pathlib.Path('/usr/local').glob('cuda*'))
  for root in roots:
    lib = _cudart(root)
    if lib is not None:
      return root / 'include', lib
  return None


def compile_command(cuda: bool) -> list[str]:
  """The compiler's command line for the CPU build or the CUDA one (output path last).

  Raises:
    GatherUnavailable: no C++ compiler, or (cuda) no CUDA runtime headers and library.
  """
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise GatherUnavailable('no C++ compiler (g++ or $CXX) to build serve/ffi/gather.cc')
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
         str(SOURCE)]
  if cuda:
    runtime = cuda_runtime()
    if runtime is None:
      raise GatherUnavailable('no CUDA runtime headers + libcudart (pip wheel '
                              'nvidia-cuda-runtime-cu12, $CUDA_HOME or /usr/local/cuda)')
    include, lib = runtime
    cmd += ['-DSCONE_CUDA', f'-I{include}', str(lib), f'-Wl,-rpath,{lib.parent}']
  return cmd + ['-o']


def build(cuda: bool) -> pathlib.Path:
  """The shared library of the handler, compiled unless the cache has it."""
  cmd = compile_command(cuda)
  key = hashlib.sha256(SOURCE.read_bytes() + '\0'.join(cmd).encode()).hexdigest()[:16]
  out = cache_dir() / f'gather_{"cuda" if cuda else "cpu"}_{key}.so'
  if out.is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, suffix='.so.tmp')
  os.close(fd)
  try:
    done = subprocess.run(cmd + [tmp], capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise GatherUnavailable(f'compiling {SOURCE.name} failed: '
                              f'{done.stderr.strip().splitlines()[-1:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def target(backend: str) -> str:
  """Builds, loads and registers the handler for a jax backend ('cpu' | 'gpu') once per
  process; returns the FFI target name.

  Raises:
    GatherUnavailable: the backend has no build (e.g. TPU, ROCm), or it fails to build or
      load; the message says why (also remembered: a failed build is not retried).
  """
  name, why = _load(backend)
  if not name:
    raise GatherUnavailable(why)
  return name


@functools.lru_cache(maxsize=None)
def _load(backend: str) -> tuple[str, str]:
  """(target, '') or ('', why not)."""
  if backend not in _HANDLERS:
    return '', f'no FFI gather for the {backend!r} backend (cpu and CUDA only)'
  client = getattr(jax.devices()[0], 'client', None)
  if backend == 'gpu' and 'rocm' in str(getattr(client, 'platform_version', '')).lower():
    return '', 'the GPU backend is not CUDA (ROCm has no build of the gather)'
  symbol, platform = _HANDLERS[backend]
  try:
    handler = getattr(ctypes.CDLL(str(build(cuda=backend == 'gpu'))), symbol)
  except GatherUnavailable as e:
    return '', str(e)
  except (OSError, AttributeError) as e:
    return '', f'loading the compiled gather failed: {e}'
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform=platform)
  return TARGET, ''


class GatherContext:
  """The host arrays one decoder's gather reads (the store's raw-bit shards, scratch
  counters) with their addresses packed into the call's context operand. Holds a
  reference to every array so none is freed while a compiled loop may still read it.

  Attributes: counters (int64 [rows read, calls], updated by the handler), operand.
  """

  def __init__(self, shards: list[np.ndarray], chunk_rows: int, batch_size: int):
    for a in shards:
      if not a.flags.c_contiguous:
        raise ValueError('the FFI gather needs C-contiguous store shards')
    self.counters = np.zeros(2, np.int64)
    ctx = np.zeros(_HEAD + 2 * len(shards), np.int64)
    ctx[[_B, _W, _SHARDS, _CHUNK]] = batch_size, shards[0].shape[1], len(shards), chunk_rows
    ctx[_COUNTERS] = self.counters.ctypes.data
    for i, a in enumerate(shards):
      ctx[_HEAD + 2 * i], ctx[_HEAD + 2 * i + 1] = a.ctypes.data, a.shape[0]
    self._keep = (shards, ctx)
    # Viewed as uint32 so the addresses survive jax's default 32-bit mode.
    self.operand = jnp.asarray(ctx.view(np.uint32))


def gather_call(target_name: str, ids_B: jax.Array, context_operand: jax.Array,
                out: jax.ShapeDtypeStruct) -> jax.Array:
  """Inside jit: rows_BxW (raw bits) of the store for ids_B >= 0, zeros elsewhere."""
  return jax.ffi.ffi_call(target_name, out, has_side_effect=True)(ids_B.astype(jnp.int32),
                                                                  context_operand)
