"""The ONE table from logical axis names to mesh axes, and the helpers that apply it.

Every parameter carries logical axis names (metadata key `logical_axes` on its
`nnx.Param`); activations are annotated with `constrain(x, names)`. No layer names a mesh
axis: changing the parallelism layout means editing `LOGICAL_AXIS_RULES` only.

Mesh axes (`scone_jax.compat.MESH_AXES`): `data` (pure data parallel, params replicated),
`fsdp` (data parallel whose params and optimizer state are split, ZeRO-3 style) and `tensor`
(Megatron-style model parallel inside a layer).

Flax's own `out_sharding` metadata is deliberately not used: with eager sharding (the
flax 0.12 default) it makes creating a module outside a mesh an error, and our models must
build the same way on one CPU and on a pod.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from absl import logging
import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from scone_jax import compat

LogicalAxes = Sequence[str | None]

# Why each mapping:
# * batch -> (data, fsdp): every data-parallel replica gets whole sequences.
# * embed -> fsdp: params are split along d_model over the fsdp axis (all-gathered per
#   layer in the forward), so params+Adam state scale down with fsdp. In activations the
#   batch already uses fsdp, so `embed` falls back to replicated there (first use wins).
# * mlp / heads / vocab -> tensor: the wide dimensions of the MLP, attention heads and
#   the output softmax are split Megatron-style; these matmuls then need one reduction each.
# * fgram_rows -> (fsdp, tensor): the rows of the [S, d] f-gram table of kind='table', the
#   largest parameter of that arm, are split over every model-sharding axis (its AdamW
#   moments follow), so the table's memory scales down with fsdp * tensor; a lookup is a
#   local masked gather plus one reduction. `embed` then stays whole in the table. Its
#   rows are padded to a multiple of 1024 (trained_table.ROW_MULTIPLE), which every
#   power-of-two fsdp * tensor up to 1024 divides; another product shards the rows over
#   the axes that divide them and logs the rest (`model_shardings`);
#   arm_accounting.check_table_fits refuses a table that does not fit before any work.
# * length, kv (head dim), fgram_pos, layers: replicated (no sequence or pipeline
#   parallelism; the stacked `layers` axis is scanned over, so it must stay whole).
# * ngram_rows -> tensor: the rows of the hashed n-gram tables (kind='hashed') are split
#   like the vocab; with `embed` on fsdp a table of O * M rows is spread over both axes.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('fgram_pos', None),
    ('fgram_rows', ('fsdp', 'tensor')),
    ('layers', None),
    ('ngram_rows', 'tensor'),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def logical_to_spec(names: LogicalAxes, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                    partial: bool = False) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through `LOGICAL_AXIS_RULES`.

  A mesh axis is used by at most one dimension (the first that asks for it). With `mesh`,
  mesh axes it lacks are dropped; with `shape` too, a dimension its mesh axes do not
  divide evenly is replicated instead (e.g. GPT-2's vocab 50257 over tensor=2), or, with
  `partial` (parameters: `model_shardings`, which logs what stays replicated), split over
  the largest product of its mesh axes that divides it.

  Args:
    names: one logical name (or None = replicated) per dimension.
    shape: the array's shape, to check divisibility.
    mesh: the mesh (concrete or abstract) the spec is for.
    partial: split a dimension over the subset of its axes that divides it (see above).

  Returns:
    The PartitionSpec, one entry per dimension.
  """
  if shape is not None and len(shape) != len(names):
    raise ValueError(f'logical axes {tuple(names)} do not match an array of shape '
                     f'{tuple(shape)}: give one name per dimension')
  used: set[str] = set()
  entries = []
  for dim, name in enumerate(names):
    if name is not None and name not in _RULES:
      raise ValueError(f'unknown logical axis {name!r}; known: {sorted(_RULES)} '
                       '(add it to LOGICAL_AXIS_RULES in scone_jax/model/sharding.py)')
    target = _RULES.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape)
      if shape is not None:
        axes = (_dividing_axes(axes, shape[dim], mesh) if partial else
                () if shape[dim] % math.prod(mesh.shape[a] for a in axes) else axes)
    used.update(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def _dividing_axes(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...]:
  """The ordered subset of `axes` with the largest product that divides `size` (the first
  such subset on ties; () when no axis divides it)."""
  subsets = [tuple(a for i, a in enumerate(axes) if keep >> i & 1)
             for keep in range(2 ** len(axes) - 1, -1, -1)]
  fits = [sub for sub in subsets if size % math.prod(mesh.shape[a] for a in sub) == 0]
  return max(fits, key=lambda sub: math.prod(mesh.shape[a] for a in sub))


def shard_count(spec: PartitionSpec, mesh) -> int:
  """Into how many pieces `spec` splits an array on `mesh` (its memory per device is the
  array's bytes over this)."""
  axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
  return math.prod(mesh.shape[a] for a in axes)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
  """`with_sharding_constraint` through the table; a no-op when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def param(value: jax.Array, names: LogicalAxes) -> nnx.Param:
  """An `nnx.Param` carrying its logical axis names (read by `model_shardings`)."""
  if len(names) != value.ndim:
    raise ValueError(f'logical axes {tuple(names)} do not match param shape {value.shape}')
  return nnx.Param(value, logical_axes=tuple(names))


_WARNED: set[tuple[Any, ...]] = set()  # (names, shape, mesh) already logged.


def _variable_spec(variable: nnx.Variable, mesh) -> PartitionSpec:
  names = variable.get_metadata().get('logical_axes')
  shape = variable.shape if hasattr(variable, 'shape') else variable[...].shape
  if names is None:
    return PartitionSpec(*([None] * len(shape)))
  spec = logical_to_spec(names, shape, mesh, partial=True)
  wanted = logical_to_spec(names, None, mesh)
  lost = shard_count(wanted, mesh) // shard_count(spec, mesh)
  if lost > 1 and (tuple(names), tuple(shape), tuple(mesh.shape.items())) not in _WARNED:
    # Replicated on purpose (no even split), never silently: it costs `lost` x the memory.
    _WARNED.add((tuple(names), tuple(shape), tuple(mesh.shape.items())))
    logging.warning('a parameter %s %s is split %s, not %s as its rules ask (%s do not '
                    'divide its dimensions): each device holds %dx its share',
                    tuple(names), tuple(shape), spec, wanted, dict(mesh.shape), lost)
  return spec


def model_shardings(model_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a model state (from `nnx.split`/`nnx.state`, abstract or real).

  Returns the same tree with each Variable's value replaced by its NamedSharding, the
  form `jax.jit(out_shardings=...)`, `jax.device_put` and orbax restore args accept.
  Variables without logical axes (e.g. RNG counters) are replicated.
  """
  def to_sharding(variable):
    return variable.replace(NamedSharding(mesh, _variable_spec(variable, mesh)))
  return jax.tree.map(to_sharding, model_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], nnx.Module],
                   mesh: jax.sharding.Mesh) -> nnx.Module:
  """Builds `make_model()` with every parameter born sharded on `mesh`.

  The shapes come from `nnx.eval_shape` (no memory), the init runs inside `jax.jit` with
  `out_shardings` from the table, so no device ever holds a full unsharded copy.

  Args:
    make_model: builds the model; it must create its own `nnx.Rngs` (traced inside jit).
    mesh: the device mesh.

  Returns:
    The model, its params sharded per `LOGICAL_AXIS_RULES`.
  """
  with compat.set_mesh(mesh):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = model_shardings(abstract_state, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
      return nnx.split(make_model())[1]

    return nnx.merge(graphdef, init())
