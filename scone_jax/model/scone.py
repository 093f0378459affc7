"""SconeLM: the backbone plus (for SCONE runs) the f-gram side, joined by the combine rule.

Dimension letters: B batch, T length, R x W the batch's distinct f-grams packed into rows
(batches/tagging.py), N = R * W, D d_model, V vocab, U f-grams.

Baseline (`fgram_model.enabled` False) and SCONE share every code path except
`input_embeddings`: x = T(inputs); for SCONE, each DISTINCT f-gram of the batch gets its
embedding once (`fgram_embeddings` -> e_NxD: A_f over the packed rows for kind='network',
a row of a directly trained table for kind='table') and is gathered back by slot (the
flat index of the f-gram's last token), then joined with the token embedding where a
position has an f-gram by `model.combine.combine` (`fgram_model.combine`: the paper's
'replace' by default, or 'add' / 'gate'), the same function every decode step applies.
fgram_model.kind='hashed' has no `.fgram_model`: `.hashed` (model/hashed.py) ADDS the
hashed n-gram rows ending at each position to T(x_i).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from scone_jax.config import FgramModelConfig, ModelConfig
from scone_jax.model import combine as combine_lib
from scone_jax.model.backbone import Backbone
from scone_jax.model.fgram_model import FgramModel
from scone_jax.model.trained_table import TrainedRows
from scone_jax.model.sharding import constrain, param
from scone_jax.model.hashed import HashedNgramEmbed

SCONE_KEYS = ('fgram_slot_BxT', 'fgram_tokens_RxW', 'fgram_positions_RxW',
              'fgram_segment_ids_RxW', 'fgram_row_ids_RxW')


def _get(batch: Mapping[str, jax.Array], key: str) -> jax.Array:
  if key not in batch:
    raise KeyError(f'batch has no {key!r} (keys: {sorted(batch)}); batch keys are fixed by '
                   'ARCHITECTURE.md "batches"')
  return batch[key]


class SconeLM(nnx.Module):
  """The language model of a run: `.backbone` and `.fgram_model`, the f-gram side (A_f,
  or the table for kind='table'; None for the baseline).

  num_fgrams: S, the rows of the (sliced) f-gram table; needed by kind='table' only.
  """

  def __init__(self, model_cfg: ModelConfig, fgram_model_cfg: FgramModelConfig,
               fgram_max_len: int, vocab_size: int, rngs: nnx.Rngs, num_fgrams: int = 0):
    self.backbone = Backbone(model_cfg, vocab_size, rngs)
    self.kind, self.combine = fgram_model_cfg.kind, fgram_model_cfg.combine
    if fgram_model_cfg.kind == 'table':
      self.fgram_model = TrainedRows(num_fgrams, model_cfg.d_model,
                                         model_cfg.param_dtype, model_cfg.dtype)
    elif fgram_model_cfg.kind == 'network' and fgram_model_cfg.num_layers > 0:
      self.fgram_model = FgramModel(model_cfg, fgram_model_cfg, fgram_max_len,
                                    self.backbone.token_embed, rngs)
    else:
      self.fgram_model = None
    # The gate's logits g [D]: rank 1, so AdamW never decays them (train/optimizer.py).
    self.combine_gate = (param(jnp.full((model_cfg.d_model,), combine_lib.GATE_INIT,
                                        jnp.dtype(model_cfg.param_dtype)), ('embed',))
                         if self.fgram_model is not None and self.combine == 'gate'
                         else None)
    # Created after the backbone and from zeros (no randomness): the backbone's init is
    # the baseline's, and the sum of n-gram rows starts at 0 (model/hashed.py).
    self.hashed = (HashedNgramEmbed(model_cfg, fgram_model_cfg)
                   if fgram_model_cfg.kind == 'hashed' else None)

  @property
  def has_fgram_side(self) -> bool:
    return self.fgram_model is not None

  def fgram_embeddings(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The batch's packed distinct f-grams -> e_NxD (N = R * W, flat rows): A_f's output,
    or for kind='table' the f-grams' table rows, at each f-gram's last token."""
    if self.kind == 'table':
      e_RxWxD = self.fgram_model.lookup(_get(batch, 'fgram_row_ids_RxW'))
    else:
      e_RxWxD = self.fgram_model.packed(_get(batch, 'fgram_tokens_RxW'),
                                        _get(batch, 'fgram_positions_RxW'),
                                        _get(batch, 'fgram_segment_ids_RxW'))
    return e_RxWxD.reshape(-1, e_RxWxD.shape[-1])

  def gate(self) -> jax.Array | None:
    return None if self.combine_gate is None else self.combine_gate[...]

  def export_rows(self, tokens_UxK: jax.Array, lens_U: jax.Array, ids_U: jax.Array,
                  last_U: jax.Array) -> jax.Array:
    """What the exported store holds for f-grams ids_U (tokens_UxK left-aligned, lens_U,
    last tokens last_U): `combine.store_rows` of their embeddings e_UxD."""
    if self.kind == 'table':
      e_UxD = self.fgram_model.rows_of(ids_U)
    else:
      e_UxD = self.fgram_model(tokens_UxK, lens_U)
    if self.combine != 'gate':
      return e_UxD
    last_UxD = self.backbone.embed(last_U[:, None])[:, 0]
    return combine_lib.store_rows(e_UxD, last_UxD, self.combine, self.gate())

  def input_embeddings(self, batch: Mapping[str, jax.Array],
                       fgram_e_NxD: jax.Array | None = None) -> jax.Array:
    """The SCONE embedding rule: x_BxTxD = combine(T(inputs), e[slot]) where slot >= 0,
    else T(inputs) (`model.combine`).

    fgram_e_NxD: `fgram_embeddings(batch)` computed by the caller (gradient accumulation
    runs A_f once for all microbatches); None computes it here.
    """
    x_BxTxD = self.backbone.embed(_get(batch, 'inputs_BxT'))
    if self.hashed is not None:  # x = T(x_i) + the hashed n-grams ending at i.
      e_BxTxD = self.hashed(_get(batch, 'inputs_BxT'), _get(batch, 'positions_BxT'))
      return constrain(x_BxTxD + e_BxTxD.astype(x_BxTxD.dtype), ('batch', 'length', 'embed'))
    if self.fgram_model is None:
      return x_BxTxD
    slot_BxT = _get(batch, 'fgram_slot_BxT')
    e_NxD = self.fgram_embeddings(batch) if fgram_e_NxD is None else fgram_e_NxD
    # Gather in the compute dtype; slot -1 is clipped to row 0 and then masked out.
    e_BxTxD = jnp.take(e_NxD.astype(x_BxTxD.dtype), jnp.maximum(slot_BxT, 0), axis=0)
    x_BxTxD = combine_lib.combine(x_BxTxD, e_BxTxD, slot_BxT >= 0, self.combine, self.gate())
    return constrain(x_BxTxD, ('batch', 'length', 'embed'))

  def __call__(self, batch: Mapping[str, jax.Array],
               fgram_e_NxD: jax.Array | None = None) -> jax.Array:
    """Training forward: batch (ARCHITECTURE.md keys) -> float32 logits_BxTxV."""
    return self.backbone(self.input_embeddings(batch, fgram_e_NxD),
                         _get(batch, 'positions_BxT'), _get(batch, 'segment_ids_BxT'))
