"""kind='table': a directly trained [S, d] f-gram embedding on the SAME keys as A_f.

Dimension letters: S f-grams in the (sliced) table, P = S padded (`padded_rows`), D d_model,
R x W the batch's packed distinct f-grams (batches/tagging.py), N = R * W, U f-grams.

The paper's strawman: instead of computing an f-gram's embedding from its tokens with A_f,
learn one free row per f-gram. Same table, same longest-match rule, same batches (the
row id of each distinct f-gram rides in `fgram_row_ids_RxW` at its last token's column,
where A_f's output would be), same combine rule, same export store and decode step; only
what produces e differs. Its costs, which the paper argues against it with: S x D
parameters plus AdamW's two moments on the accelerator during training, and updates
that touch only the rows of the f-grams in a batch (STUDY.md, "Directly trained f-gram
table", measures both).

The rows are sharded over the mesh through the one sharding table (logical axis
`fgram_rows`); P rounds S up to a multiple of `ROW_MULTIPLE` so a mesh axis product
that divides it shards the rows evenly (rows past S are never looked up, never get a
gradient, and are not exported); another product shards them over the axes that divide
P, with a log line (model/sharding.py). A table whose rows and AdamW state cannot fit
one device's memory on the training mesh fails before any param exists
(`arm_accounting.check_table_fits`, called by train/step.py).

Init: zeros at construction (cheap: no token table needed while the model is built);
the trainer then calls `init_rows_from_tokens` (train/step.py), which sets row r to
T(last token of f-gram r) for combine 'replace' / 'gate', so the arm starts at the
baseline's function exactly as A_f's identity init does; for 'add' zero rows already do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from scone_jax.model.sharding import constrain, param

ROW_MULTIPLE = 1024


def padded_rows(num_fgrams: int) -> int:
  """P: the table's parameter rows for S f-grams (S rounded up to ROW_MULTIPLE)."""
  return -(-num_fgrams // ROW_MULTIPLE) * ROW_MULTIPLE


class TrainedRows(nnx.Module):
  """The [P, D] table; `lm.fgram_model` for kind='table'."""

  def __init__(self, num_fgrams: int, d_model: int, param_dtype: str, dtype: str):
    if num_fgrams < 1:
      raise ValueError(f"fgram_model.kind='table' needs the f-gram table's size, got "
                       f'num_fgrams={num_fgrams}: pass SconeLM(..., num_fgrams=len(table))')
    self.num_fgrams = num_fgrams
    self.dtype = jnp.dtype(dtype)
    self.rows = param(jnp.zeros((padded_rows(num_fgrams), d_model), jnp.dtype(param_dtype)),
                      ('fgram_rows', 'embed'))

  def lookup(self, row_ids_RxW: jax.Array) -> jax.Array:
    """Rows for packed row ids -> e_RxWxD (ids < 0 give row 0: never read by a slot)."""
    e_RxWxD = jnp.take(self.rows[...], jnp.maximum(row_ids_RxW, 0), axis=0)
    return constrain(e_RxWxD.astype(self.dtype), ('batch', 'length', 'embed'))

  def rows_of(self, ids_U: jax.Array) -> jax.Array:
    """e_UxD of f-grams ids_U (export)."""
    return jnp.take(self.rows[...], ids_U, axis=0).astype(self.dtype)


def last_tokens(table) -> np.ndarray:
  """int32 [S]: each f-gram's last token (what its row starts as): the low 31 bits of
  its key (fgrams/table.py), so no token matrix is built."""
  return (np.asarray(table.keys, np.uint64) & np.uint64(2**31 - 1)).astype(np.int32)


def init_rows_from_tokens(lm, last_S: np.ndarray, mesh: jax.sharding.Mesh) -> None:
  """Sets `lm`'s table rows to T(last token) (combine 'replace' / 'gate'; see the module
  docstring), in place, inside one jit whose output keeps the rows' sharding."""
  table = lm.fgram_model
  if lm.combine == 'add':
    return  # Zero rows: x = T(x_i) + 0 is already the baseline's function.
  num = table.num_fgrams
  if last_S.shape != (num,):
    raise ValueError(f'last tokens have shape {last_S.shape}, the table has {num} rows')
  rows = table.rows[...]
  last_P = np.zeros(rows.shape[0], np.int32)
  last_P[:num] = last_S
  ids_sh = jax.sharding.NamedSharding(mesh, PartitionSpec(rows.sharding.spec[0]))

  @functools.partial(jax.jit, out_shardings=rows.sharding)
  def init(token_table_VxD, last_P):
    rows_PxD = jnp.take(token_table_VxD, last_P, axis=0).astype(rows.dtype)
    return jnp.where((jnp.arange(last_P.shape[0]) < num)[:, None], rows_PxD, 0)

  table.rows[...] = init(lm.backbone.token_embed.table[...], jax.device_put(last_P, ids_sh))
