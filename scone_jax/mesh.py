"""Device mesh and multi-host start-up.

The mesh has three axes (`data`, `fsdp`, `tensor`, see `scone_jax.compat.MESH_AXES`); the
batch is split over `data` x `fsdp` and the model's logical axes are mapped onto them by the
one table in `scone_jax.model.sharding`.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from scone_jax import compat
from scone_jax import config_runtime
from scone_jax.config import DistributedConfig, MeshConfig

# The batch dimension of every input array is split over these mesh axes.
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves `data=-1` and checks that the axes multiply to the device count."""
  return config_runtime.resolve_mesh(mesh_cfg, num_devices)


def check_mesh(mesh_cfg: MeshConfig, num_devices: int,
               global_batch: int | None = None) -> tuple[int, int, int]:
  """The resolved (data, fsdp, tensor) shape; checks it against the devices and the batch
  (each batch shard must get whole sequences). Cheap: call it before any work."""
  shape = mesh_shape(mesh_cfg, num_devices)
  if global_batch is not None:
    config_runtime.check_batch_on_mesh(global_batch, shape)
  return shape


def make_mesh(mesh_cfg: MeshConfig, global_batch: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices).

  Args:
    mesh_cfg: the `mesh` config section.
    global_batch: if given, checked to be divisible by data*fsdp.
    devices: the devices to use (tests pass a subset).

  On GPU/TPU this also turns on the persistent compilation cache
  (`compat.enable_compilation_cache`), so every entry point that builds a mesh gets it.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = check_mesh(mesh_cfg, len(devices), global_batch)
  cache_dir = compat.enable_compilation_cache()
  if cache_dir:
    logging.log_first_n(logging.INFO, 'XLA compilation cache: %s', 1, cache_dir)
  return compat.make_mesh(shape, compat.MESH_AXES, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] input array: B split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def device_memory(override_bytes: int = 0) -> tuple[int, str]:
  """(bytes of one device's memory, where the figure comes from): the override if > 0,
  else the device's `memory_stats()` limit, else (CPU) the host's RAM over its local
  devices, which share it."""
  if override_bytes > 0:
    return override_bytes, 'config.train.device_memory_bytes'
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} memory_stats'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return ram // jax.local_device_count(), (
      f'host RAM / {jax.local_device_count()} local devices')


def maybe_initialize_distributed(dist_cfg: DistributedConfig) -> None:
  """Starts JAX's multi-process runtime per `config.distributed.mode`.

  'none' does nothing; 'auto' calls `jax.distributed.initialize()` (TPU pods, SLURM and
  other clusters it detects); 'explicit' passes coordinator/num_processes/process_id. On
  CPU the cross-process collectives need an implementation chosen before the backend
  starts (gloo; docs/METHOD.md, "Measured facts"). Must run before the first JAX computation.
  """
  if dist_cfg.mode == 'none':
    return
  if jax.distributed.is_initialized():
    return
  if dist_cfg.cpu_collectives:
    # Only affects the CPU backend; harmless on TPU/GPU.
    jax.config.update('jax_cpu_collectives_implementation', dist_cfg.cpu_collectives)
  if dist_cfg.mode == 'auto':
    jax.distributed.initialize()
  else:  # 'explicit': config.validate checked the fields.
    jax.distributed.initialize(coordinator_address=dist_cfg.coordinator_address,
                               num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id)
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
