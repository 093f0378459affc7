"""The fast-moving JAX APIs, behind one small module so a version bump touches one file.

Supported: jax 0.10.x on Python 3.11 (our pins) and jax 0.11+ on 3.12 (GPU/TPU images).
"""

from __future__ import annotations

import glob
import mmap
import os
import re
from typing import Sequence

import jax
import jax.extend
import jax.numpy as jnp
import jaxlib

MESH_AXES = ('data', 'fsdp', 'tensor')


def make_mesh(shape: Sequence[int], names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axes: GSPMD propagates shardings from our in/out annotations.

  jax 0.10 made `jax.make_mesh` default to Explicit axes; our sharding-annotation style
  (logical axes -> NamedSharding on params, with_sharding_constraint on activations) is
  the Auto mode, so we ask for it explicitly.
  """
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  kwargs = {} if devices is None else {'devices': devices}
  return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types, **kwargs)


def set_mesh(mesh: jax.sharding.Mesh):
  """Context manager that makes `mesh` current (replaces the deprecated `with mesh:`)."""
  return jax.set_mesh(mesh)


def cost_flops(compiled) -> float:
  """XLA's FLOP count of a compiled executable (`jit(f).lower(...).compile()`)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returned one dict per device.
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0))


# --- Attention kernels --------------------------------------------------------------------
# Splash attention's default tiles are 128 x 128 (NUM_LANES): shorter or ragged sequences
# stay on einsum.
_SPLASH_BLOCK = 128
_CUDNN_DTYPES = ('bfloat16', 'float16')


def attention_backend(requested: str, dtype, seq_len: int, head_dim: int,
                      platform: str | None = None) -> str:
  """The self-attention kernel for `config.model.attention` on this backend.

  'einsum' and 'cudnn' are returned as asked. 'auto' gives 'cudnn' on NVIDIA GPUs for
  bfloat16 / float16 compute with shapes every cuDNN generation takes (head dim a multiple
  of 8 up to 128; an even length, which its masked training kernel needs), 'splash' on
  TPUs for sequences of whole 128-token tiles, else 'einsum' (CPU always): 'auto' on CPU
  runs exactly the einsum computation.

  Args:
    requested: 'auto' | 'einsum' | 'cudnn'.
    dtype: the compute dtype of q, k, v.
    seq_len: T, the query (= key) length.
    head_dim: E.
    platform: 'cuda' | 'tpu' | 'cpu' | another; default `_platform()`.
  """
  if requested != 'auto':
    return requested
  platform = platform or _platform()
  if (platform == 'cuda' and jnp.dtype(dtype).name in _CUDNN_DTYPES
      and head_dim % 8 == 0 and head_dim <= 128 and seq_len % 2 == 0):
    return 'cudnn'
  if platform == 'tpu' and seq_len % _SPLASH_BLOCK == 0:
    return 'splash'
  return 'einsum'


def _platform() -> str:
  """jax.default_backend(), with NVIDIA GPUs told apart as 'cuda' (cuDNN exists there
  only; a ROCm GPU stays 'gpu')."""
  backend = jax.default_backend()
  if backend == 'gpu' and 'cuda' in jax.extend.backend.get_backend().platform_version:
    return 'cuda'
  return backend


def cudnn_attention(q_BxTxHxE: jax.Array, k_BxTxHxE: jax.Array, v_BxTxHxE: jax.Array,
                    lengths_B: jax.Array | None = None,
                    mask_BxTxT: jax.Array | None = None,
                    implementation: str = 'cudnn') -> jax.Array:
  """Causal cuDNN flash attention (jax.nn.dot_product_attention, implementation='cudnn').

  Always `is_causal=True`, so cuDNN skips the tiles above the diagonal. Rows that are one
  sequence plus right padding pass `lengths_B` (mask type PADDING_CAUSAL: no bias at all).
  Packed rows of several documents pass their same-document mask `mask_BxTxT`: jax's public
  API (0.10) has no segment ids, so it becomes an additive [B, 1, T, T] bias (read per
  layer; its gradient is computed and dropped) on top of the causal tile skipping.
  `implementation='xla'` runs the same call through XLA (how CPU tests check it).
  """
  mask = None if mask_BxTxT is None else mask_BxTxT[:, None]
  return jax.nn.dot_product_attention(
      q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, mask=mask, is_causal=True,
      query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
      implementation=implementation)


def splash_mask(num_heads: int, seq_len: int):
  """The splash kernel's static mask: causal for every head (documents come from the
  segment ids the kernel is called with)."""
  # Imported here, not at the top: it pulls in Pallas' TPU lowering, which only TPU needs.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
  causal = splash_attention_mask.CausalMask((seq_len, seq_len))
  return splash_attention_mask.MultiHeadMask([causal] * num_heads)


def splash_attention(q_BxTxHxE: jax.Array, k_BxTxHxE: jax.Array, v_BxTxHxE: jax.Array,
                     segment_ids_BxT: jax.Array, interpret: bool = False) -> jax.Array:
  """Causal, within-segment attention with the Pallas splash kernel (TPU only;
  `interpret=True` runs the kernel in Pallas' interpreter, on any backend, for tests).

  Keys attend where the segment ids are equal and causal, so padding (segment 0) sees only
  padding: its output is finite and unused, as with einsum. Call it on one shard's arrays
  (the kernel is not partitioned by XLA; layers.py wraps it in shard_map on a mesh).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  _, t, h, e = q_BxTxHxE.shape
  kernel = splash_attention_kernel.make_splash_mha(splash_mask(h, t), head_shards=1,
                                                   q_seq_shards=1, interpret=interpret)
  # The kernel takes [H, T, E] per sequence and applies no 1/sqrt(E) scale of its own.
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q = heads_first(q_BxTxHxE * jnp.asarray(e ** -0.5, q_BxTxHxE.dtype))

  def one(q_HxTxE, k_HxTxE, v_HxTxE, seg_T):
    ids = splash_attention_kernel.SegmentIds(q=seg_T, kv=seg_T)
    return kernel(q_HxTxE, k_HxTxE, v_HxTxE, segment_ids=ids)

  out_BxHxTxE = jax.vmap(one)(q, heads_first(k_BxTxHxE), heads_first(v_BxTxHxE),
                              segment_ids_BxT.astype(jnp.int32))
  return heads_first(out_BxHxTxE)


# --- Compilation cache and XLA flags ------------------------------------------------------
# Where compiled executables persist across processes on GPU/TPU ('' or 'off' disables).
CACHE_ENV = 'SCONE_JAX_XLA_CACHE'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'scone_jax', 'xla')


def enable_compilation_cache(platform: str | None = None) -> str | None:
  """Turns on jax's persistent compilation cache on GPU/TPU; returns its dir (or None).

  A fresh accelerator process then skips recompiling the train/eval/decode steps a
  previous process compiled (minutes for OLMo-size models). The dir is $SCONE_JAX_XLA_CACHE
  (default ~/.cache/scone_jax/xla; '' or 'off' disables it). A dir already configured
  (JAX_COMPILATION_CACHE_DIR) is left alone. CPU is skipped: its compiles are cheap and
  tests must not write into the user's cache.
  """
  platform = platform or jax.default_backend()
  if platform not in ('gpu', 'tpu'):
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
  if path in ('', 'off'):
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  return path


# Each flag exists in jaxlib 0.10.2 (its name is in libjax_common.so); gpu_xla_flags drops
# any the installed jaxlib lacks.
GPU_XLA_FLAGS = {
    # Overlap collectives and async copies with compute (multi-GPU data/fsdp steps).
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
    'xla_gpu_enable_highest_priority_async_stream': 'true',
    # cuBLAS GEMMs over Triton's: for our dense bf16 matmuls cuBLAS is the faster choice
    # and autotuning Triton tiles costs compile time.
    'xla_gpu_enable_triton_gemm': 'false',
    # Prefetch the next scanned layer's (fsdp-gathered) weights during the current one.
    'xla_gpu_enable_while_loop_double_buffering': 'true',
    'xla_gpu_enable_pipelined_all_gather': 'true',
    'xla_gpu_enable_pipelined_reduce_scatter': 'true',
    'xla_gpu_enable_pipelined_all_reduce': 'true',
}


def known_xla_gpu_flags() -> set[str]:
  """The xla_gpu_* flag names the installed jaxlib's binaries contain. XLA aborts the
  process on an unknown flag and flags come and go between releases, so presets are
  filtered through this (a scan of jaxlib's shared libraries, about a second)."""
  names: set[str] = set()
  for lib in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), '**', '*.so*'),
                       recursive=True):
    with open(lib, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      names.update(m.decode() for m in re.findall(rb'xla_gpu_[a-z0-9_]+', mm))
  return names


def gpu_xla_flags(existing: str | None = None, known: set[str] | None = None) -> str:
  """XLA_FLAGS for NVIDIA GPUs: the `GPU_XLA_FLAGS` this jaxlib knows (`known`, default
  `known_xla_gpu_flags()`) added to `existing` (default $XLA_FLAGS), whose own settings
  win. Must be in the environment before jax starts its backend."""
  existing = (os.environ.get('XLA_FLAGS', '') if existing is None else existing).strip()
  known = known_xla_gpu_flags() if known is None else known
  have = {f.split('=', 1)[0].lstrip('-') for f in existing.split()}
  ours = [f'--{k}={v}' for k, v in GPU_XLA_FLAGS.items() if k not in have and k in known]
  return ' '.join(([existing] if existing else []) + ours)
