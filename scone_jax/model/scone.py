"""SconeLM: the backbone plus (for SCONE runs) A_f, joined by the embedding rule.

Dimension letters: B batch, T length, R x W the batch's distinct f-grams packed into rows
(batches/tagging.py), N = R * W, D d_model, V vocab.

Baseline (fgram_model.num_layers == 0) and SCONE share every code path except
`input_embeddings`: x = T(inputs); for SCONE, each DISTINCT f-gram of the batch is run
through A_f once (packed rows, `fgram_embeddings` -> e_NxD) and gathered back by slot (the
flat index of the f-gram's last token), REPLACING the token embedding where a position has
an f-gram (no add, no gate; docs/METHOD.md). fgram_model.kind='hashed' has no A_f: `.hashed`
(model/hashed.py) ADDS the hashed n-gram rows ending at each position to T(x_i).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from scone_jax.config import FgramModelConfig, ModelConfig
from scone_jax.model.backbone import Backbone
from scone_jax.model.fgram_model import FgramModel
from scone_jax.model.hashed import HashedNgramEmbed
from scone_jax.model.sharding import constrain

SCONE_KEYS = ('fgram_slot_BxT', 'fgram_tokens_RxW', 'fgram_positions_RxW',
              'fgram_segment_ids_RxW')


def _get(batch: Mapping[str, jax.Array], key: str) -> jax.Array:
  if key not in batch:
    raise KeyError(f'batch has no {key!r} (keys: {sorted(batch)}); batch keys are fixed by '
                   'ARCHITECTURE.md "batches"')
  return batch[key]


class SconeLM(nnx.Module):
  """The language model of a run: `.backbone` and `.fgram_model` (None for the baseline)."""

  def __init__(self, model_cfg: ModelConfig, fgram_model_cfg: FgramModelConfig,
               fgram_max_len: int, vocab_size: int, rngs: nnx.Rngs):
    self.backbone = Backbone(model_cfg, vocab_size, rngs)
    self.fgram_model = FgramModel(
        model_cfg, fgram_model_cfg, fgram_max_len, self.backbone.token_embed,
        rngs) if fgram_model_cfg.num_layers > 0 else None
    # Created after the backbone and from zeros (no randomness): the backbone's init is
    # the baseline's, and the sum of n-gram rows starts at 0 (model/hashed.py).
    self.hashed = (HashedNgramEmbed(model_cfg, fgram_model_cfg)
                   if fgram_model_cfg.kind == 'hashed' else None)

  @property
  def is_scone(self) -> bool:
    return self.fgram_model is not None

  def fgram_embeddings(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """A_f over the batch's packed distinct f-grams -> e_NxD (N = R * W, flat rows)."""
    e_RxWxD = self.fgram_model.packed(_get(batch, 'fgram_tokens_RxW'),
                                      _get(batch, 'fgram_positions_RxW'),
                                      _get(batch, 'fgram_segment_ids_RxW'))
    return e_RxWxD.reshape(-1, e_RxWxD.shape[-1])

  def input_embeddings(self, batch: Mapping[str, jax.Array],
                       fgram_e_NxD: jax.Array | None = None) -> jax.Array:
    """The SCONE embedding rule: x_BxTxD = e[slot] where slot >= 0, else T(inputs).

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
    x_BxTxD = jnp.where((slot_BxT >= 0)[..., None], e_BxTxD, x_BxTxD)
    return constrain(x_BxTxD, ('batch', 'length', 'embed'))

  def __call__(self, batch: Mapping[str, jax.Array],
               fgram_e_NxD: jax.Array | None = None) -> jax.Array:
    """Training forward: batch (ARCHITECTURE.md keys) -> float32 logits_BxTxV."""
    return self.backbone(self.input_embeddings(batch, fgram_e_NxD),
                         _get(batch, 'positions_BxT'), _get(batch, 'segment_ids_BxT'))
