"""The f-gram model A_f: an f-gram's tokens -> its embedding (docs/METHOD.md, section 1).

Dimension letters: U f-grams, K max f-gram length, D d_model, R packed rows of W tokens
(D is A_f's own width d_f before the projection).

A_f is the backbone's block stack (same `BlockStack` class and `ModelConfig`, depth
`fgram_model.num_layers`) without a token table of its own: its input is the SHARED token
embeddings T(x_j..x_i) plus a learned absolute position embedding of size K. This A_f
always uses learned positions, never RoPE, whatever the backbone family: f-grams are at
most K tokens long and the paper specifies a learned position table of size K (an A_f of
its own width, below, follows its family instead, like the checkpoint it comes from). Attention is
causal; the output is the hidden state at the f-gram's last token (index len-1), then a
final norm per `fgram_model.final_norm` ('same' = the backbone's norm type with its own
parameters, 'none' = the raw residual stream), then `fgram_model.output_scale` (a learned
scalar or per-channel gain, or an RMS norm with a per-channel gain: the output's scale is
otherwise unbounded and after training grows to many times the token embeddings').
With `fgram_model.init='identity'` (the default) the position table and the blocks'
residual output projections start at zero, so A_f(x_j..x_i) = T(x_i) at step 0 (up to the
RMS normalisation for 'rmsnorm_gain'): SCONE starts from the baseline's function.

Attached to a trained backbone (docs/METHOD.md, "Post-training"): `fgram_model.d_model`
gives A_f its own width d_f (own token table, the family's positions: RoPE blocks, or a
learned table of K rows) and a learned projection [d_f, D] after the final norm;
`fgram_model.zero_init_out` starts that projection at zero, so with combine='add' the
first step computes the backbone exactly (T(x_i) + 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scone_jax.config import FgramModelConfig, ModelConfig
from scone_jax.model.backbone import Embed
from scone_jax.model.layers import BlockStack, FinalNorm, apply_norm, self_attention
from scone_jax.model.sharding import constrain, param


class FgramModel(nnx.Module):
  """A_f. Holds a reference to the backbone's token table (shared, not copied)."""

  def __init__(self, model_cfg: ModelConfig, fgram_model_cfg: FgramModelConfig,
               fgram_max_len: int, token_embed: Embed, rngs: nnx.Rngs):
    if fgram_model_cfg.num_layers < 1:
      raise ValueError('FgramModel needs config.fgram_model.num_layers >= 1 (0 means the '
                       'baseline, which has no A_f)')
    if fgram_max_len < 2:
      raise ValueError(f'fgram_max_len={fgram_max_len} must be >= 2 (config.fgram.max_len)')
    self.max_len = fgram_max_len
    af = fgram_model_cfg.arch(model_cfg)
    own = af is not model_cfg
    dtype = jnp.dtype(model_cfg.param_dtype)
    # Own width: a model of its own (its token table and its family's positions); shared
    # width: the backbone's table and always learned positions (the paper's A_f).
    self.token_embed = Embed(token_embed.table.shape[0], af, rngs) if own else token_embed
    self.rope = own and af.position == 'rope'
    self.pos_table = None if self.rope else param(
        af.init_std * jax.random.normal(rngs.params(), (fgram_max_len, af.d_model), dtype),
        ('fgram_pos', 'embed'))
    self.blocks = BlockStack(af, fgram_model_cfg.num_layers, rope=self.rope, rngs=rngs)
    if fgram_model_cfg.init == 'identity':
      # A_f starts as the identity on the f-gram's last token (config.FgramModelConfig.init).
      for zeroed in (self.pos_table, self.blocks.wo, self.blocks.w_out):
        if zeroed is not None:
          zeroed[...] = jnp.zeros_like(zeroed[...])
    self.final_norm = (FinalNorm(af.norm, af.d_model, af.param_dtype)
                       if fgram_model_cfg.final_norm == 'same' else None)
    # [d_f, D]: zero for zero_init_out (A_f's output starts at 0: with combine='add' step 0
    # is the backbone exactly), else the usual init. Both dims are widths; the sharding
    # table gives fsdp to the first only (a mesh axis serves one dimension).
    self.proj = param(
        jnp.zeros((af.d_model, model_cfg.d_model), dtype) if fgram_model_cfg.zero_init_out
        else af.init_std * jax.random.normal(rngs.params(), (af.d_model, model_cfg.d_model),
                                             dtype),
        ('embed', 'embed')) if fgram_model_cfg.projects else None
    self.output_scale = fgram_model_cfg.output_scale
    d = model_cfg.d_model
    # Gains are rank < 2, so AdamW never decays them (train/optimizer.py).
    if self.output_scale == 'scalar':
      self.out_gain = param(jnp.ones((), dtype), ())
    elif self.output_scale == 'channel':
      self.out_gain = param(jnp.ones((d,), dtype), ('embed',))
    elif self.output_scale == 'rmsnorm_gain':
      # Unit-RMS output times init_std: the scale the token embeddings start at.
      self.out_gain = param(jnp.full((d,), model_cfg.init_std, dtype), ('embed',))
    else:
      self.out_gain = None

  def packed(self, tokens_RxW: jax.Array, positions_RxW: jax.Array,
             segment_ids_RxW: jax.Array, one_segment: bool = False) -> jax.Array:
    """A_f over rows of PACKED f-grams (batches/tagging.py) -> e_RxWxD.

    Each f-gram is one segment of its row (segment ids 1.., 0 = padding) with positions
    0..len-1; attention is causal within the segment, so every f-gram is embedded exactly
    as if it ran alone. e_RxWxD at an f-gram's last token is its embedding (other entries
    are meaningless but finite). one_segment: each row holds one f-gram then padding
    (`layers.self_attention`).
    """
    x_RxWxD = self.token_embed(tokens_RxW)
    if self.pos_table is not None:
      pos_RxWxD = jnp.take(self.pos_table[...], positions_RxW, axis=0)
      x_RxWxD = x_RxWxD + pos_RxWxD.astype(x_RxWxD.dtype)
    x_RxWxD = constrain(x_RxWxD, ('batch', 'length', 'embed'))
    attention = self_attention(segment_ids_RxW, self.blocks.cfg, one_segment)
    full = lambda q, kk, v, _: (attention(q, kk, v), None)
    h_RxWxD, _ = self.blocks(x_RxWxD, positions_RxW, full)
    # The output rules act per vector, so applying them at every position and reading the
    # last token equals reading first and applying them (what __call__ relies on).
    if self.final_norm is not None:
      h_RxWxD = self.final_norm(h_RxWxD)
    if self.proj is not None:
      h_RxWxD = h_RxWxD @ self.proj[...].astype(h_RxWxD.dtype)
    if self.output_scale == 'rmsnorm_gain':
      h_RxWxD = apply_norm('rmsnorm', h_RxWxD, self.out_gain[...])
    elif self.out_gain is not None:
      h_RxWxD = (h_RxWxD.astype(jnp.float32) * self.out_gain[...].astype(jnp.float32)
                 ).astype(h_RxWxD.dtype)
    return constrain(h_RxWxD, ('batch', 'length', 'embed'))

  def __call__(self, tokens_UxK: jax.Array, lens_U: jax.Array) -> jax.Array:
    """Embeds U left-aligned, 0-padded f-grams of lengths lens_U -> e_UxD (export, tests).

    The same computation as `packed` with one f-gram per row. Rows with length 0 give a
    finite, meaningless vector.
    """
    u, k = tokens_UxK.shape
    if k != self.max_len:
      raise ValueError(f'fgram tokens have K={k} columns but A_f was built for '
                       f'fgram_max_len={self.max_len} (config.fgram.max_len)')
    positions_UxK = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (u, k))
    # Causal within the f-gram; padding sits after the last token so it is never seen.
    h_UxKxD = self.packed(tokens_UxK, positions_UxK, jnp.ones((u, k), jnp.int32),
                          one_segment=True)
    last_U = jnp.clip(lens_U.astype(jnp.int32) - 1, 0, k - 1)
    e_UxD = jnp.take_along_axis(h_UxKxD, last_U[:, None, None], axis=1)[:, 0]
    return constrain(e_UxD, ('batch', 'embed'))
