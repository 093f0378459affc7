"""The loss and the one jitted, sharded, donated train step.

Dimension letters: B batch (sequences), T sequence length, V vocabulary, A gradient
accumulation microbatches, R x W the batch's distinct f-grams packed into A_f rows,
N = R * W, D d_model.

The model is split once (`nnx.split`) into a static graphdef and pytrees of arrays, and the
step is a plain `jax.jit` over those pytrees: cheaper per call than `nnx.jit`
(docs/METHOD.md, section 4) and it lets us state every input and output sharding explicitly.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scone_jax import compat
from scone_jax.config import Config
from scone_jax.model import SconeLM, arm_accounting, create_sharded, trained_table
from scone_jax.model.loss import cross_entropy_sums
from scone_jax import mesh as mesh_lib
from scone_jax.train import optimizer as optimizer_lib

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. `other` holds non-Param model variables (e.g. RNG
  counters), kept so that any model with the SconeLM call signature fits."""
  step: jax.Array  # int32 scalar: number of updates applied.
  params: nnx.State
  opt_state: optax.OptState
  other: nnx.State


def is_per_row(key: str) -> bool:
  """Batch arrays named `*_BxT` have one row per sequence; the others (the packed f-gram
  rows `fgram_*_RxW`) are shared by the whole batch."""
  return key.endswith('_BxT')


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, other variables)."""
  return nnx.split(model, nnx.Param, ...)


def init_state(params: nnx.State, other: nnx.State, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> TrainState:
  """Builds the optimizer state inside jit with explicit out_shardings: each moment gets
  its parameter's sharding (`optax.tree_map_params`), scalars are replicated, so nothing
  is ever gathered on one device. `params` must already be sharded on `mesh`."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  other_sh = jax.tree.map(lambda _: replicated, other)
  out_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, other=other_sh)

  def init(params, other):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), other=other)
  return jax.jit(init, out_shardings=out_sh)(params, other)


def state_shardings(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns the pure step `(state, batch) -> (state, metrics)` (not yet jitted).

  With grad_accum_steps = A > 1 the batch's per-row arrays are viewed as [A, B/A, ...] and
  the gradients of the A microbatches are summed in a `lax.scan` before the one update, so
  the result equals the full-batch gradient (up to float summation order). A_f runs ONCE
  per step over the whole batch's distinct f-grams: its forward is taken with `jax.vjp`,
  each microbatch's backward yields the cotangent of A_f's outputs e_NxD (accumulated in
  float32), and one A_f backward at the end turns their sum into A_f's gradients.
  """
  def loss_sums(params, other, batch, fgram_e_NxD=None):
    model = nnx.merge(graphdef, params, other)
    if model.backbone.cfg.loss_chunk:  # The [B, T, V] logits never exist whole.
      loss_sum, weight_sum = model.backbone.chunked_loss_sums(
          model.input_embeddings(batch, fgram_e_NxD), batch['positions_BxT'],
          batch['segment_ids_BxT'], batch['targets_BxT'], batch['weights_BxT'])
    else:
      loss_sum, weight_sum = cross_entropy_sums(
          model(batch, fgram_e_NxD), batch['targets_BxT'], batch['weights_BxT'])
    _, _, new_other = nnx.split(model, nnx.Param, ...)
    return loss_sum, (weight_sum, new_other)

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  micro_grad_fn = jax.value_and_grad(loss_sums, argnums=(0, 3), has_aux=True)

  def fgram_forward(params, other, batch):
    return nnx.merge(graphdef, params, other).fgram_embeddings(batch)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if grad_accum_steps == 1:
      (loss_sum, (weight_sum, other)), grads = grad_fn(state.params, state.other, batch)
    else:
      rows = {k: v.reshape(grad_accum_steps, v.shape[0] // grad_accum_steps, *v.shape[1:])
              for k, v in batch.items() if is_per_row(k)}
      shared = {k: v for k, v in batch.items() if not is_per_row(k)}
      scone = 'fgram_slot_BxT' in batch
      if scone:
        e_NxD, fgram_vjp = jax.vjp(lambda p: fgram_forward(p, state.other, shared),
                                   state.params)
      else:
        e_NxD = None

      def micro(carry, rows_micro):
        grads_acc, e_cot_acc, loss_acc, weight_acc, other = carry
        batch_micro = {**rows_micro, **shared}
        if scone:
          (loss_sum, (weight_sum, other)), (grads, e_cot) = micro_grad_fn(
              state.params, other, batch_micro, e_NxD)
          e_cot_acc = e_cot_acc + e_cot.astype(jnp.float32)
        else:
          (loss_sum, (weight_sum, other)), grads = grad_fn(state.params, other, batch_micro)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (grads_acc, e_cot_acc, loss_acc + loss_sum, weight_acc + weight_sum,
                other), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      e_cot0 = jnp.zeros(e_NxD.shape, jnp.float32) if scone else jnp.zeros((), jnp.float32)
      init = (zeros, e_cot0, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              state.other)
      (grads, e_cot, loss_sum, weight_sum, other), _ = jax.lax.scan(micro, init, rows)
      if scone:
        # The backbone microbatches saw e_NxD as an input, so their grads miss A_f's part
        # (A_f params and the shared token table's A_f path): one backward adds it.
        (fgram_grads,) = fgram_vjp(e_cot.astype(e_NxD.dtype))
        grads = jax.tree.map(jnp.add, grads, fgram_grads)
    # Guard against an all-padding batch (weight 0): loss and grads become 0, not NaN.
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss_sum / denom, 'grad_norm': grad_norm,
               'lr': lr_schedule(state.step), 'tokens': weight_sum}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           other=other)
    return new_state, metrics

  return step


def batch_shardings(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.Sharding]:
  """Every batch array is split along its leading dimension over data x fsdp: per-row
  arrays by sequence, the f-gram arrays by process block ([P*U, K], see ARCHITECTURE.md)."""
  return {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def jit_train_step(step_fn, state: TrainState, batch: Batch, mesh: jax.sharding.Mesh):
  """jax.jit with explicit in/out shardings and the state donated, AOT-compiled against
  `state` and `batch` (arrays or ShapeDtypeStructs). Logs XLA's memory analysis."""
  state_sh = state_shardings(state)
  batch_sh = batch_shardings(batch, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=batch_sh[k])
                    for k, v in batch.items()}
  with compat.set_mesh(mesh):
    compiled = jitted.lower(state, abstract_batch).compile()
  log_memory_analysis(compiled)
  return compiled


class CompiledSteps:
  """The train step AOT-compiled once per batch SHAPE, on first use.

  SCONE batches come in a few shapes (the A_f row buckets, batches/tagging.py); a batch in
  a bucket not seen before compiles the step once more (logged and counted in
  `num_compiled`), it never changes what the model computes. Baseline batches have one
  shape.
  """

  def __init__(self, step_fn, mesh: jax.sharding.Mesh):
    self._step_fn = step_fn
    self._mesh = mesh
    self._compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0

  @property
  def num_compiled(self) -> int:
    return len(self._compiled)

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    key = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))
    compiled = self._compiled.get(key)
    if compiled is None:
      start = time.perf_counter()
      compiled = jit_train_step(self._step_fn, state, batch, self._mesh)
      seconds = time.perf_counter() - start
      self.compile_seconds += seconds
      self._compiled[key] = compiled
      rows = dict(key).get('fgram_tokens_RxW')
      logging.info('train step compiled in %.1f s for batch shape #%d%s', seconds,
                   len(self._compiled), f' (A_f rows {rows[0]} x {rows[1]})' if rows else '')
    return compiled(state, batch)


def log_memory_analysis(compiled) -> dict[str, int]:
  """Per-device bytes XLA plans for the step (empty where the backend does not say)."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return {}
  if analysis is None:
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes', 'alias_size_in_bytes')
  sizes = {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}
  logging.info('train step memory per device: %s',
               ', '.join(f'{k}={v / 2**20:.1f} MiB' for k, v in sizes.items()))
  return sizes


def create_train_state(cfg: Config, mesh: jax.sharding.Mesh, vocab_size: int,
                       fgram_max_len: int, table: Any = None
                       ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """SconeLM params born sharded (`model.create_sharded`), then the optimizer state.

  Params are float32 by default (cfg.model.param_dtype); the model computes in
  cfg.model.dtype and returns float32 logits. The init RNG is `train.seed`: the same seed
  gives the same initial params on any mesh. `table` (the run's FgramTable, before
  slicing) sizes kind='table' to cfg.fgram.rows_used(len(table)) rows and initialises them
  (model/trained_table.py).
  """
  num_fgrams = 0
  if cfg.fgram_model.kind == 'table':
    if table is None:
      raise ValueError("fgram_model.kind='table' needs the run's f-gram table: pass "
                       'create_train_state(..., table=FgramTable)')
    num_fgrams = cfg.fgram.rows_used(len(table))
    # Before any param exists: a table that cannot fit fails now, not out of memory later.
    arm_accounting.check_table_fits(cfg, len(table), mesh,
                                    *mesh_lib.device_memory(cfg.train.device_memory_bytes))

  def make_model():
    return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=fgram_max_len,
                   vocab_size=vocab_size, rngs=nnx.Rngs(cfg.train.seed),
                   num_fgrams=num_fgrams)

  model = create_sharded(make_model, mesh)
  if num_fgrams:
    trained_table.init_rows_from_tokens(model, trained_table.last_tokens(table)[:num_fgrams],
                                      mesh)
  graphdef, params, other = split_model(model)
  tx = optimizer_lib.make_optimizer(cfg.train)
  return graphdef, init_state(params, other, tx, mesh), tx
