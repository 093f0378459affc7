"""SCONE attached to an imported Hugging Face model (model.init_from), A_f from a second,
wider checkpoint (fgram_model.init_from: its own width, GQA, head_dim, RoPE, a projection):
step 0 is transformers' own forward, A_f's parameters and outputs are the source's, a
mismatched source is refused naming the key; slow: SFT on it, then the exported store
serves what the training forward computes."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from phrase_fixtures import BOS, K, PHRASES, table  # noqa: F401  (the table fixture)
from test_decode import bos_rows
from test_hf_import import save_checkpoint
from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax.batches.tagging import tag_fgrams
from scone_jax.config import ConfigError, MeshConfig
from scone_jax.hf import load as hf_load
from scone_jax.model import SconeLM, model_shardings
from scone_jax.train import init_from

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 96
# The backbone (Qwen3: GQA, QK-norm, head_dim 12 != 32 / 4) and A_f's source, wider, with
# a head width of its own (head_dim 16 != 48 / 4).
_QWEN3 = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, vocab_size=VOCAB, tie_word_embeddings=True)
BACKBONE = dict(_QWEN3, hidden_size=32, head_dim=12, intermediate_size=48)
WIDE = dict(_QWEN3, hidden_size=48, head_dim=16, intermediate_size=80)
# A_f = the wide checkpoint's 2 layers; its output reaches the backbone through a zero
# projection [48, 32] added to T(x_i) (step 0 = the backbone).
AF = {'fgram_model.num_layers': 2, 'fgram_model.d_model': 48, 'fgram_model.num_heads': 4,
      'fgram_model.num_kv_heads': 2, 'fgram_model.head_dim': 16, 'fgram_model.mlp_dim': 80,
      'fgram_model.combine': 'add', 'fgram_model.zero_init_out': True,
      'fgram_model.final_norm': 'same'}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """{name: (directory, transformers model)} for the backbone and A_f's source."""
  out = {}
  for name, kwargs in (('backbone', BACKBONE), ('wide', WIDE)):
    directory = str(tmp_path_factory.mktemp(name))
    out[name] = directory, save_checkpoint(directory, transformers.Qwen3Config(**kwargs),
                                           VOCAB)
  return out


def _config(checkpoints, **overrides):
  return hf_load.resolve_config(config_lib.replace(config_lib.Config(), **{
      'model.init_from': checkpoints['backbone'][0], 'train.seq_len': 16,
      'fgram.max_len': K, **AF, 'fgram_model.init_from': checkpoints['wide'][0],
      **overrides}))


def _attach(cfg, workdir: str):
  """Our SconeLM at step 0 on 2 x 2 x 2 devices: the backbone by load_params, A_f by
  init_from.start_params, as train's init does, into abstract params (nothing is
  initialised: every parameter but A_f's zero projection must come from a checkpoint)."""
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: SconeLM(cfg.model, cfg.fgram_model, K, VOCAB, nnx.Rngs(0))))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, model_shardings(abstract, mesh))
  params = hf_load.load_params(cfg.model, params)
  with open(cfg.tokenizer.model_file, 'rb') as f:
    fingerprint = hashlib.sha256(f.read()).hexdigest()
  params = init_from.start_params(cfg, workdir, params, mesh, fingerprint)
  left = [hf_load.param_name(k) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
          if isinstance(v, jax.ShapeDtypeStruct)]
  assert left == ['fgram_model.proj']
  params = jax.tree.map(lambda v: jax.device_put(jnp.zeros(v.shape, v.dtype), v.sharding)
                        if isinstance(v, jax.ShapeDtypeStruct) else v, params)
  return nnx.merge(graphdef, params)


@pytest.fixture(scope='module')
def attached(checkpoints, tmp_path_factory):
  cfg = _config(checkpoints)
  return cfg, _attach(cfg, str(tmp_path_factory.mktemp('w')))


def test_step0_is_transformers_forward(attached, checkpoints, table):
  _, lm = attached
  seqs = [PHRASES[0] + [60, 61] + PHRASES[1], PHRASES[3] + PHRASES[2] + [90], [70, 71, 72]]
  batch = tag_fgrams(bos_rows(seqs, 16), table, capacity=48)
  batch = {k: v for k, v in batch.items() if not k.startswith('stats/')}
  assert (batch['fgram_slot_BxT'] >= 0).sum() >= 5  # A_f's output reaches the input.
  graphdef, state = nnx.split(lm)
  got = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch))
  hf_model = checkpoints['backbone'][1]
  for b, s in enumerate(seqs):
    ids = batch['inputs_BxT'][b, :len(s) + 1]
    with torch.no_grad():
      want = hf_model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()
    assert float(np.abs(want).max()) > 0.5
    # Logits O(1..10): 1e-4 is float32 summation-order noise.
    np.testing.assert_allclose(got[b, :len(s) + 1], want, atol=1e-4, rtol=0)


def test_af_is_the_wide_checkpoint(attached, checkpoints):
  """A_f's parameters are the wide checkpoint's tensors; with a projection P its output
  is transformers' final hidden state at the f-gram's last token, times P (RoPE, GQA,
  QK-norm and head_dim 16 all as the source computes them)."""
  _, lm = attached
  directory, wide = checkpoints['wide']
  files = hf_load.open_tensors(directory)
  af = lm.fgram_model
  np.testing.assert_array_equal(af.token_embed.table[...],
                                files.array('model.embed_tokens.weight'))
  np.testing.assert_array_equal(af.final_norm.scale[...], files.array('model.norm.weight'))
  for layer in range(2):
    k_proj = files.array(f'model.layers.{layer}.self_attn.k_proj.weight')  # [K E, D]
    np.testing.assert_array_equal(af.blocks.wk[...][layer], k_proj.T.reshape(48, 2, 16))
    np.testing.assert_array_equal(af.blocks.q_norm_scale[...][layer], files.array(
        f'model.layers.{layer}.self_attn.q_norm.weight'))
  assert af.pos_table is None and af.rope  # Qwen3 positions: RoPE, not a table.
  assert not np.any(np.asarray(af.proj[...]))  # zero_init_out
  proj = np.random.default_rng(0).normal(size=(48, 32)).astype(np.float32)
  with_proj = nnx.clone(af)  # The fixture's model keeps its zero projection.
  with_proj.proj[...] = jnp.asarray(proj)
  tokens_UxK = np.array([[5, 6, 7, 8], [9, 10, 0, 0], [30, 31, 44, 0]], np.int32)
  lens_U = np.array([4, 2, 3], np.int32)
  e_UxD = np.asarray(nnx.jit(lambda m, t, n: m(t, n))(with_proj, tokens_UxK, lens_U))
  for u, n in enumerate(lens_U):
    with torch.no_grad():
      hidden = wide.model(torch.tensor(tokens_UxK[u:u + 1, :n].astype(np.int64)))
    want = hidden.last_hidden_state[0, -1].numpy() @ proj
    np.testing.assert_allclose(e_UxD[u], want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_gpt2_source_gives_learned_positions(tmp_path):
  """A GPT-2 source: A_f's position table is the first K rows of its wpe, its q/k/v the
  slices of the fused c_attn."""
  dirs = {}
  for name, width, layers in (('backbone', 32, 1), ('wide', 48, 2)):
    dirs[name] = str(tmp_path / name)
    save_checkpoint(dirs[name], transformers.GPT2Config(
        n_embd=width, n_layer=layers, n_head=4, n_positions=64, vocab_size=VOCAB), VOCAB)
  cfg = hf_load.resolve_config(config_lib.replace(config_lib.Config(), **{
      'model.init_from': dirs['backbone'], 'train.seq_len': 16, 'fgram.max_len': K,
      'fgram_model.num_layers': 1, 'fgram_model.d_model': 48, 'fgram_model.combine': 'add',
      'fgram_model.zero_init_out': True, 'fgram_model.init_from': dirs['wide']}))
  af = _attach(cfg, str(tmp_path / 'w')).fgram_model
  files = hf_load.open_tensors(dirs['wide'])
  np.testing.assert_array_equal(af.pos_table[...], files.array('transformer.wpe.weight')[:K])
  np.testing.assert_array_equal(af.token_embed.table[...],
                                files.array('transformer.wte.weight'))
  c_attn = files.array('transformer.h.0.attn.c_attn.weight')  # [D, 3 D]: q | k | v
  np.testing.assert_array_equal(af.blocks.wv[...][0], c_attn[:, 96:].reshape(48, 4, 12))
  assert af.blocks.wv[...].shape[0] == 1  # The first fgram_model.num_layers of 2.


@pytest.mark.parametrize('overrides,message', [
    ({'fgram_model.head_dim': 12}, r'its head width is 16, A_f\'s is 12: set '
                                   r'config.fgram_model.head_dim=16'),
    ({'fgram_model.num_kv_heads': 0, 'fgram_model.mlp_dim': 64},
     r'K/V head count is 2, .*fgram_model.num_kv_heads=2; .*fgram_model.mlp_dim=80'),
    ({'fgram_model.num_layers': 3}, 'has 2 layers; A_f takes its first fgram_model.num_layers=3'),
    ({'fgram_model.d_model': 0, 'fgram_model.num_heads': 0, 'fgram_model.num_kv_heads': 0,
      'fgram_model.head_dim': 0, 'fgram_model.mlp_dim': 0, 'fgram_model.final_norm': 'none'},
     r'a pretrained model of its own: set its shape, config.fgram_model.d_model=48 '
     r'config.fgram_model.num_heads=4 config.fgram_model.num_kv_heads=2 '
     r'config.fgram_model.head_dim=16 config.fgram_model.mlp_dim=80'),
], ids=['head_dim', 'kv_heads_and_mlp', 'layers', 'shared_width'])
def test_mismatched_source_is_refused_naming_the_key(checkpoints, overrides, message):
  with pytest.raises(ConfigError, match=message):
    init_from.check_source(_config(checkpoints, **overrides))


def test_train_refuses_a_mismatched_source_before_writing(checkpoints, tmp_path):
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  with pytest.raises(ConfigError, match='fgram_model.head_dim=16'):
    loop.train(_config(checkpoints, **{'fgram_model.head_dim': 24}), workdir)
  assert not os.path.exists(workdir)


def test_source_kinds_and_the_older_key(checkpoints, tmp_path):
  backbone, wide = checkpoints['backbone'][0], checkpoints['wide'][0]
  assert hf_load.is_checkpoint(wide) and not hf_load.is_checkpoint(str(tmp_path))
  # The older key names the same source; both at once is refused.
  old = _config(checkpoints, **{'fgram_model.init_from': '',
                                'fgram_model.init_from_run': wide})
  assert old.fgram_model.source == wide
  init_from.check_source(old)
  with pytest.raises(ConfigError, match='init_from and init_from_run both'):
    _config(checkpoints, **{'fgram_model.init_from_run': wide})
  # A run's config.json written before the new A_f keys existed reopens unchanged.
  values = json.loads(old.to_json())
  del values['fgram_model']['init_from']
  assert config_lib.from_configdict(values) == old
  plain = config_lib.from_configdict(config_lib.base_config())
  values = json.loads(plain.to_json())
  for key in ('init_from', 'num_kv_heads', 'head_dim'):
    del values['fgram_model'][key]
  assert config_lib.from_configdict(values) == plain
  with pytest.raises(ConfigError, match=r'its model.d_model is 32, .*fgram_model.d_model=32'):
    init_from.check_source(_config(checkpoints, **{'fgram_model.init_from': backbone}))
  with pytest.raises(ConfigError, match='no such directory'):
    init_from.check_source(_config(checkpoints, **{
        'fgram_model.init_from': str(tmp_path / 'missing')}))


def _write_sft(path: str, count: int, seed: int) -> None:
  """Prompts open with w90 and responses end with w91 (ids 90, 91): a prompt-only and a
  response-only token; the response is the prompt's words reversed."""
  rng = np.random.default_rng(seed)
  with open(path, 'w') as f:
    for _ in range(count):
      words = [f'w{i}' for i in rng.integers(2, 40, rng.integers(3, 8))]
      f.write(json.dumps({'prompt': 'w90 ' + ' '.join(words),
                          'response': ' '.join(words[::-1]) + ' w91'}) + '\n')


@pytest.mark.slow  # A training run, an export and a decoder (minutes on a loaded 2-core CI).
def test_sft_on_the_imported_model_then_serve_the_store(checkpoints, tmp_path):
  from scone_jax import batches, restore  # pylint: disable=g-import-not-at-top
  from scone_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from scone_jax.export import export_store  # pylint: disable=g-import-not-at-top
  from scone_jax.generate import build_decoder  # pylint: disable=g-import-not-at-top
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  _write_sft(str(tmp_path / 'train.jsonl'), 400, 0)
  _write_sft(str(tmp_path / 'eval.jsonl'), 40, 1)
  # The micro run's model sizes back at their defaults: config.json sets them.
  cfg = th.micro_config(str(tmp_path), **{
      'model.init_from': checkpoints['backbone'][0], 'model.num_layers': 2,
      'model.d_model': 128, 'model.num_heads': 4, 'model.max_seq_len': 256,
      'data.format': 'sft', 'data.train_files': str(tmp_path / 'train.jsonl'),
      'data.eval_files': 'heldout=' + str(tmp_path / 'eval.jsonl'), 'fgram.max_len': K,
      'fgram.size': 500,
      **AF, 'fgram_model.init_from': checkpoints['wide'][0], 'train.steps': 8,
      'train.learning_rate': 3e-3, 'checkpoint.every_steps': 0, 'export.dtype': 'float32'})
  workdir = str(tmp_path / 'W')
  loop.train(cfg, workdir)
  run = run_lib.RunDir(workdir)
  losses = [m['loss'] for m in run.metrics() if 'loss' in m]
  assert len(losses) == 8 and losses[-1] < losses[0], losses
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert np.isfinite(json.load(f)['corpora']['heldout']['response_loss'])
  # The loss weights: 0 on every prompt-only token, 1 on every response-only token.
  run_cfg = restore.run_config(workdir, {'serve.batch_size': 2})
  batch = next(batches.make_train_iterator(run_cfg, run.train_shards(), run.table(),
                                           bos_id=run.tokenizer().bos_id))
  w, t = batch['weights_BxT'], batch['targets_BxT']
  assert (t == 90).sum() >= 3 and not np.any(w[t == 90])
  assert (t == 91).sum() >= 3 and np.all(w[t == 91] == 1)
  # The exported store (float32) serves what the training forward computes.
  export_store(run_cfg, workdir, progress=False)
  loaded, dec = build_decoder(run_cfg, workdir)
  assert np.any(np.asarray(loaded.lm.fgram_model.proj[...]))  # A_f's output is live.
  seqs = [np.array([90, 5, 6, 7, 8, 3, 4], np.int32), np.array([90, 9, 10, 11, 2, 3, 5],
                                                               np.int32)]
  got = dec.teacher_forced_logits([s[:3] for s in seqs], [s[3:] for s in seqs])
  graphdef, state = nnx.split(loaded.lm)
  matched = 0
  for b, s in enumerate(seqs):
    inputs = np.concatenate([[loaded.tokenizer.bos_id], s[:-1]])[None].astype(np.int32)
    one = {'inputs_BxT': inputs, 'segment_ids_BxT': np.ones_like(inputs),
           'positions_BxT': np.arange(inputs.shape[1], dtype=np.int32)[None]}
    one = tag_fgrams(one, loaded.table, capacity=inputs.size)
    matched += int((one['fgram_slot_BxT'] >= 0).sum())
    one = {k: v for k, v in one.items() if not k.startswith('stats/')}
    want = np.asarray(nnx.merge(graphdef, state)(one))[0]
    assert got[b].shape == want.shape
    assert np.abs(got[b] - want).max() <= 1e-4 * np.abs(want).max()
  assert matched >= 2  # Store rows served some positions.
