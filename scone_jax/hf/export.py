"""Our backbone -> a Hugging Face checkpoint directory (config.json, safetensors shards with
their index, tokenizer.json): the inverse of load.py, loadable by
`transformers.AutoModelForCausalLM.from_pretrained`.

The tensor layouts are load.py's `sources` table read backwards: each layout is a view
(transpose, reshape, slice), so applied to the checkpoint tensor's flat indices it says
which of the tensor's elements each of our values is. One table serves both directions.
Values keep their dtype and bits (bfloat16 stays bfloat16). One layer of one parameter is
on the host at a time, and at most one shard's tensors.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from scone_jax import artifacts, paths
from scone_jax.config import ModelConfig
from scone_jax.hf import config_map
from scone_jax.hf import load as load_lib
from scone_jax.hf.safetensors import CheckpointError, write_file


def _plan(m: ModelConfig, vocab_size: int, names: set[str]):
  """{checkpoint tensor: (shape, [(our name, layer or None, layout)])} for our params."""
  layer_src, top_src = load_lib.sources(m, vocab_size)
  plan: dict[str, Any] = {}
  for short, (tensor, shape, layout) in layer_src.items():
    if f'blocks.{short}' in names:
      for l in range(m.num_layers):
        plan.setdefault(tensor.format(l=l), (shape, []))[1].append(
            (f'blocks.{short}', l, layout))
  for short, (tensor, shape, layout) in top_src.items():
    if short in names:
      plan.setdefault(tensor, (shape, []))[1].append((short, None, layout))
  return plan


def _tensor(tensor: str, shape, parts, params: Mapping[str, Any]) -> np.ndarray:
  size = int(np.prod(shape))
  index = np.arange(size).reshape(shape)
  out, filled = None, np.zeros(size, bool)
  for name, layer, layout in parts:
    value = np.asarray(params[name] if layer is None else params[name][layer])
    if out is None:
      out = np.empty(size, value.dtype)
    where = layout(index).ravel()
    out[where] = value.ravel()
    filled[where] = True
  if not filled.all():
    raise CheckpointError(f'{tensor}: {int((~filled).sum())} of its values have no '
                          'parameter of ours (an export table bug)')
  return out.reshape(shape)


def write_checkpoint(out: str, m: ModelConfig, vocab_size: int, params: Mapping[str, Any],
                     tokenizer_file: str, max_shard_bytes: int = 5 << 30,
                     extra: Callable[[str], None] | None = None) -> list[str]:
  """Writes the checkpoint directory `out` (atomically); returns its tensor names.

  Args:
    out: the directory (local or gs://).
    m: the resolved model config.
    vocab_size: the model's (the embedding rows; may exceed the tokenizer's).
    params: our backbone's params by name relative to `backbone.` ('blocks.wq', 'head',
      ...), jax or numpy arrays; stacked params are read one layer at a time.
    tokenizer_file: the tokenizer.json copied beside the weights.
    max_shard_bytes: the largest shard (a tensor larger than it gets a shard alone).
    extra: writes more files into the (local, temporary) directory before it is
      published, so they appear with the checkpoint or not at all.
  """
  hf = config_map.hf_config(m, vocab_size)
  plan = _plan(m, vocab_size, set(params))
  itemsize = {n: np.dtype(params[n].dtype).itemsize for n in params}
  shards: list[list[str]] = [[]]
  size = 0
  for tensor, (shape, parts) in plan.items():
    nbytes = int(np.prod(shape)) * itemsize[parts[0][0]]
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  if len(shards) == 1:
    names = [load_lib.SINGLE_FILE]
  with artifacts.atomic_dir(out) as tmp:
    total = 0
    for file, tensors in zip(names, shards):
      arrays = {t: _tensor(t, *plan[t], params) for t in tensors}
      total += sum(a.nbytes for a in arrays.values())
      write_file(paths.join(tmp, file), arrays)
    if len(shards) > 1:
      index = {'metadata': {'total_size': total},
               'weight_map': {t: f for f, ts in zip(names, shards) for t in ts}}
      paths.write_bytes(paths.join(tmp, load_lib.INDEX_FILE),
                        json.dumps(index, indent=2).encode())
    paths.write_bytes(paths.join(tmp, load_lib.CONFIG_FILE), json.dumps(hf, indent=2).encode())
    paths.write_bytes(paths.join(tmp, 'tokenizer.json'), paths.read_bytes(tokenizer_file))
    if extra:
      extra(tmp)
  return [t for ts in shards for t in ts]
