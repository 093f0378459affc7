"""Load throughput of model.init_from against a raw read of the same files.

  python benchmarks/bench_hf_load.py [--layers=4] [--dir=/tmp/qwen3_4b_shapes] [--rounds=3]

Writes (once) a checkpoint with Qwen3-4B's shapes (D 2560, 32 query heads x 128, 8 K/V
heads, MLP 9728, vocab 151936, tied) and random bfloat16 weights, `--layers` of its 36
layers (the per-layer shapes are the model's; fewer layers keep it in a small host's RAM),
in 1 GiB shards. Then, in separate processes (so each peak RSS is its own), on 8 fake CPU
devices (mesh fsdp 4 x tensor 2: every matrix split, so the devices together hold one copy):
  raw   every shard file read whole into memory (np.fromfile), the reference;
  ours  resolve_config, then hf.load.load_params into abstract sharded params (ranged
        reads, each device's slice in our layout), blocked until every array is ready.
Prints seconds, GB/s, CPU seconds (all threads: on a shared machine the steadier measure
of the work done), ours / raw, and each read's transient host memory (peak RSS beyond the
process before the read and beyond the arrays it keeps) next to the largest tensor and
the largest shard. The page cache is warmed by a first raw read, so both read memory; the
two alternate for --rounds rounds and each keeps its fastest (a shared machine's load
comes and goes; the fastest round is the one least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

_SHAPES = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960)


def qwen3_shapes(config: dict, layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} of a Qwen3 checkpoint with `config`'s sizes (config.json keys) and
  `layers` layers; `lm_head.weight` only when the head is untied (tests/test_hf_load.py
  builds its tiny checkpoint from this table too)."""
  d, h, k, e, f, v = (config[n] for n in ('hidden_size', 'num_attention_heads',
                                          'num_key_value_heads', 'head_dim',
                                          'intermediate_size', 'vocab_size'))
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not tied:
    shapes['lm_head.weight'] = (v, d)
  for l in range(layers):
    p = f'model.layers.{l}.'
    shapes.update({p + 'self_attn.q_proj.weight': (h * e, d),
                   p + 'self_attn.k_proj.weight': (k * e, d),
                   p + 'self_attn.v_proj.weight': (k * e, d),
                   p + 'self_attn.o_proj.weight': (d, h * e),
                   p + 'self_attn.q_norm.weight': (e,), p + 'self_attn.k_norm.weight': (e,),
                   p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                   p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
                   p + 'post_attention_layernorm.weight': (d,)})
  return shapes


def _write(directory: str, layers: int) -> None:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from scone_jax.hf.safetensors import write_file  # pylint: disable=g-import-not-at-top
  config_file = os.path.join(directory, 'config.json')
  if os.path.exists(config_file):
    with open(config_file) as fh:
      have = json.load(fh)['num_hidden_layers']
    if have != layers:
      raise SystemExit(f'{directory} holds a {have}-layer checkpoint; give --dir=another '
                       f'directory for {layers} layers')
    return
  os.makedirs(directory, exist_ok=True)
  shapes = qwen3_shapes(_SHAPES, layers, tied=True)
  rng = np.random.default_rng(0)
  shards, current, size = [], {}, 0
  for name, shape in shapes.items():
    current[name] = shape
    size += int(np.prod(shape)) * 2
    if size >= 1 << 30:
      shards.append(current)
      current, size = {}, 0
  shards.append(current) if current else None
  weight_map = {}
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    write_file(os.path.join(directory, file), {
        n: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        for n, s in names.items()})
    weight_map.update({n: file for n in names})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as fh:
    json.dump({'weight_map': weight_map}, fh)
  config = dict(_SHAPES, model_type='qwen3', num_hidden_layers=layers, rms_norm_eps=1e-6,
                tie_word_embeddings=True, hidden_act='silu',
                rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})
  with open(os.path.join(directory, 'config.json'), 'w') as fh:
    json.dump(config, fh)
  import tokenizers  # pylint: disable=g-import-not-at-top
  words = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, 151643)}}
  tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='<|endoftext|>')).save(
      os.path.join(directory, 'tokenizer.json'))


def _status(field: str) -> int:
  """VmRSS (now) or VmHWM (peak) of this process in bytes; unlike getrusage's maxrss,
  VmHWM starts afresh at exec (the parent wrote the checkpoint)."""
  with open('/proc/self/status') as f:
    line = next(l for l in f if l.startswith(field + ':'))
  return int(line.split()[1]) * 1024


def _rss() -> int:
  return _status('VmRSS')


def _raw(directory: str) -> tuple[float, float, int, int]:
  """(seconds, CPU seconds, RSS before reading, bytes kept): each file read whole, then
  freed."""
  before = _rss()
  start, cpu = time.perf_counter(), time.process_time()
  for name in sorted(os.listdir(directory)):
    if name.endswith('.safetensors'):
      np.fromfile(os.path.join(directory, name), np.uint8)
  return time.perf_counter() - start, time.process_time() - cpu, before, 0


def _ours(directory: str) -> tuple[float, float, int, int]:
  """(seconds, CPU seconds, RSS before loading, bytes of the loaded arrays: on CPU devices
  they are host memory too)."""
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from scone_jax.hf import load as hf_load  # pylint: disable=g-import-not-at-top
  from scone_jax.model import Backbone, model_shardings  # pylint: disable=g-import-not-at-top
  cfg = hf_load.resolve_config(config_lib.replace(config_lib.Config(), **{
      'model.init_from': directory, 'model.param_dtype': 'bfloat16',
      'model.dtype': 'bfloat16'}))
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  abstract = nnx.state(nnx.eval_shape(
      lambda: Backbone(cfg.model, cfg.model.vocab_size, nnx.Rngs(0))), nnx.Param)
  targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, model_shardings(abstract, mesh))
  before = _rss()
  start, cpu = time.perf_counter(), time.process_time()
  params = hf_load.load_params(cfg.model, {'backbone': targets})
  jax.block_until_ready(params)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  kept = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
  return seconds, cpu, before, kept


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--dir', default='/tmp/qwen3_4b_shapes')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--child', choices=['raw', 'ours'])
  args = parser.parse_args()
  if args.child:
    seconds, cpu, before, kept = {'raw': _raw, 'ours': _ours}[args.child](args.dir)
    # Transient host memory of the read itself: the peak beyond the process before it and
    # beyond what it keeps (the loaded arrays).
    print(json.dumps({'seconds': seconds, 'cpu': cpu,
                      'extra': _status('VmHWM') - before - kept}))
    return
  _write(args.dir, args.layers)
  total = sum(os.path.getsize(os.path.join(args.dir, n)) for n in os.listdir(args.dir)
              if n.endswith('.safetensors'))
  largest_shard = max(os.path.getsize(os.path.join(args.dir, n)) for n in os.listdir(args.dir)
                      if n.endswith('.safetensors'))
  largest_tensor = _SHAPES['vocab_size'] * _SHAPES['hidden_size'] * 2

  def child(kind):
    out = subprocess.run([sys.executable, __file__, '--child', kind, '--dir', args.dir],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
  child('raw')  # Warms the page cache.
  runs = {'raw': [], 'ours': []}
  for _ in range(args.rounds):
    for kind in runs:
      runs[kind].append(child(kind))
  raw, ours = ({'seconds': min(r['seconds'] for r in rs), 'cpu': min(r['cpu'] for r in rs),
                'extra': max(r['extra'] for r in rs)} for rs in runs.values())
  gb = total / 1e9
  print(f'checkpoint {gb:.2f} GB ({args.layers} of Qwen3-4B\'s 36 layers, bf16), '
        f'largest tensor {largest_tensor / 2**20:.0f} MiB, largest shard '
        f'{largest_shard / 2**20:.0f} MiB')
  for name, r in (('raw read', raw), ('load_params', ours)):
    print(f'{name:12s} {r["seconds"]:7.2f} s  {gb / r["seconds"]:6.2f} GB/s  '
          f'CPU {r["cpu"]:6.2f} s  transient host memory {r["extra"] / 2**20:7.0f} MiB')
  print(f'load_params / raw throughput: {raw["seconds"] / ours["seconds"]:.2f}x '
        f'(by CPU time: {raw["cpu"] / ours["cpu"]:.2f}x)')


if __name__ == '__main__':
  main()
