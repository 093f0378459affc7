"""Decoder-only backbone (GPT-2 or OLMo family) that takes input EMBEDDINGS, plus KV cache.

Dimension letters: B batch, T length, S cache length, D d_model, H heads, K key/value
heads, E head dim, V vocab, L layers.

The forward takes embeddings, not token ids, so SCONE (f-gram embeddings replacing T(x))
and the baseline share every path after the embedding rule, including decode. Learned
positions are added inside the forward for the same reason. Families (resolved by
`config.validate`): GPT-2 = learned positions, LayerNorm, GELU 4d MLP, biases, tied head;
OLMo = RoPE, non-parametric LayerNorm (or RMSNorm), SwiGLU or plain MLP, no biases; the
Hugging Face families (llama, qwen2, qwen3, olmo2) as their checkpoints (`layers.BlockStack`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from scone_jax.config import ModelConfig
from scone_jax.model import loss as loss_lib
from scone_jax.model.layers import (BlockStack, FinalNorm, ServingBlocks, attend_filled,
                                    self_attention)
from scone_jax.model.sharding import constrain, param


class Embed(nnx.Module):
  """The token table T [V, D], shared by the input, A_f and (when tied) the output head."""

  def __init__(self, vocab_size: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    value = cfg.init_std * jax.random.normal(
        rngs.params(), (vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    self.table = param(value, ('vocab', 'embed'))

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    x_BxTxD = jnp.take(self.table[...], tokens_BxT, axis=0).astype(self.dtype)
    return constrain(x_BxTxD, ('batch', 'length', 'embed'))


@struct.dataclass
class KVCache:
  """Decode state, a plain pytree: k, v [L, B, S, K, E] (K key/value heads) and per-row
  lengths [B].

  Row b holds keys/values of positions [0, lengths[b]); the next token goes to position
  lengths[b].
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


# Keys per block of the decode attention (`attend_filled`): a step reads the cache up to
# the longest row's fill rounded up to this, so short fills in a long cache cost little,
# and per-block loop overhead stays small next to a block's work.
DECODE_CHUNK = 128


def _write_rows(cache_LxBxSxHxE: jax.Array, layer: jax.Array, new_Bx1xHxE: jax.Array,
                pos_B: jax.Array) -> jax.Array:
  """Writes each row's new key/value at that row's own position in layer `layer`: one
  scatter of B rows, in place when the cache buffer is the loop's (donated) carry."""
  rows_B = jnp.arange(cache_LxBxSxHxE.shape[1])
  return cache_LxBxSxHxE.at[layer, rows_B, pos_B].set(
      new_Bx1xHxE[:, 0].astype(cache_LxBxSxHxE.dtype), indices_are_sorted=True,
      unique_indices=True)


class Backbone(nnx.Module):
  """Token table + (learned position table) + block stack + final norm + output head."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, rngs: nnx.Rngs):
    if vocab_size < 1:
      raise ValueError(f'vocab_size={vocab_size} must be >= 1: pass the tokenizer\'s '
                       'vocab size (or set config.model.vocab_size)')
    if cfg.attention == 'cudnn' and cfg.dtype != 'bfloat16':
      raise ValueError("config.model.attention='cudnn' needs config.model.dtype='bfloat16' "
                       "(cuDNN flash attention has no float32 kernel); or use 'einsum'")
    self.cfg, self.vocab_size = cfg, vocab_size
    self.token_embed = Embed(vocab_size, cfg, rngs)
    pd = jnp.dtype(cfg.param_dtype)
    self.pos_table = param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.max_seq_len, cfg.d_model), pd),
        ('length', 'embed')) if cfg.position == 'learned' else None
    self.blocks = BlockStack(cfg, cfg.num_layers, rope=cfg.position == 'rope', rngs=rngs)
    self.final_norm = FinalNorm(cfg.norm, cfg.d_model, pd, cfg.norm_eps)
    self.head = param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, vocab_size), pd),
        ('embed', 'vocab')) if not cfg.tied_embeddings else None

  def embed(self, tokens_BxT: jax.Array) -> jax.Array:
    """T(tokens): [B, T] int -> [B, T, D] in the compute dtype (no positions added)."""
    return self.token_embed(tokens_BxT)

  def _add_positions(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    x_BxTxD = x_BxTxD.astype(jnp.dtype(self.cfg.dtype))
    if self.pos_table is not None:
      x_BxTxD = x_BxTxD + jnp.take(self.pos_table[...], positions_BxT, axis=0,
                                   mode='clip').astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ('batch', 'length', 'embed'))

  def _project(self, h_BxTxD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> float32 logits [B, T, V] (tied: the token table)."""
    if self.head is None:
      w_VxD = self.token_embed.table[...].astype(h_BxTxD.dtype)
      logits_BxTxV = jnp.einsum('btd,vd->btv', h_BxTxD, w_VxD,
                                preferred_element_type=jnp.float32)
    else:
      logits_BxTxV = jnp.einsum('btd,dv->btv', h_BxTxD, self.head[...].astype(h_BxTxD.dtype),
                                preferred_element_type=jnp.float32)
    return constrain(logits_BxTxV, ('batch', 'length', 'vocab'))

  def _logits(self, x_BxTxD: jax.Array) -> jax.Array:
    return self._project(self.final_norm(x_BxTxD))

  def _hidden(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
              segment_ids_BxT: jax.Array) -> jax.Array:
    """The last block's output (before the final norm) of the training/eval forward."""
    attention = self_attention(segment_ids_BxT, self.cfg)
    x_BxTxD = self._add_positions(x_BxTxD, positions_BxT)
    x_BxTxD, _ = self.blocks(x_BxTxD, positions_BxT, lambda q, k, v, _: (attention(q, k, v),
                                                                         None))
    return x_BxTxD

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array) -> jax.Array:
    """Training/eval forward: embeddings -> float32 logits [B, T, V].

    Attention is causal and within segment (segment 0 = padding, never attended), and
    positions restart per document, so a packed row equals its documents run apart.
    """
    return self._logits(self._hidden(x_BxTxD, positions_BxT, segment_ids_BxT))

  def chunked_loss_sums(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                        segment_ids_BxT: jax.Array, targets_BxT: jax.Array,
                        weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`loss.cross_entropy_sums` of `__call__`'s logits, computed `model.loss_chunk`
    positions at a time (`loss.chunked_cross_entropy_sums`): the float32 logits are never
    held whole, in the forward or the backward."""
    if self.cfg.loss_chunk < 1:
      raise ValueError(f'chunked_loss_sums needs config.model.loss_chunk >= 1, got '
                       f'{self.cfg.loss_chunk}; use cross_entropy_sums(model(...)) for 0')
    h_BxTxD = self.final_norm(self._hidden(x_BxTxD, positions_BxT, segment_ids_BxT))
    return loss_lib.chunked_cross_entropy_sums(self._project, h_BxTxD, targets_BxT,
                                               weights_BxT, self.cfg.loss_chunk)

  def for_serving(self) -> Backbone:
    """This backbone with its blocks in the serving layout (`layers.ServingBlocks`: q, k
    and v fused, every layer's weights separate), for `prefill` and `decode`; the token
    table, position table, final norm and head are the same arrays, not copies."""
    graphdef, state = nnx.split(self)
    serving = nnx.merge(graphdef, state)
    serving.blocks = ServingBlocks(self.blocks)
    return serving

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + new)."""
    cfg = self.cfg
    if cfg.position == 'learned' and max_len > cfg.max_seq_len:
      raise ValueError(f'max_len={max_len} exceeds the learned position table '
                       f'(config.model.max_seq_len={cfg.max_seq_len}); decode fewer tokens')
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch_size, max_len, cfg.kv_heads, cfg.head_size)
    names = ('layers', 'batch', 'length', 'heads', 'kv')
    return KVCache(k=constrain(jnp.zeros(shape, dtype), names),
                   v=constrain(jnp.zeros(shape, dtype), names),
                   lengths=jnp.zeros((batch_size,), jnp.int32))

  def prefill(self, x_BxTxD: jax.Array, lengths_B: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs right-padded prompts (row b has lengths_B[b] real tokens) into an empty cache.

    Returns:
      (logits_BxTxV: row b is valid at t < lengths_B[b]; the next token's distribution
      is at t = lengths_B[b] - 1, the cache with lengths = lengths_B).
    """
    b, t, _ = x_BxTxD.shape
    if t > cache.max_len:
      raise ValueError(f'prompt length {t} exceeds the cache length {cache.max_len}; '
                       'init_cache with a larger max_len')
    lengths_B = lengths_B.astype(jnp.int32)
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids_BxT = (positions_BxT < lengths_B[:, None]).astype(jnp.int32)
    attention = self_attention(segment_ids_BxT, self.cfg, one_segment=True)
    x_BxTxD = self._add_positions(x_BxTxD, positions_BxT)
    keep_kv = lambda q, k, v, _: (attention(q, k, v), (k, v))
    x_BxTxD, (k_LxBxTxHxE, v_LxBxTxHxE) = self.blocks(x_BxTxD, positions_BxT, keep_kv)
    at = (0, 0, 0, 0, 0)
    cache = KVCache(
        k=jax.lax.dynamic_update_slice(cache.k, k_LxBxTxHxE.astype(cache.k.dtype), at),
        v=jax.lax.dynamic_update_slice(cache.v, v_LxBxTxHxE.astype(cache.v.dtype), at),
        lengths=lengths_B)
    return self._logits(x_BxTxD), cache

  def decode(self, x_Bx1xD: jax.Array, cache: KVCache,
             pos_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """One token per row at position pos_B (default: the row's current cache length).

    Returns:
      (logits_Bx1xV, the cache with the token's keys/values written and lengths = pos_B+1).
    """
    pos_B = cache.lengths if pos_B is None else pos_B.astype(jnp.int32)
    positions_Bx1 = pos_B[:, None]
    x_Bx1xD = self._add_positions(x_Bx1xD, positions_Bx1)

    def step(q, k, v, layer_state):
      layer, (k_cache, v_cache) = layer_state
      k_cache = _write_rows(k_cache, layer, k, pos_B)
      v_cache = _write_rows(v_cache, layer, v, pos_B)
      out = attend_filled(q, k_cache, v_cache, layer, pos_B + 1, DECODE_CHUNK)
      return out, (k_cache, v_cache)

    # The cache rides in the layer scan's carry: each layer writes its B new rows and
    # reads its keys in place; nothing cache-sized is sliced out, restacked or copied.
    x_Bx1xD, (k, v) = self.blocks(x_Bx1xD, positions_Bx1, step, state=(cache.k, cache.v))
    return self._logits(x_Bx1xD), KVCache(k=k, v=v, lengths=pos_B + 1)
