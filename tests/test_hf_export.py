"""Round trip: a Hugging Face checkpoint loaded through model.init_from and written back by
hf/export.py loads with from_pretrained with equal logits, the source's key, shape and
dtype sets, and bf16 bytes preserved. A SCONE run's export: its f-gram store linked beside
the backbone by manifest, and a README that says the backbone alone is another model."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from scone_jax import artifacts, export_hf
from scone_jax import config as config_lib
from scone_jax import export as export_lib
from scone_jax import mesh as mesh_lib
from scone_jax.config import MeshConfig
from scone_jax.hf import export as hf_export
from scone_jax.hf import load as hf_load
from scone_jax.hf.safetensors import CheckpointError, TensorFiles
from scone_jax.model import Backbone, model_shardings

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')


def _checkpoint(directory: str, hf_cfg, dtype, shard=None):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(dtype).eval()
  with torch.no_grad():
    for p in model.parameters():
      torch.nn.init.normal_(p, std=0.2)
  model.save_pretrained(directory, **({'max_shard_size': shard} if shard else {}))
  vocab = hf_cfg.vocab_size
  words = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, vocab)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='<|endoftext|>'))
  tok.save(os.path.join(directory, 'tokenizer.json'))


def _load(directory: str, **overrides):
  cfg = hf_load.resolve_config(config_lib.replace(
      config_lib.Config(), **{'model.init_from': directory, 'train.seq_len': 16}, **overrides))
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  abstract = nnx.state(nnx.eval_shape(
      lambda: Backbone(cfg.model, cfg.model.vocab_size, nnx.Rngs(0))), nnx.Param)
  targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, model_shardings(abstract, mesh))
  loaded = hf_load.load_params(cfg.model, {'backbone': targets})['backbone']
  params = {hf_load.param_name(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  return cfg, params


def _tensors(directory: str) -> TensorFiles:
  return hf_load.open_tensors(directory)


@pytest.mark.parametrize('family', ['gpt2', 'qwen2'])
def test_round_trip(family, tmp_path):
  src, out = str(tmp_path / 'src'), str(tmp_path / 'out')
  if family == 'gpt2':  # Fused q/k/v (Conv1D), tied head, learned positions, float32.
    hf_cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     vocab_size=64)
    dtype, shard, overrides = torch.float32, None, {}
  else:  # GQA, q/k/v biases, untied head, bfloat16, sharded both ways.
    hf_cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, max_position_embeddings=32,
                                      vocab_size=64, tie_word_embeddings=False)
    dtype, shard, overrides = torch.bfloat16, '10KB', {'model.param_dtype': 'bfloat16'}
  _checkpoint(src, hf_cfg, dtype, shard)
  cfg, params = _load(src, **overrides)
  hf_export.write_checkpoint(out, cfg.model, cfg.model.vocab_size, params,
                             os.path.join(src, 'tokenizer.json'),
                             max_shard_bytes=16 << 10 if shard else 5 << 30)
  assert os.path.exists(os.path.join(out, hf_load.INDEX_FILE)) == bool(shard)
  want, got = _tensors(src), _tensors(out)
  meta = lambda files: {n: (i.shape, i.dtype) for n, i in files.tensors.items()
                        if not n.endswith(('.attn.bias', '.attn.masked_bias'))}
  assert meta(got) == meta(want)
  for name in got.tensors:  # Every value's bits, bfloat16 included.
    np.testing.assert_array_equal(got.array(name).view(np.uint8),
                                  want.array(name).view(np.uint8), err_msg=name)
  # Both loaded the same way (a model cast after init would hold bf16 RoPE buffers).
  source, exported = (transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
                      for d in (src, out))
  ids = torch.tensor(np.random.default_rng(0).integers(1, 64, (1, 12)))
  with torch.no_grad():
    np.testing.assert_array_equal(exported(ids).logits.float().numpy(),
                                  source(ids).logits.float().numpy())


def test_an_architecture_transformers_lacks_is_refused():
  cfg = config_lib.replace(config_lib.Config(), **{'model.position': 'rope'})  # gpt2 + RoPE
  with pytest.raises(CheckpointError, match=r"config.model.position='rope': a gpt2 model in "
                     "transformers has 'learned'"):
    hf_export.write_checkpoint('/nonexistent', cfg.model, 64, {}, '')


def _store(directory: str, **meta) -> dict:
  """A store-shaped artifact: zarr.json and one shard, with a store manifest."""
  os.makedirs(os.path.join(directory, 'c', '0'))
  with open(os.path.join(directory, 'zarr.json'), 'w') as f:
    f.write('{}')
  with open(os.path.join(directory, 'c', '0', '0'), 'wb') as f:
    f.write(os.urandom(1000))
  return artifacts.write_manifest(directory, export_lib.STORE_KIND, meta,
                                  files=['zarr.json', 'c/0/0'])


def test_the_store_is_linked_by_its_manifest(tmp_path):
  store, dst = str(tmp_path / 'export'), str(tmp_path / 'out' / 'fgram_store')
  want = _store(store, num_rows=7)
  export_hf.copy_store(store, dst)
  for name in ('zarr.json', 'c/0/0', 'manifest.json'):
    assert os.path.samefile(os.path.join(store, name), os.path.join(dst, name)), name
  assert artifacts.read_manifest(dst, export_lib.STORE_KIND, verify='full') == want
  os.remove(os.path.join(store, 'c', '0', '0'))  # A broken store is refused, not copied.
  with pytest.raises(artifacts.ArtifactError, match='missing file c/0/0'):
    export_hf.copy_store(store, str(tmp_path / 'other'))


def test_readme_says_backbone_alone_and_how_to_serve_the_run(tmp_path):
  cfg = config_lib.replace(config_lib.Config(), **{'name': 'qwen_sft',
                                                   'model.family': 'qwen3'})
  manifest = {'num_rows': 2000, 'd_model': 32, 'dtype': 'bfloat16',
              'table_fingerprint': 'tfp', 'weights_fingerprint': 'wfp'}
  w, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  text = export_hf.readme(cfg, w, out, 120, 151936, manifest)
  assert '**This checkpoint is the backbone alone.**' in text
  assert f'python -m scone_jax.generate --workdir={w} --prompt=' in text
  assert f'cp -r {out}/fgram_store {w}/export' in text
  for row in ('| checkpoint step | 120 |', '| f-grams S | 2000 rows of 32 (bfloat16)',
              f'| run | `{w}`', 'vocab 151936', 'weights `wfp`'):
    assert row in text, row


@pytest.mark.slow
def test_a_scone_run_exports_its_backbone_with_its_store(tmp_path, capfd):
  """A SCONE run started from a checkpoint: export_hf exports W/export first (none yet),
  links it beside the backbone, and a second export reuses it."""
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  from tests.test_hf_load import write_checkpoint  # pylint: disable=g-import-not-at-top
  source = str(tmp_path / 'source')
  write_checkpoint(source)
  corpus, _ = train_helpers.shared_dirs(str(tmp_path))
  cfg = train_helpers.micro_config(corpus, str(tmp_path / 'art'), **{
      'model.init_from': source, 'model.num_layers': 2, 'model.d_model': 128,
      'model.num_heads': 4, 'model.max_seq_len': 256, 'train.steps': 2,
      'checkpoint.every_steps': 2})
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  loop.train(cfg, workdir)
  export_hf.export_hf(workdir, out)
  assert 'holds the backbone alone' in capfd.readouterr().err
  store = os.path.join(workdir, 'export')
  manifest = artifacts.read_manifest(store, export_lib.STORE_KIND)
  assert artifacts.read_manifest(os.path.join(out, 'fgram_store'), export_lib.STORE_KIND,
                                 verify='full') == manifest
  with open(os.path.join(out, 'README.md')) as f:
    text = f.read()
  assert f'| checkpoint step | 2 |' in text and f'| f-grams S | {manifest["num_rows"]} ' in text
  assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == 'qwen3'
  export_hf.export_hf(workdir, str(tmp_path / 'again'))  # The current store: no re-export.
  assert artifacts.read_manifest(store, export_lib.STORE_KIND)['created'] == manifest['created']
  assert os.path.samefile(os.path.join(store, 'c/0/0'),
                          os.path.join(tmp_path, 'again', 'fgram_store', 'c/0/0'))
