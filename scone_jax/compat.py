"""The fast-moving JAX APIs, behind one small module so a version bump touches one file.

Supported: jax 0.10.x on Python 3.11 (our pins) and jax 0.11+ on 3.12 (GPU/TPU images).
"""

from __future__ import annotations

from typing import Sequence

import jax

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
