"""model.init_from's read path on a checkpoint written here (no transformers): every
parameter equals its tensor in our layout, bit for bit, when each tensor is read in many
small chunks across fsdp, tensor and replica shards; each tensor's bytes are read once;
a host holding some of the devices reads only their rows."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax.config import MeshConfig
from scone_jax.hf import load as hf_load
from scone_jax.hf.safetensors import TensorFiles, write_file
from scone_jax.model import Backbone, model_shardings

tokenizers = pytest.importorskip('tokenizers')

# The Qwen3 tensor-name table lives in the load benchmark (loaded by path: tests never edit
# sys.path).
_SPEC = importlib.util.spec_from_file_location(
    'bench_hf_load', os.path.join(os.path.dirname(__file__), '..', 'benchmarks',
                                  'bench_hf_load.py'))
_BENCH = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_BENCH)

# Qwen3-shaped and tiny: GQA (4 query heads, 2 K/V heads), head_dim 12 != D/H, QK-norm,
# untied head, 3 layers (a layer count no mesh axis divides).
HF_CONFIG = dict(model_type='qwen3', hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, intermediate_size=48, vocab_size=64,
                 max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 hidden_act='silu', rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})


def write_checkpoint(directory: str, shards: int = 1) -> dict[str, np.ndarray]:
  """A random bfloat16 checkpoint of HF_CONFIG in `shards` files (with the index when more
  than one) and a tokenizer.json; returns its tensors."""
  os.makedirs(directory, exist_ok=True)
  v = HF_CONFIG['vocab_size']
  shapes = _BENCH.qwen3_shapes(HF_CONFIG, HF_CONFIG['num_hidden_layers'], tied=False)
  rng = np.random.default_rng(0)
  tensors = {n: rng.standard_normal(s, np.float32).astype(ml_dtypes.bfloat16)
             for n, s in shapes.items()}
  names = sorted(tensors)
  groups = [names[i::shards] for i in range(shards)]
  files = (['model.safetensors'] if shards == 1 else
           [f'model-{i + 1:05d}-of-{shards:05d}.safetensors' for i in range(shards)])
  for file, group in zip(files, groups):
    write_file(os.path.join(directory, file), {n: tensors[n] for n in group})
  if shards > 1:
    with open(os.path.join(directory, hf_load.INDEX_FILE), 'w') as fh:
      json.dump({'weight_map': {n: f for f, g in zip(files, groups) for n in g}}, fh)
  with open(os.path.join(directory, hf_load.CONFIG_FILE), 'w') as fh:
    json.dump(HF_CONFIG, fh)
  words = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, v)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='<|endoftext|>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()  # train_helpers' corpus words.
  tok.save(os.path.join(directory, 'tokenizer.json'))
  return tensors


def load(directory: str, mesh_cfg: MeshConfig, param_dtype: str = 'bfloat16'):
  """(config, {our name: loaded array}) through resolve_config and load_params."""
  cfg = hf_load.resolve_config(config_lib.replace(config_lib.Config(), **{
      'model.init_from': directory, 'model.param_dtype': param_dtype, 'train.seq_len': 16}))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  abstract = nnx.state(nnx.eval_shape(
      lambda: Backbone(cfg.model, cfg.model.vocab_size, nnx.Rngs(0))), nnx.Param)
  targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, model_shardings(abstract, mesh))
  loaded = hf_load.load_params(cfg.model, {'backbone': targets})['backbone']
  return cfg, {hf_load.param_name(p): a
               for p, a in jax.tree_util.tree_flatten_with_path(loaded)[0]}


def expected(cfg, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our params from the tensors by the layout table, with numpy alone."""
  layer, top = hf_load.sources(cfg.model, cfg.model.vocab_size)
  out = {f'blocks.{n}': np.stack([fn(tensors[t.format(l=l)])
                                  for l in range(cfg.model.num_layers)])
         for n, (t, _, fn) in layer.items() if t.format(l=0) in tensors}
  out.update({n: fn(tensors[t]) for n, (t, _, fn) in top.items() if t in tensors})
  return out


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('qwen3_tiny'))
  return directory, write_checkpoint(directory)


@pytest.fixture
def reads(monkeypatch):
  """Every read_rows call as (tensor, start, stop)."""
  calls = []
  original = TensorFiles.read_rows

  def spy(self, name, start, stop, out):
    calls.append((name, start, stop))
    original(self, name, start, stop, out)
  monkeypatch.setattr(TensorFiles, 'read_rows', spy)
  return calls


def test_every_param_is_its_tensor_bit_for_bit_in_small_chunks(checkpoint, reads,
                                                                monkeypatch):
  directory, tensors = checkpoint
  monkeypatch.setattr(hf_load, '_CHUNK_BYTES', 200)  # Every matrix in several chunks.
  cfg, params = load(directory, MeshConfig(data=2, fsdp=2, tensor=2))
  want = expected(cfg, tensors)
  assert set(params) == set(want)
  for name, array in params.items():
    assert array.dtype == ml_dtypes.bfloat16 and array.shape == want[name].shape, name
    for shard in array.addressable_shards:  # Replicas (data=2) each their own slice.
      np.testing.assert_array_equal(np.asarray(shard.data).view(np.uint16),
                                    want[name][shard.index].view(np.uint16), err_msg=name)
  # Each tensor's rows read exactly once, in many ranged reads: the fsdp and data shards
  # that share rows share the read.
  rows: dict[str, list[int]] = {}
  for name, start, stop in reads:
    rows.setdefault(name, []).extend(range(start, stop))
  assert {n: sorted(r) for n, r in rows.items()} == {
      n: list(range(t.shape[0])) for n, t in tensors.items()}
  assert len(reads) > 2 * len(tensors)


def test_bfloat16_widens_exactly_to_float32(checkpoint):
  directory, tensors = checkpoint
  cfg, params = load(directory, MeshConfig(data=1, fsdp=4, tensor=2), 'float32')
  want = expected(cfg, tensors)
  for name, array in params.items():
    assert array.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(array), want[name].astype(np.float32),
                                  err_msg=name)


def test_a_host_reads_only_the_rows_its_devices_hold(checkpoint, reads):
  """Two of eight devices (tensor shard 0 of a [D, heads, head_dim] param) read half of
  q_proj's rows: a host holding them reads nothing else of the tensor."""
  directory, tensors = checkpoint
  cfg = hf_load.resolve_config(config_lib.replace(config_lib.Config(), **{
      'model.init_from': directory, 'model.param_dtype': 'bfloat16', 'train.seq_len': 16}))
  files = hf_load.open_tensors(directory)
  name, shape, layout = hf_load.sources(cfg.model, 64)[0]['wq']
  tensor = hf_load._view(files, name.format(l=1), shape, layout,
                         jax.ShapeDtypeStruct((32, 4, 12), ml_dtypes.bfloat16))
  ours = layout(tensors[name.format(l=1)])
  host = [(slice(0, 16), slice(0, 2), slice(None)), (slice(16, 32), slice(0, 2), slice(None))]
  outs = [np.empty(ours[i].shape, ours.dtype) for i in host]
  hf_load._Reader().copy(tensor, [(hf_load._place(tensor, i), o) for i, o in zip(host, outs)])
  for index, out in zip(host, outs):
    np.testing.assert_array_equal(out.view(np.uint16), ours[index].view(np.uint16))
  assert reads == [(name.format(l=1), 0, 24)]  # Heads 0-1 of 4, 12 rows each, of 48.


def test_replicas_sharing_a_host_buffer_survive_donation(checkpoint):
  """The data=2 replicas of a slice share one host array; a donated update written in
  place into it would add twice on one of them."""
  directory, tensors = checkpoint
  cfg, params = load(directory, MeshConfig(data=2, fsdp=2, tensor=2), 'float32')
  table = params['token_embed.table']
  bumped = jax.jit(lambda x: x + 1, donate_argnums=0)(table)
  want = tensors['model.embed_tokens.weight'].astype(np.float32) + 1
  for shard in bumped.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


@pytest.mark.parametrize('dtype', [ml_dtypes.bfloat16, np.float16, np.float32])
def test_transposed_copies_are_exact(dtype):
  """The packed-word transpose (rows a multiple of 8 / itemsize) and the tiled one (any
  other), into whole arrays and into column blocks of one."""
  rng = np.random.default_rng(1)
  for rows, cols in ((600, 520), (37, 300), (8, 3)):
    a = rng.standard_normal((cols, rows)).astype(dtype)
    out = np.zeros((rows, cols + 5), dtype)[:, 2:cols + 2]  # Rows apart, offset.
    hf_load._copy_into(out, a.T)
    np.testing.assert_array_equal(out.view(f'u{a.itemsize}'), a.T.view(f'u{a.itemsize}'))
    block = np.zeros((rows, cols), dtype)
    hf_load._copy_into(block[:, 3:], a.T[:, 3:])
    np.testing.assert_array_equal(block[:, 3:], a.T[:, 3:])
