"""Transformer building blocks shared by the backbone and the f-gram model A_f.

Dimension letters: B batch, T query length, S key length, D d_model, H heads, K key/value
heads (grouped-query attention: H = K G), E head dim (`ModelConfig.head_size`), F MLP
width, V vocab, L layers.

The layer stack keeps its parameters stacked along a leading `layers` axis and runs them
with `jax.lax.scan`: compile time stays flat in depth (36-layer OLMo). Decode threads the
KV cache [L, B, S, K, E] (K = num_kv_heads) through the scan's carry
(`BlockStack(..., state=)`), so each layer writes only its new rows in place and reads keys
only up to the filled length (`attend_filled`). Serving (prefill and decode) runs the same
blocks on `ServingBlocks`, the weights laid out once per layer with q, k and v fused.
Norms, softmax and RoPE run in float32; matmuls run in the compute dtype
(`ModelConfig.dtype`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from scone_jax import compat
from scone_jax.config import ModelConfig
from scone_jax.model.sharding import constrain, logical_to_spec, param

# Attention logits of masked keys; finite so a fully masked row cannot make NaNs.
_MASKED = -1e30
_NORM_EPS = {'layernorm': 1e-5, 'rmsnorm': 1e-6, 'nonparametric': 1e-5}
# config.model.remat -> the jax.checkpoint policy of one block ('none': no checkpoint).
_REMAT_POLICIES = {'block': None,
                   'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def norm_params(kind: str, prefix: tuple[int, ...], d: int, dtype,
                axes: tuple[str, ...]) -> dict[str, nnx.Param]:
  """Parameters of one norm: LayerNorm scale+bias, RMSNorm scale, non-parametric none."""
  names = axes + ('embed',)
  out = {}
  if kind in ('layernorm', 'rmsnorm'):
    out['scale'] = param(jnp.ones(prefix + (d,), dtype), names)
  if kind == 'layernorm':
    out['bias'] = param(jnp.zeros(prefix + (d,), dtype), names)
  return out


def apply_norm(kind: str, x_BxTxD: jax.Array, scale=None, bias=None,
               eps: float = 0.0) -> jax.Array:
  """LayerNorm / RMSNorm / non-parametric LayerNorm (OLMo-1) over the last axis, computed
  in float32; eps 0 = the norm's default (`ModelConfig.norm_eps`)."""
  x = x_BxTxD.astype(jnp.float32)
  eps = eps or _NORM_EPS[kind]
  if kind == 'rmsnorm':
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)
  else:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x_BxTxD.dtype)


def rope_frequencies(e: int, cfg: ModelConfig) -> jax.Array:
  """RoPE's E/2 inverse frequencies, with `cfg.rope_scaling` applied.

  'llama3' (Llama 3.1): wavelengths above original_max_len / low_freq_factor are divided
  by `rope_factor`, those below original_max_len / high_freq_factor kept, and the band
  between interpolated smoothly.
  """
  freqs_E2 = cfg.rope_theta ** (-jnp.arange(0, e // 2, dtype=jnp.float32) * 2.0 / e)
  if cfg.rope_scaling == 'llama3':
    wavelen = 2 * math.pi / freqs_E2
    ctx, lo, hi = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    scaled = jnp.where(wavelen > ctx / lo, freqs_E2 / cfg.rope_factor, freqs_E2)
    smooth = (ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
    freqs_E2 = jnp.where(medium, smoothed, scaled)
  return freqs_E2


def apply_rope(x_BxTxHxE: jax.Array, positions_BxT: jax.Array,
               freqs_E2: jax.Array) -> jax.Array:
  """Rotary position embedding (rotate-half form) at the given per-token positions, with
  the inverse frequencies of `rope_frequencies`."""
  e = x_BxTxHxE.shape[-1]
  angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * freqs_E2
  sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
  cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
  x = x_BxTxHxE.astype(jnp.float32)
  x1, x2 = x[..., :e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxE.dtype)


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """Causal AND same-segment mask [B, T, T]; segment 0 (padding) is never attended.

  A padding query attends only to itself, so its softmax row is well defined (its output
  is ignored by the loss).
  """
  t = segment_ids_BxT.shape[1]
  idx = jnp.arange(t)
  causal_TxT = idx[:, None] >= idx[None, :]
  seg_q, seg_k = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
  same_BxTxT = (seg_q == seg_k) & (seg_k > 0)
  return causal_TxT[None] & (same_BxTxT | jnp.eye(t, dtype=bool)[None])


def attend(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array,
           mask_BxTxS: jax.Array) -> jax.Array:
  """Softmax attention (float32 logits) under a boolean mask, with XLA einsums; each
  group of G = H / K query heads shares one key/value head (G = 1: multi-head).

  Materialises the [B, K, G, T, S] logits: the decode step (T = 1) and the 'einsum'
  choice of `self_attention`.
  """
  b, t, h, e = q_BxTxHxE.shape
  kvh = k_BxSxKxE.shape[2]
  q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, kvh, h // kvh, e)
  scale = 1.0 / math.sqrt(e)
  logits = jnp.einsum('btkge,bske->bkgts', q_BxTxKxGxE, k_BxSxKxE,
                      preferred_element_type=jnp.float32) * scale
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxE.dtype)
  return jnp.einsum('bkgts,bske->btkge', probs, v_BxSxKxE).reshape(b, t, h, e)


def _repeat_kv(kernel):
  """A fused kernel of equal q/k/v head counts, fed grouped-query k, v [B, S, K, E] with
  each K/V head repeated for its G query heads."""
  def grouped(q, k, v):
    g = q.shape[2] // k.shape[2]
    if g > 1:
      k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return kernel(q, k, v)
  return grouped


def attend_filled(q_Bx1xHxE: jax.Array, k_LxBxSxKxE: jax.Array, v_LxBxSxKxE: jax.Array,
                  layer: jax.Array, filled_B: jax.Array, chunk: int) -> jax.Array:
  """Decode attention of one query per row over layer `layer` of the stacked cache, keys
  [0, filled_B[b]) of row b (float32 logits and sums; equals `attend` under that mask
  within rounding).

  Keys are read `chunk` positions at a time, only up to the longest row's fill, with an
  online softmax (flash decoding): a step costs O(filled), not O(max_len), and copies
  at most a chunk of the cache, never a layer of it. K (cache heads) may divide H
  (grouped-query attention: each chunk's heads are repeated to H).
  """
  b, _, h, e = q_Bx1xHxE.shape
  s, kvh = k_LxBxSxKxE.shape[2], k_LxBxSxKxE.shape[3]
  c = min(chunk, s)
  f32 = jnp.float32
  q_BxHxE = q_Bx1xHxE[:, 0]
  scale = 1.0 / math.sqrt(e)

  def read(cache, start):
    block_BxCxKxE = jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0),
                                          (1, b, c, kvh, e))[0].astype(q_BxHxE.dtype)
    return block_BxCxKxE if kvh == h else jnp.repeat(block_BxCxKxE, h // kvh, axis=2)

  def body(i, carry):
    m_BxH, l_BxH, acc_BxHxE = carry
    # The last chunk is moved back to end at S when S is not a multiple of c; keys it
    # shares with the chunk before are masked, so each key counts once.
    start = jnp.minimum(i * c, s - c)
    pos_C = start + jnp.arange(c)
    valid_BxCx1 = ((pos_C >= i * c)[None] & (pos_C[None] < filled_B[:, None]))[..., None]
    # Dots over 4-d [B, C, H, E] blocks: on CPU (one thread) 10x faster than
    # multiply-reduces at B 1, 0.7-1.1x at B 16-64; a 5-d form with a size-1 group axis
    # measured 13x slower at B 16.
    logits_BxCxH = jnp.einsum('bhe,bche->bch', q_BxHxE, read(k_LxBxSxKxE, start),
                              preferred_element_type=f32) * scale
    logits_BxCxH = jnp.where(valid_BxCx1, logits_BxCxH, _MASKED)
    m_new = jnp.maximum(m_BxH, jnp.max(logits_BxCxH, axis=1))
    p_BxCxH = jnp.where(valid_BxCx1, jnp.exp(logits_BxCxH - m_new[:, None]), 0.)
    rescale_BxH = jnp.exp(m_BxH - m_new)
    v_BxCxHxE = read(v_LxBxSxKxE, start)
    pv_BxHxE = jnp.einsum('bch,bche->bhe', p_BxCxH.astype(v_BxCxHxE.dtype), v_BxCxHxE,
                          preferred_element_type=f32)
    return (m_new, l_BxH * rescale_BxH + jnp.sum(p_BxCxH, axis=1),
            acc_BxHxE * rescale_BxH[..., None] + pv_BxHxE)

  init = (jnp.full((b, h), _MASKED, f32), jnp.zeros((b, h), f32), jnp.zeros((b, h, e), f32))
  # Every row has filled >= 1 (its own new key), so chunk 0 leaves each sum l > 0.
  _, l_BxH, acc_BxHxE = jax.lax.fori_loop(0, (jnp.max(filled_B) + c - 1) // c, body, init)
  return (acc_BxHxE / l_BxH[..., None])[:, None].astype(q_Bx1xHxE.dtype)


# q [B, T, H, E], k, v [B, T, K, E] -> out [B, T, H, E].
SelfAttention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def self_attention(segment_ids_BxT: jax.Array, cfg: ModelConfig,
                   one_segment: bool = False) -> SelfAttention:
  """Causal, within-segment self-attention for these segment ids, with the kernel
  `cfg.attention` picks on this backend (`compat.attention_backend`).

  Built once per forward, outside the layer scan, so the mask (or lengths) is computed
  once for all layers. Semantics of every kernel = `segment_mask` on the non-padding
  queries; padding queries' outputs are finite and unused.

  Args:
    segment_ids_BxT: 1.. per document, 0 = padding.
    cfg: the model config (attention, dtype, head dim).
    one_segment: every row is ONE segment then right padding (prefill, A_f per f-gram):
      cuDNN then takes per-row lengths instead of a [B, T, T] mask.
  """
  t = segment_ids_BxT.shape[1]
  kernel = compat.attention_backend(cfg.attention, cfg.dtype, t, cfg.head_size)
  if kernel == 'splash':
    return _repeat_kv(lambda q, k, v: _splash_on_shards(q, k, v, segment_ids_BxT))
  if kernel == 'cudnn':
    valid_BxT = segment_ids_BxT > 0
    lengths_B = jnp.sum(valid_BxT, axis=1, dtype=jnp.int32) if one_segment else None
    mask_BxTxT = None if one_segment else segment_mask(segment_ids_BxT)

    def cudnn(q, k, v):
      out_BxTxHxE = compat.cudnn_attention(q, k, v, lengths_B, mask_BxTxT)
      # cuDNN leaves padding queries unspecified; zeros keep the keys and values they feed
      # (later layers, the decode cache) finite.
      return jnp.where(valid_BxT[:, :, None, None], out_BxTxHxE, 0).astype(q.dtype)
    return _repeat_kv(cudnn)
  mask_BxTxT = segment_mask(segment_ids_BxT)
  return lambda q, k, v: attend(q, k, v, mask_BxTxT)


def _splash_on_shards(q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, segment_ids_BxT):
  """The splash kernel per device shard (XLA cannot partition a Pallas call): batch and
  heads split as the activations are (`LOGICAL_AXIS_RULES`), sequences whole."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return compat.splash_attention(q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, segment_ids_BxT)
  qkv = logical_to_spec(('batch', 'length', 'heads', 'kv'), q_BxTxHxE.shape, mesh)
  seg = logical_to_spec(('batch', 'length'), segment_ids_BxT.shape, mesh)
  return jax.shard_map(compat.splash_attention, mesh=mesh, in_specs=(qkv, qkv, qkv, seg),
                       out_specs=qkv, check_vma=False)(
                           q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, segment_ids_BxT)


# attend_fn(q, k, v, layer_carry) -> (out_BxTxHxE, per-layer output stacked by the scan).
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class BlockStack(nnx.Module):
  """`num_layers` transformer blocks (attention + MLP), params stacked over L.

  One class serves the backbone and A_f: the backbone uses RoPE or learned positions
  (added to its input, outside this class); A_f always uses learned positions (`rope=False`).
  The resolved `ModelConfig` says the rest: biases ('all' as GPT-2, 'qkv' as Qwen2, none
  as OLMo/Llama), grouped K/V heads, q/k RMSNorm (per head as Qwen3, over the full width as
  OLMo-2), clipped q/k/v (OLMo-1) and norms before each sublayer ('pre') or on its output
  before the residual add ('post', OLMo-2).
  """

  def __init__(self, cfg: ModelConfig, num_layers: int, rope: bool, rngs: nnx.Rngs):
    self.cfg, self.num_layers, self.rope = cfg, num_layers, rope
    nl, d, h, f = num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim
    kvh, e, pd = cfg.kv_heads, cfg.head_size, jnp.dtype(cfg.param_dtype)
    std = cfg.init_std
    # GPT-2's scaled init: residual-branch output projections shrink with depth.
    out_std = std / math.sqrt(2 * nl)

    def normal(shape, names, s=std):
      return param(s * jax.random.normal(rngs.params(), (nl,) + shape, pd),
                   ('layers',) + names)

    def zeros(shape, names):
      return param(jnp.zeros((nl,) + shape, pd), ('layers',) + names)

    params = {
        'wq': normal((d, h, e), ('embed', 'heads', 'kv')),
        'wk': normal((d, kvh, e), ('embed', 'heads', 'kv')),
        'wv': normal((d, kvh, e), ('embed', 'heads', 'kv')),
        'wo': normal((h, e, d), ('heads', 'kv', 'embed'), out_std),
        'w_in': normal((d, f), ('embed', 'mlp')),
        'w_out': normal((f, d), ('mlp', 'embed'), out_std),
    }
    if cfg.mlp_activation == 'swiglu':
      params['w_gate'] = normal((d, f), ('embed', 'mlp'))
    if cfg.bias in ('all', 'qkv'):
      params.update(bq=zeros((h, e), ('heads', 'kv')), bk=zeros((kvh, e), ('heads', 'kv')),
                    bv=zeros((kvh, e), ('heads', 'kv')))
    if cfg.bias == 'all':
      params.update(bo=zeros((d,), ('embed',)), b_in=zeros((f,), ('mlp',)),
                    b_out=zeros((d,), ('embed',)))
    for which in ('attn_norm', 'mlp_norm'):
      for k, v in norm_params(cfg.norm, (nl,), d, pd, ('layers',)).items():
        params[f'{which}_{k}'] = v
    # 'head': one scale of E shared by every head; 'full': a scale per channel of all heads.
    if cfg.qk_norm == 'head':
      params.update(q_norm_scale=param(jnp.ones((nl, e), pd), ('layers', 'kv')),
                    k_norm_scale=param(jnp.ones((nl, e), pd), ('layers', 'kv')))
    elif cfg.qk_norm == 'full':
      params.update(
          q_norm_scale=param(jnp.ones((nl, h, e), pd), ('layers', 'heads', 'kv')),
          k_norm_scale=param(jnp.ones((nl, kvh, e), pd), ('layers', 'heads', 'kv')))
    self.param_names = tuple(sorted(params))
    for name, value in params.items():
      setattr(self, name, value)

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, attend_fn: AttendFn,
               layer_carries: Any = None, state: Any = None) -> tuple[jax.Array, Any]:
    """Runs all blocks.

    Args:
      x_BxTxD: input activations (compute dtype).
      positions_BxT: per-token positions (read by RoPE only).
      attend_fn: attention rule (full / prefill / decode), see `AttendFn`.
      layer_carries: pytree with a leading L axis handed to `attend_fn` per layer, or None.
      state: a pytree threaded through every layer in the scan's carry, whole (the decode
        KV cache: updated in place, never sliced into xs and restacked as ys). With it,
        `attend_fn` gets (layer index, state) as its layer carry and returns the new state.

    Returns:
      (x_BxTxD, the per-layer outputs of attend_fn stacked along a leading L axis; with
      `state`, the last layer's state instead).
    """
    dtype = jnp.dtype(self.cfg.dtype)
    stacked = {n: getattr(self, n)[...].astype(dtype) for n in self.param_names}
    threaded = state is not None

    def body(carry, xs):
      x, layer, st = carry
      p, layer_carry = xs
      x, out = _block(self.cfg, self.rope, p, x, positions_BxT, attend_fn,
                      (layer, st) if threaded else layer_carry)
      return (x, layer + 1, out if threaded else None), None if threaded else out

    if self.cfg.remat in _REMAT_POLICIES:
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])
    # A threaded state is the decode step's KV cache: its loop is always unrolled (a scan
    # ran 0.74-0.81x of a hand-written loop at B 1 on CPU). Even unrolled, XLA slices each
    # layer's weights out of the stacked params into fresh buffers every step (the
    # compiled loop's HLO); serving avoids that with `ServingBlocks`' per-layer weights.
    (x_BxTxD, _, state), outs = jax.lax.scan(
        body, (x_BxTxD.astype(dtype), jnp.int32(0), state), (stacked, layer_carries),
        unroll=self.cfg.layer_loop == 'unrolled' or threaded)
    return x_BxTxD, state if threaded else outs


def _block(cfg: ModelConfig, rope: bool, p: dict[str, jax.Array], x_BxTxD: jax.Array,
           positions_BxT: jax.Array, attend_fn: AttendFn,
           layer_carry: Any) -> tuple[jax.Array, Any]:
  """One transformer block on one layer's weights `p`: `BlockStack`'s (q, k, v and the
  output projection per head) or `ServingBlocks`'s (q, k, v fused, the output projection
  [H E, D])."""
  pre = cfg.norm_position == 'pre'

  def norm(which, y):
    return apply_norm(cfg.norm, y, p.get(f'{which}_scale'), p.get(f'{which}_bias'),
                      cfg.norm_eps)

  h = norm('attn_norm', x_BxTxD) if pre else x_BxTxD
  names = ('batch', 'length', 'heads', 'kv')
  qkv = []
  for w, y_BxTxHxE in zip('qkv', _project_qkv(p, h)):
    if cfg.clip_qkv:
      y_BxTxHxE = jnp.clip(y_BxTxHxE, -cfg.clip_qkv, cfg.clip_qkv)
    if f'{w}_norm_scale' in p:
      y_BxTxHxE = _qk_norm(cfg, y_BxTxHxE, p[f'{w}_norm_scale'])
    if rope and w != 'v':
      y_BxTxHxE = apply_rope(y_BxTxHxE, positions_BxT, rope_frequencies(y_BxTxHxE.shape[-1],
                                                                        cfg))
    qkv.append(constrain(y_BxTxHxE, names))
  o_BxTxHxE, layer_out = attend_fn(*qkv, layer_carry)
  if p['wo'].ndim == 2:  # ServingBlocks: [H E, D], read in place by one matmul.
    a_BxTxD = o_BxTxHxE.reshape(o_BxTxHxE.shape[:2] + (-1,)) @ p['wo']
  else:
    a_BxTxD = jnp.einsum('bthe,hed->btd', o_BxTxHxE, p['wo'])
  if 'bo' in p:
    a_BxTxD = a_BxTxD + p['bo']
  if not pre:
    a_BxTxD = norm('attn_norm', a_BxTxD)
  x_BxTxD = constrain(x_BxTxD + a_BxTxD, ('batch', 'length', 'embed'))

  h = norm('mlp_norm', x_BxTxD) if pre else x_BxTxD
  u_BxTxF = h @ p['w_in']
  if 'b_in' in p:
    u_BxTxF = u_BxTxF + p['b_in']
  if cfg.mlp_activation == 'swiglu':
    u_BxTxF = jax.nn.silu(h @ p['w_gate']) * u_BxTxF
  elif cfg.mlp_activation == 'gelu':
    u_BxTxF = jax.nn.gelu(u_BxTxF, approximate=True)
  else:
    u_BxTxF = jax.nn.relu(u_BxTxF)
  u_BxTxF = constrain(u_BxTxF, ('batch', 'length', 'mlp'))
  m_BxTxD = u_BxTxF @ p['w_out']
  if 'b_out' in p:
    m_BxTxD = m_BxTxD + p['b_out']
  if not pre:
    m_BxTxD = norm('mlp_norm', m_BxTxD)
  return constrain(x_BxTxD + m_BxTxD, ('batch', 'length', 'embed')), layer_out


def _project_qkv(p: dict[str, jax.Array], h_BxTxD: jax.Array) -> list[jax.Array]:
  """q [B, T, H, E], k and v [B, T, K, E] (biases added) from a layer's separate wq, wk,
  wv, or from ServingBlocks' fused wqkv [D, K, G + 2, E] in one matmul."""
  def biased(y, w):
    return y + p[f'b{w}'] if f'b{w}' in p else y

  if 'wqkv' not in p:
    return [biased(jnp.einsum('btd,dhe->bthe', h_BxTxD, p[f'w{w}']), w) for w in 'qkv']
  y_BxTxKxCxE = biased(jnp.einsum('btd,dkce->btkce', h_BxTxD, p['wqkv']), 'qkv')
  b, t, kvh, c, e = y_BxTxKxCxE.shape
  return [y_BxTxKxCxE[:, :, :, :c - 2].reshape(b, t, kvh * (c - 2), e),
          y_BxTxKxCxE[:, :, :, c - 2], y_BxTxKxCxE[:, :, :, c - 1]]


class ServingBlocks(nnx.Module):
  """A `BlockStack`'s weights laid out for serving (prefill and decode), prepared once.

  One [D, K, G + 2, E] matrix per layer holds q, k and v: each K/V head's G query heads,
  its key and its value side by side, so one matmul projects all three and a split over
  `heads` (tensor parallelism) keeps each group on one device. The output projection is
  [H E, D] and every layer's weights are separate arrays: the unrolled layer loop reads
  them in place, where stacked [L, ...] weights were sliced into fresh buffers and the
  output projection transposed every step (the compiled decode loop's HLO;
  tests/test_decode_inplace.py checks it). Same arithmetic as the stack; the call runs the layers
  unrolled, with or without a threaded `state` (`BlockStack.__call__`).

  Holds a copy of the block weights (the stack's dtype); the embeddings and the head stay
  shared with the model it came from.
  """

  def __init__(self, blocks: BlockStack):
    self.cfg, self.rope, self.num_layers = blocks.cfg, blocks.rope, blocks.num_layers
    h, kvh = self.cfg.num_heads, self.cfg.kv_heads
    stacked = {n: getattr(blocks, n) for n in blocks.param_names}
    group = lambda x: x.reshape(x.shape[:-2] + (kvh, -1, x.shape[-1]))  # [..., K, G, E]
    layers = []
    for layer in range(blocks.num_layers):
      p = {n: (v[...][layer], v.get_metadata()['logical_axes'][1:])
           for n, v in stacked.items()}
      for w, names in (('w', ('embed', 'heads', None, 'kv')), ('b', ('heads', None, 'kv'))):
        if f'{w}q' in p:
          parts = [group(p.pop(f'{w}{x}')[0]) for x in 'qkv']
          p[f'{w}qkv'] = (jnp.concatenate(parts, axis=-2), names)
      wo, _ = p['wo']
      p['wo'] = (wo.reshape(h * wo.shape[1], -1), ('heads', 'embed'))
      layers.append(nnx.Dict({n: param(v, names) for n, (v, names) in p.items()}))
    self.layers = nnx.List(layers)

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, attend_fn: AttendFn,
               state: Any = None) -> tuple[jax.Array, Any]:
    """`BlockStack.__call__` without `layer_carries`: (x_BxTxD, the last layer's state,
    or the per-layer outputs of `attend_fn` stacked along a leading L axis)."""
    dtype = jnp.dtype(self.cfg.dtype)
    x_BxTxD = x_BxTxD.astype(dtype)
    threaded, outs = state is not None, []
    for layer, weights in enumerate(self.layers):
      p = {n: v[...].astype(dtype) for n, v in weights.items()}
      carry = (jnp.int32(layer), state) if threaded else None
      x_BxTxD, out = _block(self.cfg, self.rope, p, x_BxTxD, positions_BxT, attend_fn, carry)
      if threaded:
        state = out
      else:
        outs.append(out)
    return x_BxTxD, state if threaded else jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _qk_norm(cfg: ModelConfig, y_BxTxHxE: jax.Array, scale: jax.Array) -> jax.Array:
  """RMSNorm of q or k: over each head's E channels ('head', scale [E]) or over all
  heads' channels at once ('full', scale [H, E])."""
  if cfg.qk_norm == 'head':
    return apply_norm('rmsnorm', y_BxTxHxE, scale, eps=cfg.norm_eps)
  b, t, h, e = y_BxTxHxE.shape
  y_BxTxHE = apply_norm('rmsnorm', y_BxTxHxE.reshape(b, t, h * e), scale.reshape(h * e),
                        eps=cfg.norm_eps)
  return y_BxTxHE.reshape(b, t, h, e)


class FinalNorm(nnx.Module):
  """The norm after the last block (also A_f's optional output norm)."""

  def __init__(self, kind: str, d: int, param_dtype, eps: float = 0.0):
    self.kind, self.eps = kind, eps
    params = norm_params(kind, (), d, jnp.dtype(param_dtype), ())
    self.scale = params.get('scale')
    self.bias = params.get('bias')

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    return apply_norm(self.kind, x_BxTxD, scale, bias, self.eps)
