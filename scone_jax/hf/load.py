"""`model.init_from=DIR`: a Hugging Face checkpoint directory as this run's config and
initial parameters.

DIR holds config.json, model.safetensors (or shards with model.safetensors.index.json) and
tokenizer.json; it is local or gs:// (scone_jax/paths.py). Nothing is downloaded: a Hub name
is refused with the command that downloads it. `resolve_config` (called by prepare and
train before anything is written) sets the model.* keys from config.json and the tokenizer
to DIR/tokenizer.json; `load_params` (train's init, step 0) builds each parameter as a
sharded jax.Array from its host's devices' slices: per checkpoint tensor, a host reads by
byte range only the rows its devices' slices touch, each row once however many of its
devices split it by columns (one ranged read per run of rows, local or gs://), into one
buffer of _CHUNK_BYTES reused for the whole load, and copies each device's slice out of it
into a page-aligned array that the CPU backend adopts without another copy. No host holds
the whole model; beyond the arrays it builds, a host holds the one buffer. Values are the file's:
bfloat16 stays bit-exact, float16/bfloat16 widen exactly to a float32 param_dtype, and a
lossy narrowing (float32 file into bfloat16 params) is refused.

Layouts (ours stacked over L; HF per layer): nn.Linear weights are [out, in] (transposed
into ours), GPT-2's Conv1D weights are [in, out] (as ours) with q, k, v fused in c_attn.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import re
from typing import Any, Callable

import jax
import numpy as np

from scone_jax import config as config_lib
from scone_jax import paths
from scone_jax.config import Config, ConfigError, ModelConfig
from scone_jax.hf import config_map
from scone_jax.hf.safetensors import CheckpointError, TensorFiles, read_header
from scone_jax.tokenizer import hf as hf_tokenizer

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_HUB_NAME = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
# Checkpoint tensors that are buffers, not parameters (recomputed by our layers).
_IGNORED = re.compile(r'(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$')
# Keys config.json sets that a user's experiment may also set (compared, not overridden);
# the family-derived keys and mlp_dim follow the family and are always the checkpoint's.
_COMPARED = ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'vocab_size',
             'tied_embeddings', 'norm_eps', 'rope_theta', 'clip_qkv', 'rope_scaling')
# Lossless widenings a checkpoint tensor may take into param_dtype.
_WIDENS = {('float16', 'float32'), ('bfloat16', 'float32')}


def checkpoint_dir(spec: str) -> str:
  """The checkpoint directory `model.init_from` names; refuses Hub names and missing dirs."""
  where = f'config.model.init_from={spec}'
  if not paths.is_remote(spec) and not paths.exists(spec):
    if _HUB_NAME.match(spec):
      raise ConfigError(f'{where} is not a local directory; it looks like a Hugging Face Hub '
                        'name, and nothing is downloaded here. Download it first, e.g. '
                        f'`huggingface-cli download {spec} --local-dir DIR`, and pass DIR')
    raise ConfigError(f'{where}: no such directory')
  path = paths.resolve(spec)
  if not paths.isfile(paths.join(path, CONFIG_FILE)):
    raise ConfigError(f'{where}: no {CONFIG_FILE} in {path} (a Hugging Face checkpoint '
                      'directory as save_pretrained writes it)')
  return path


def is_checkpoint(directory: str) -> bool:
  """Whether `directory` is a Hugging Face checkpoint (config.json beside model.safetensors
  or a shard index), not one of our run directories (config.json beside checkpoints/)."""
  return paths.isfile(paths.join(directory, CONFIG_FILE)) and any(
      paths.isfile(paths.join(directory, f)) for f in (SINGLE_FILE, INDEX_FILE))


def read_config(directory: str) -> dict[str, Any]:
  file = paths.join(directory, CONFIG_FILE)
  try:
    return json.loads(paths.read_text(file))
  except ValueError as e:
    raise CheckpointError(f'{file} is not JSON ({e})') from e


def resolve_config(cfg: Config) -> Config:
  """`cfg` with model.* set from `model.init_from`'s config.json and the tokenizer set to
  its tokenizer.json (unchanged without init_from). Idempotent, so a resumed run's
  config compares equal.

  Raises:
    ConfigError / CheckpointError: a Hub name, a missing file, an unsupported
      architecture, an experiment value that contradicts config.json, or a tokenizer
      whose vocabulary does not fit config.json's vocab_size.
  """
  if not cfg.model.init_from:
    return cfg
  directory = checkpoint_dir(cfg.model.init_from)
  file = paths.join(directory, CONFIG_FILE)
  overrides = config_map.model_overrides(read_config(directory), file)
  default = ModelConfig()
  for key in _COMPARED:
    ours, theirs = getattr(cfg.model, key), overrides.get(f'model.{key}', getattr(default, key))
    if ours not in (getattr(default, key), theirs):
      raise ConfigError(f'config.model.{key}={ours!r} contradicts {file} ({theirs!r}); '
                        'leave it unset: model.init_from takes the architecture from there')
  tok_file = paths.join(directory, hf_tokenizer.FILE)
  if not paths.isfile(tok_file):
    raise CheckpointError(f'{directory} has no {hf_tokenizer.FILE}; the checkpoint\'s '
                          'tokenizer is loaded from the same directory')
  tok = hf_tokenizer.HFTokenizer.load(tok_file, cfg.tokenizer.bos_token,
                                      cfg.tokenizer.eos_token, cfg.tokenizer.pad_token)
  if tok.vocab_size > overrides['model.vocab_size']:
    raise CheckpointError(f'{tok_file} has {tok.vocab_size} tokens (largest id + 1) but '
                          f'{file} "vocab_size" is {overrides["model.vocab_size"]}: its ids '
                          'past the embedding table have no row; not this model\'s tokenizer')
  return config_lib.replace(cfg, **overrides, **{
      'tokenizer.kind': hf_tokenizer.KIND_NAME, 'tokenizer.model_file': tok_file,
      'tokenizer.vocab_size': tok.vocab_size})


def open_tensors(directory: str) -> TensorFiles:
  """All tensors of the checkpoint (headers only): one file, or the index's shards."""
  index_file = paths.join(directory, INDEX_FILE)
  if paths.isfile(index_file):
    try:
      weight_map = json.loads(paths.read_text(index_file))['weight_map']
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'{index_file}: no "weight_map" ({e!r})') from e
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_file = paths.join(directory, shard)
      if not paths.isfile(shard_file):
        raise CheckpointError(f'{index_file} "weight_map" names {shard}, which is missing '
                              f'from {directory}')
      tensors.update(read_header(shard_file))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise CheckpointError(f'{index_file} "weight_map" lists {missing[:3]} but their shards '
                            'do not hold them')
    return TensorFiles(tensors)
  single = paths.join(directory, SINGLE_FILE)
  if not paths.isfile(single):
    raise CheckpointError(f'{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}')
  return TensorFiles(read_header(single))


# (checkpoint tensor name, its shape, its array -> our layout for one layer). The layouts
# are views (transpose, reshape, slice), so `export_hf` inverts them by index.
Source = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def sources(m: ModelConfig, vocab_size: int) -> tuple[dict[str, Source], dict[str, Source]]:
  """Where each of our backbone params comes from: the per-layer block params ('{l}' in
  the tensor name = the layer) and the others (names relative to `backbone.`)."""
  d, h, k, e, f = m.d_model, m.num_heads, m.kv_heads, m.head_size, m.mlp_dim
  same = lambda w: w
  if m.family == 'gpt2':
    qkv = lambda i: lambda w: w[:, i * d:(i + 1) * d].reshape(d, h, e)
    b_qkv = lambda i: lambda b: b[i * d:(i + 1) * d].reshape(h, e)
    p = 'transformer.h.{l}.'
    c_attn, c_attn_b = (p + 'attn.c_attn.weight', (d, 3 * d)), (p + 'attn.c_attn.bias', (3 * d,))
    layer = {'wq': (*c_attn, qkv(0)), 'wk': (*c_attn, qkv(1)), 'wv': (*c_attn, qkv(2)),
             'bq': (*c_attn_b, b_qkv(0)), 'bk': (*c_attn_b, b_qkv(1)),
             'bv': (*c_attn_b, b_qkv(2)),
             'wo': (p + 'attn.c_proj.weight', (d, d), lambda w: w.reshape(h, e, d)),
             'bo': (p + 'attn.c_proj.bias', (d,), same),
             'w_in': (p + 'mlp.c_fc.weight', (d, f), same),
             'b_in': (p + 'mlp.c_fc.bias', (f,), same),
             'w_out': (p + 'mlp.c_proj.weight', (f, d), same),
             'b_out': (p + 'mlp.c_proj.bias', (d,), same)}
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      layer.update({f'{ours}_scale': (p + theirs + '.weight', (d,), same),
                    f'{ours}_bias': (p + theirs + '.bias', (d,), same)})
    top = {'token_embed.table': ('transformer.wte.weight', (vocab_size, d), same),
           'pos_table': ('transformer.wpe.weight', (m.max_seq_len, d), same),
           'final_norm.scale': ('transformer.ln_f.weight', (d,), same),
           'final_norm.bias': ('transformer.ln_f.bias', (d,), same)}
  else:
    heads = lambda n: lambda w: w.T.reshape(d, n, e)  # nn.Linear [n e, d] -> [d, n, e]
    p = 'model.layers.{l}.self_attn.'
    layer = {'wq': (p + 'q_proj.weight', (h * e, d), heads(h)),
             'wk': (p + 'k_proj.weight', (k * e, d), heads(k)),
             'wv': (p + 'v_proj.weight', (k * e, d), heads(k)),
             'wo': (p + 'o_proj.weight', (d, h * e), lambda w: w.T.reshape(h, e, d)),
             'bq': (p + 'q_proj.bias', (h * e,), lambda b: b.reshape(h, e)),
             'bk': (p + 'k_proj.bias', (k * e,), lambda b: b.reshape(k, e)),
             'bv': (p + 'v_proj.bias', (k * e,), lambda b: b.reshape(k, e))}
    for w, n in (('q', h), ('k', k)):  # 'full': OLMo-2's norm over all heads' channels.
      layer[f'{w}_norm_scale'] = ((p + f'{w}_norm.weight', (n * e,), lambda s, n=n: s.reshape(n, e))
                                  if m.qk_norm == 'full' else (p + f'{w}_norm.weight', (e,), same))
    p = 'model.layers.{l}.'
    layer.update({'w_gate': (p + 'mlp.gate_proj.weight', (f, d), np.transpose),
                  'w_in': (p + 'mlp.up_proj.weight', (f, d), np.transpose),
                  'w_out': (p + 'mlp.down_proj.weight', (d, f), np.transpose)})
    post = m.norm_position == 'post'
    layer['attn_norm_scale'] = (p + ('post_attention_layernorm' if post else
                                     'input_layernorm') + '.weight', (d,), same)
    layer['mlp_norm_scale'] = (p + ('post_feedforward_layernorm' if post else
                                    'post_attention_layernorm') + '.weight', (d,), same)
    top = {'token_embed.table': ('model.embed_tokens.weight', (vocab_size, d), same),
           'final_norm.scale': ('model.norm.weight', (d,), same)}
  top['head'] = ('lm_head.weight', (vocab_size, d), np.transpose)  # [V, D] -> [D, V]
  return layer, top


def param_name(path) -> str:
  """'backbone.blocks.wq' from a params tree path (nnx State keys, `.value` dropped)."""
  parts = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
  return '.'.join(x for x in parts if x != 'value')


def load_params(model_cfg: ModelConfig, params: Any, partial: bool = False) -> Any:
  """`params` with the backbone's replaced by `model_cfg.init_from`'s tensors, each built
  on its own sharding from the slices its devices hold.

  Args:
    model_cfg: the resolved model config (`resolve_config`).
    params: a SconeLM's params tree (names `backbone.*`): initialised sharded arrays (a
      train state's; the others, A_f and the f-gram side, keep their init) or
      jax.ShapeDtypeStruct leaves with shardings (nothing is initialised at all).
    partial: `params` want part of the checkpoint (A_f's source: its first
      model_cfg.num_layers layers, no head); its other tensors are left unread, not refused.

  Raises:
    CheckpointError: a missing tensor, a shape that does not match the config, a lossy
      dtype, or checkpoint tensors this architecture has no place for (names each).
  """
  directory = checkpoint_dir(model_cfg.init_from)
  files = open_tensors(directory)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  vocab = next(leaf.shape[0] for path, leaf in leaves
               if param_name(path) == 'backbone.token_embed.table')
  layer_src, top_src = sources(model_cfg, vocab)
  used: set[str] = set()
  plan = []  # Every tensor is checked (headers only) before any is read.
  for path, leaf in leaves:
    name = param_name(path)
    if not name.startswith('backbone.'):
      plan.append((leaf, None, False))
      continue
    short = name[len('backbone.'):]
    if short.startswith('blocks.'):
      src = layer_src.get(short[len('blocks.'):])
      tensors = ([src[0].format(l=l) for l in range(model_cfg.num_layers)]
                 if src else [])
    else:
      src = top_src.get(short)
      tensors = [src[0]] if src else []
    if src is None:
      raise CheckpointError(f'{directory}: no checkpoint tensor maps to our parameter {name} '
                            f'(family {model_cfg.family!r})')
    views = [_view(files, t, src[1], src[2], leaf) for t in tensors]
    used.update(tensors)
    plan.append((leaf, views, short.startswith('blocks.')))
  unused = [] if partial else sorted(
      n for n in set(files.tensors) - used if not _IGNORED.search(n) and
      not (n == 'lm_head.weight' and model_cfg.tied_embeddings))
  if unused:
    raise CheckpointError(f'{directory}: tensors {unused[:4]} ({len(unused)} in all) have no '
                          f'place in a {model_cfg.family} model with this config.json; the '
                          'architecture uses a feature we do not map')
  reader = _Reader()  # One read buffer for the whole load.
  return jax.tree_util.tree_unflatten(
      treedef, [leaf if views is None else _sharded(views, leaf, stacked, reader)
                for leaf, views, stacked in plan])


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One checkpoint tensor and the view that gives our layout of it."""
  files: TensorFiles
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  layout: Callable[[np.ndarray], np.ndarray]


def _view(files: TensorFiles, tensor: str, shape: tuple[int, ...], layout, leaf) -> _Tensor:
  """`tensor` to be read in our layout, its shape and dtype checked against `leaf` from
  the header alone."""
  info = files.tensors.get(tensor)
  if info is None:
    raise CheckpointError(f'the checkpoint has no tensor {tensor} (our '
                          f'{leaf.shape} parameter needs it); a missing or partial shard?')
  if info.shape != shape:
    raise CheckpointError(f'{info.file}: tensor {tensor} has shape {list(info.shape)}, which '
                          f'does not give our {list(leaf.shape)}: config.json\'s sizes need '
                          f'{list(shape)}')
  have, need = info.dtype.name, np.dtype(leaf.dtype).name
  if have != need and (have, need) not in _WIDENS:
    raise CheckpointError(f'{info.file}: tensor {tensor} is {have}; model.param_dtype='
                          f'{need!r} would round it: set config.model.param_dtype to '
                          f'{have!r} (or float32)')
  return _Tensor(files, tensor, shape, info.dtype, layout)


@dataclasses.dataclass(frozen=True)
class _Place:
  """Where a slice of our layout of a [R, C] (or [R]) tensor lies in it: its first
  element's row and column, and per axis of the slice, a step's move in rows and columns."""
  shape: tuple[int, ...]
  row: int
  col: int
  row_steps: tuple[int, ...]
  col_steps: tuple[int, ...]

  def narrow(self, axis: int, start: int, stop: int) -> '_Place':
    """Positions [start, stop) along `axis`."""
    return _Place(self.shape[:axis] + (stop - start,) + self.shape[axis + 1:],
                  self.row + start * self.row_steps[axis],
                  self.col + start * self.col_steps[axis], self.row_steps, self.col_steps)

  def rows(self) -> tuple[int, int]:
    """[start, stop) of the tensor rows the slice reads."""
    last = sum((n - 1) * s for n, s in zip(self.shape, self.row_steps))
    return self.row, self.row + last + 1


def _place(t: _Tensor, index: tuple[slice, ...]) -> _Place:
  """Where `t.layout(tensor)[index]` lies in the tensor, without reading it.

  The layout is a view (transpose, reshape, slice), so it is applied to stand-ins of the
  tensor's shape whose elements hold their row, and their column (aranges broadcast: no
  memory per element); the slice's offset and strides within each arange are the rows
  and columns it reads. A vector is one column."""
  found = []
  for axis in range(len(t.shape)):
    coord = np.arange(t.shape[axis], dtype=np.int64)
    probe = np.broadcast_to(coord.reshape((-1,) + (1,) * (len(t.shape) - 1 - axis)), t.shape)
    view = t.layout(probe)[index]
    first = (view.ctypes.data - coord.ctypes.data) // coord.itemsize
    if not 0 <= first < coord.size:  # The layout copied: a table bug.
      raise AssertionError(f'the layout of {t.name} is not a view of it')
    found.append((first, tuple(s // coord.itemsize for s in view.strides)))
  if len(found) == 1:
    found.append((0, (0,) * view.ndim))
  (row, row_steps), (col, col_steps) = found
  return _Place(view.shape, row, col, row_steps, col_steps)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array in an anonymous memory map of its own: page-aligned, so jax's
  CPU backend adopts it as a device buffer where a copy of it would double the load's
  writes (numpy's own allocations are only 16-byte aligned); its pages are mapped up
  front (MAP_POPULATE, where there is one), which costs less than a fault per page on the
  first write (measured 0.75x on a 2-core VM)."""
  nbytes = int(np.prod(shape)) * dtype.itemsize
  flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_POPULATE', 0)
  memory = mmap.mmap(-1, max(nbytes, 1), flags=flags)
  return np.frombuffer(memory, np.uint8)[:nbytes].view(dtype).reshape(shape)


_TILE = 256  # Elements per side of a copy tile (256 x 256 x 8 bytes fits in L2).


def _collapsed(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Views of dst and src with each run of adjacent axes merged that both step through
  as one (e.g. [heads, head_dim, D] read from [D, heads x head_dim] is a 2-D transpose)."""
  shape, ds, ss = [dst.shape[0]], [dst.strides[0]], [src.strides[0]]
  for n, d, s in zip(dst.shape[1:], dst.strides[1:], src.strides[1:]):
    if ds[-1] == n * d and ss[-1] == n * s:
      shape[-1], ds[-1], ss[-1] = shape[-1] * n, d, s
    else:
      shape.append(n)
      ds.append(d)
      ss.append(s)
  as_strided = np.lib.stride_tricks.as_strided
  return as_strided(dst, shape, ds), as_strided(src, shape, ss, writeable=False)


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src, fast for our layouts: same dtypes copy as unsigned ints of their width
  (numpy's loops for ml_dtypes' bfloat16 go element by element), axes that run together
  in both are merged, and a transpose (nn.Linear's [out, in] read as [in, out]) goes by
  `_transpose`."""
  if src.dtype == dst.dtype:
    uint = np.dtype(f'u{dst.dtype.itemsize}')
    dst, src = dst.view(uint), src.view(uint)
  if dst.ndim == 0:
    dst[...] = src
    return
  dst, src = _collapsed(dst, src)
  if dst.ndim < 2 or src.strides[-1] == src.itemsize:
    dst[...] = src
  elif (dst.ndim == 2 and src.dtype == dst.dtype and src.itemsize < 8 and
        src.strides[0] == dst.strides[1] == src.itemsize and
        dst.shape[0] % (8 // src.itemsize) == 0):
    _transpose(dst, src)
  else:
    _tiled(dst, src)


def _tiled(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src in tiles of about _TILE x _TILE elements, where one whole-array
  assignment would walk src a column at a time (4x slower measured on a 9728 x 2560
  matrix)."""
  b1 = max(1, _TILE // int(np.prod(dst.shape[2:])))
  for i in range(0, dst.shape[0], _TILE):
    for j in range(0, dst.shape[1], b1):
      dst[i:i + _TILE, j:j + b1] = src[i:i + _TILE, j:j + b1]


def _transpose(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src for a 2-D dst whose rows are src's columns (both unit-stride there).

  The k = 8 / itemsize consecutive elements of a src column are one 8-byte word, so the
  strided, cache-missing transpose moves k times fewer (64-bit) elements into a small
  buffer, whose words are then spread over k rows of dst by a unit-stride copy: 1.5x the
  tiled copy of 2-byte elements (measured, 4864 x 2560 bfloat16)."""
  k = 8 // src.itemsize
  n0, n1 = dst.shape
  # [n0 / k, n1] words: word (a, j) holds src[a k : a k + k, j].
  words = np.lib.stride_tricks.as_strided(
      src, (n0 // k, n1, k), (k * src.itemsize, src.strides[1], src.itemsize),
      writeable=False).view(np.uint64)[..., 0]
  dst_k = np.lib.stride_tricks.as_strided(dst, (n0 // k, k, n1),
                                          (k * dst.strides[0], dst.strides[0], dst.itemsize))
  block = np.empty((n0 // k, min(n1, _TILE)), np.uint64)
  for j in range(0, n1, _TILE):
    w = min(_TILE, n1 - j)
    _tiled(block[:, :w], words[:, j:j + w])
    dst_k[:, :, j:j + w] = block[:, :w].view(dst.dtype).reshape(n0 // k, w, k).transpose(0, 2, 1)


def _key(index: tuple[slice, ...]) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


_CHUNK_BYTES = 64 << 20  # The read buffer: a run of one tensor's rows, reused throughout.


class _Reader:
  """Copies slices of checkpoint tensors into arrays of ours, reading each run of rows
  once per group of slices that read the same rows (devices splitting a tensor by
  columns), through one buffer: fresh memory is only the outputs'."""

  def __init__(self):
    self._buffer = np.empty(0, np.uint8)

  def copy(self, t: _Tensor, places: list[tuple[_Place, np.ndarray]]) -> None:
    """out[...] = our layout of `t` at `place`, for each (place, out)."""
    cols = t.shape[1] if len(t.shape) > 1 else 1
    row_bytes = cols * t.dtype.itemsize
    groups: dict[tuple, list[tuple[_Place, np.ndarray]]] = {}
    for place, out in places:
      rows_only = tuple((n, s) for n, s in zip(place.shape, place.row_steps))
      groups.setdefault((place.row, rows_only), []).append((place, out))
    for group in groups.values():
      place = group[0][0]
      # Chunks along the axis that moves furthest in rows, each a run of rows.
      axis = int(np.argmax(place.row_steps))
      per = max(1, (_CHUNK_BYTES // row_bytes) // max(place.row_steps[axis], 1))
      for j in range(0, place.shape[axis], per):
        stop = min(j + per, place.shape[axis])
        first, end = place.narrow(axis, j, stop).rows()
        buffer = self._rows(t, first, end, row_bytes)
        for p, out in group:
          part = p.narrow(axis, j, stop)
          src = np.lib.stride_tricks.as_strided(
              buffer[(part.row - first) * cols + part.col:], part.shape,
              [(r * cols + c) * t.dtype.itemsize
               for r, c in zip(part.row_steps, part.col_steps)], writeable=False)
          _copy_into(out[(slice(None),) * axis + (slice(j, stop),)], src)

  def _rows(self, t: _Tensor, start: int, stop: int, row_bytes: int) -> np.ndarray:
    """Rows [start, stop) of `t`, flat, in the reused buffer."""
    nbytes = (stop - start) * row_bytes
    if self._buffer.nbytes < nbytes:
      self._buffer = _aligned_empty((max(nbytes, min(_CHUNK_BYTES, 2 * nbytes)),),
                                    np.dtype(np.uint8))
    buffer = self._buffer[:nbytes].view(t.dtype)
    t.files.read_rows(t.name, start, stop, buffer)
    return buffer


def _sharded(views: list[_Tensor], leaf, stacked: bool, reader: _Reader) -> jax.Array:
  """One jax.Array on leaf's sharding from the slices of this host's devices, each
  distinct slice read once."""
  dtype = np.dtype(leaf.dtype)
  by_device = leaf.sharding.addressable_devices_indices_map(leaf.shape)
  slices: dict[tuple, tuple[slice, ...]] = {}
  for index in by_device.values():
    slices.setdefault(_key(index), index)
  outs = {k: _aligned_empty(tuple(len(range(n)[s]) for n, s in zip(leaf.shape, index)),
                            dtype) for k, index in slices.items()}
  # Where each distinct slice lies in one tensor (the same for every layer).
  places = {k: _place(views[0], index[1:] if stacked else index)
            for k, index in slices.items()}
  for l, t in enumerate(views):
    wanted = []
    for k, index in slices.items():
      if not stacked:
        wanted.append((places[k], outs[k]))
      elif l in range(len(views))[index[0]]:
        wanted.append((places[k], outs[k][range(len(views))[index[0]].index(l)]))
    reader.copy(t, wanted)
  # Replicas share one host array: the CPU backend adopts it read-only (a donated buffer
  # is not written in place), and an accelerator copies it to each device.
  arrays = [jax.device_put(outs[_key(index)], device) for device, index in by_device.items()]
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)
