"""model.init_from's refusals (each names the file and field, before any training), bf16
kept bit-exact, and a run whose step 0 is the checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax.config import ConfigError, MeshConfig
from scone_jax.hf import load as hf_load
from scone_jax.hf.safetensors import CheckpointError, TensorFiles, read_header
from scone_jax.model import SconeLM, create_sharded
from tests import train_helpers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')


def _tokenizer(directory: str, vocab: int) -> None:
  words = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, vocab)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='<|endoftext|>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, 'tokenizer.json'))


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A tiny Qwen2 checkpoint, float32 and sharded into several files."""
  directory = str(tmp_path_factory.mktemp('qwen2'))
  hf_cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48,
                                    max_position_embeddings=64, vocab_size=64)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
  with torch.no_grad():  # No zero tensors (biases): a 1e-30 step leaves these bits alone.
    for p in model.parameters():
      torch.nn.init.normal_(p, std=0.2)
  model.save_pretrained(directory, max_shard_size='10KB')
  _tokenizer(directory, 64)
  return directory


def _copy(source: str, tmp_path, edit_config=None) -> str:
  directory = str(tmp_path / 'ckpt')
  shutil.copytree(source, directory)
  if edit_config:
    file = os.path.join(directory, 'config.json')
    with open(file) as f:
      hf = json.load(f)
    edit_config(hf)
    with open(file, 'w') as f:
      json.dump(hf, f)
  return directory


def _resolve(directory: str, **overrides):
  return hf_load.resolve_config(config_lib.replace(
      config_lib.Config(), **{'model.init_from': directory, 'train.seq_len': 16}, **overrides))


def _abstract_params(cfg):
  model = nnx.eval_shape(lambda: SconeLM(cfg.model, cfg.fgram_model, cfg.fgram.max_len,
                                         cfg.model.vocab_size, nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def test_hub_name_is_refused_with_the_download_instruction():
  with pytest.raises(ConfigError, match='huggingface-cli download Qwen/Qwen3-4B'):
    _resolve('Qwen/Qwen3-4B')


def test_resolved_config_is_the_checkpoints(source):
  cfg = _resolve(source)
  m = cfg.model
  assert (m.family, m.d_model, m.num_heads, m.kv_heads, m.head_size, m.bias) == (
      'qwen2', 32, 4, 2, 8, 'qkv')
  assert cfg.tokenizer.kind == 'huggingface' and cfg.tokenizer.vocab_size == 64
  assert _resolve(source) == hf_load.resolve_config(cfg)  # Idempotent (resume compares).
  with pytest.raises(ConfigError, match=r'model.num_layers=4 contradicts .*config.json'):
    _resolve(source, **{'model.num_layers': 4})
  with pytest.raises(ConfigError, match='init_from_run both set'):
    _resolve(source, **{'train.init_from_run': '/elsewhere'})


@pytest.mark.parametrize('edit, field', [
    (lambda hf: hf.update(model_type='mixtral'), '"model_type": \'mixtral\''),
    (lambda hf: hf.update(use_sliding_window=True), '"use_sliding_window"'),
    (lambda hf: hf.update(num_experts=8), '"num_experts"'),
    (lambda hf: hf.update(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4}),
     '"rope_parameters.rope_type": \'yarn\''),
    (lambda hf: hf.update(hidden_act='gelu'), '"hidden_act"'),
])
def test_unsupported_architecture_names_the_field(source, tmp_path, edit, field):
  directory = _copy(source, tmp_path, edit)
  with pytest.raises(CheckpointError, match='config.json: ' + field.replace('.', r'\.')):
    _resolve(directory)


def test_tokenizer_larger_than_the_vocab_is_refused(source, tmp_path):
  directory = _copy(source, tmp_path)
  _tokenizer(directory, 80)
  with pytest.raises(CheckpointError, match=r'tokenizer.json has 80 tokens .*"vocab_size" is 64'):
    _resolve(directory)


def test_missing_shard_is_refused(source, tmp_path):
  directory = _copy(source, tmp_path)
  shards = sorted(f for f in os.listdir(directory) if f.startswith('model-0'))
  assert len(shards) > 1
  os.remove(os.path.join(directory, shards[-1]))
  cfg = _resolve(directory)
  with pytest.raises(CheckpointError, match=f'index.json "weight_map" names {shards[-1]}'):
    hf_load.load_params(cfg.model, _abstract_params(cfg))


def test_shape_mismatch_names_the_file_and_tensor(source, tmp_path):
  directory = _copy(source, tmp_path, lambda hf: hf.update(intermediate_size=40))
  cfg = _resolve(directory)
  with pytest.raises(CheckpointError, match=r'safetensors: tensor model.layers.0.mlp.\w+_proj'
                     r'.weight has shape \[.*\], which does not give our'):
    hf_load.load_params(cfg.model, _abstract_params(cfg))


def test_lossy_dtype_is_refused(source):
  cfg = _resolve(source, **{'model.param_dtype': 'bfloat16'})
  with pytest.raises(CheckpointError, match=r"is float32; model.param_dtype='bfloat16' would "
                     'round it'):
    hf_load.load_params(cfg.model, _abstract_params(cfg))


def test_truncated_file_is_refused(source, tmp_path):
  directory = _copy(source, tmp_path)
  shard = sorted(f for f in os.listdir(directory) if f.startswith('model-0'))[0]
  path = os.path.join(directory, shard)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 4)
  with pytest.raises(CheckpointError, match=f'{shard}: tensor .* do not fit'):
    read_header(path)


def test_bfloat16_is_bit_exact_on_a_sharded_mesh(source, tmp_path):
  directory = str(tmp_path / 'bf16')
  model = transformers.AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16)
  model.save_pretrained(directory)
  shutil.copy(os.path.join(source, 'tokenizer.json'), directory)
  cfg = _resolve(directory, **{'model.param_dtype': 'bfloat16'})
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  ours = create_sharded(lambda: SconeLM(cfg.model, cfg.fgram_model, cfg.fgram.max_len,
                                        cfg.model.vocab_size, nnx.Rngs(0)), mesh)
  loaded = hf_load.load_params(cfg.model, nnx.state(ours, nnx.Param))
  nnx.update(ours, loaded)
  files = TensorFiles(read_header(os.path.join(directory, 'model.safetensors')))
  bits = lambda a: np.asarray(a).view(np.uint16)
  wq = ours.backbone.blocks.wq[...]
  assert wq.dtype == ml_dtypes.bfloat16 and len(wq.sharding.device_set) == 8
  want = files.array('model.layers.0.self_attn.q_proj.weight').T.reshape(32, 4, 8)
  np.testing.assert_array_equal(bits(wq[0]), bits(want))
  np.testing.assert_array_equal(bits(ours.backbone.token_embed.table[...]),
                                bits(files.array('model.embed_tokens.weight')))
  torch_bits = model.model.embed_tokens.weight.detach().view(torch.int16).numpy()
  np.testing.assert_array_equal(bits(ours.backbone.token_embed.table[...]),
                                torch_bits.view(np.uint16))


def test_train_refuses_a_hub_name_before_writing(tmp_path):
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = config_lib.replace(config_lib.Config(), **{'model.init_from': 'org/model'})
  workdir = str(tmp_path / 'run')
  with pytest.raises(ConfigError, match='Hugging Face Hub name'):
    loop.train(cfg, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_training_starts_from_the_checkpoint(source, tmp_path):
  """A 1-step run at a negligible learning rate: its step-1 params are the checkpoint's."""
  from scone_jax import export_hf  # pylint: disable=g-import-not-at-top
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  corpus, _ = train_helpers.shared_dirs(str(tmp_path))
  # The micro run's model sizes back at their defaults: config.json sets them.
  cfg = train_helpers.micro_config(corpus, str(tmp_path / 'art'), **{
      'model.init_from': source, 'model.num_layers': 2, 'model.d_model': 128,
      'model.num_heads': 4, 'model.max_seq_len': 256, 'fgram_model.num_layers': 0,
      'train.steps': 1, 'train.learning_rate': 1e-30, 'train.weight_decay': 0.0,
      'checkpoint.every_steps': 1})
  workdir = str(tmp_path / 'run')
  loop.train(cfg, workdir)
  arrays = train_helpers.checkpoint_arrays(workdir, 1)
  table = next(v for k, v in arrays.items() if 'token_embed' in k and 'params' in k)
  files = hf_load.open_tensors(source)
  np.testing.assert_array_equal(table, files.array('model.embed_tokens.weight'))
  # And back out through export_hf: the source's tensors, bit for bit.
  out = str(tmp_path / 'exported')
  export_hf.export_hf(workdir, out)
  exported = hf_load.open_tensors(out)
  assert sorted(exported.tensors) == sorted(files.tensors)
  for name in files.tensors:
    np.testing.assert_array_equal(exported.array(name), files.array(name), err_msg=name)
  assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == 'qwen2'
