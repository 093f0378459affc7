"""SCONE attached to a trained backbone (train/init_from.py): step 0 is the pretrained model
exactly (zero-initialised output projection, combine='add'), A_f of its own width starts
from another run's backbone, and the attached run trains and exports."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import batches
from scone_jax import mesh as mesh_lib
from scone_jax import run as run_lib
from scone_jax.config import ConfigError
from scone_jax.export import export as export_lib
from scone_jax.model import SconeLM, arm_accounting, flops
from scone_jax.sweeps import spec
from scone_jax.train import init_from
from scone_jax.train import inputs as inputs_lib
from scone_jax.train import loop
from scone_jax.train import step as step_lib

# A_f of width 64 (its own token table, blocks and a projection to 32) on a backbone of 32.
ATTACH = {'fgram_model.combine': 'add', 'fgram_model.zero_init_out': True,
          'fgram_model.d_model': 64, 'train.steps': 2, 'checkpoint.every_steps': 0}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """(corpus, artifacts, W of a trained baseline of width 32, W of one of width 64)."""
  base = str(tmp_path_factory.getbasetemp())
  corpus, artifacts = th.shared_dirs(base)
  runs = []
  for d in (32, 64):
    workdir = os.path.join(base, f'attach_base{d}')
    cfg = th.micro_config(corpus, artifacts, **{'fgram_model.num_layers': 0,
                                                'model.d_model': d, 'train.steps': 2,
                                                'checkpoint.every_steps': 0})
    if not os.path.exists(os.path.join(workdir, 'eval.json')):
      loop.train(cfg, workdir)
    runs.append(workdir)
  return corpus, artifacts, runs[0], runs[1]


def _attach_config(pretrained, **overrides):
  corpus, artifacts, w32, w64 = pretrained
  return th.micro_config(corpus, artifacts, **{
      **ATTACH, 'train.init_from_run': w32, 'fgram_model.init_from_run': w64, **overrides})


@pytest.mark.slow  # Fast-suite budget (CI's 2 cores): `make test-all` runs it.
def test_step0_is_the_pretrained_model(pretrained, tmp_path):
  _, _, w32, w64 = pretrained
  cfg = _attach_config(pretrained)
  data = inputs_lib.open_train_inputs(cfg, str(tmp_path))
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  vocab = run_lib.RunDir(w32).info()['vocab_size']
  graphdef, state, _ = step_lib.create_train_state(cfg, mesh, vocab, cfg.fgram.max_len,
                                                   data.table)
  state = init_from.init_params(cfg, str(tmp_path), state, mesh, data.tokenizer.fingerprint)
  attached = nnx.merge(graphdef, state.params, state.other)
  it = batches.make_train_iterator(cfg, data.train_shards, data.table,
                                   bos_id=data.tokenizer.bos_id)
  batch = batches.to_global_arrays(batches.split_stats(next(it))[0], mesh)
  assert int(jnp.sum(batch['fgram_slot_BxT'] >= 0)) > 0  # A_f's output reaches the input.

  source32 = run_lib.RunDir(w32)
  base_lm, _ = source32.restore_model(source32.config(), mesh)
  source64 = run_lib.RunDir(w64)
  wide_lm, _ = source64.restore_model(source64.config(), mesh)
  # A_f is the width-64 run's backbone (its first layer), the backbone the width-32 run's.
  np.testing.assert_array_equal(attached.fgram_model.blocks.wq[...],
                                wide_lm.backbone.blocks.wq[...][:1])
  np.testing.assert_array_equal(attached.fgram_model.token_embed.table[...],
                                wide_lm.backbone.token_embed.table[...])
  np.testing.assert_array_equal(attached.backbone.blocks.w_in[...],
                                base_lm.backbone.blocks.w_in[...])
  e_NxD = attached.fgram_embeddings(batch)
  assert e_NxD.shape[-1] == 32 and not np.any(np.asarray(e_NxD))
  np.testing.assert_allclose(np.asarray(attached(batch)), np.asarray(base_lm(batch)),
                             rtol=0, atol=1e-6)
  # The check can fail: a non-zero projection changes the logits at matched positions (a
  # random one: a constant would add the same value to every channel, which LayerNorm
  # removes).
  attached.fgram_model.proj[...] = 0.05 * jax.random.normal(
      jax.random.key(0), attached.fgram_model.proj[...].shape)
  assert np.max(np.abs(np.asarray(attached(batch)) - np.asarray(base_lm(batch)))) > 1e-3


@pytest.mark.slow  # A third training run and an export (~100 s on a loaded 2-core CI).
def test_attached_run_trains_and_exports(pretrained, tmp_path):
  cfg = _attach_config(pretrained)
  workdir = str(tmp_path / 'W')
  result = loop.train(cfg, workdir)
  assert result.status == 'completed'
  run = run_lib.RunDir(workdir)
  lm, _ = run.restore_model(run.config(), mesh_lib.make_mesh(cfg.mesh, 8))
  assert np.any(np.asarray(lm.fgram_model.proj[...]))  # The projection left zero.
  out = export_lib.export_store(cfg, workdir, progress=False)
  manifest = os.path.join(out, 'manifest.json')
  assert os.path.exists(manifest)
  losses = [m['loss'] for m in run.metrics() if 'loss' in m]
  assert losses and all(np.isfinite(losses))


def test_attach_errors(pretrained, tmp_path):
  corpus, artifacts, w32, w64 = pretrained
  with pytest.raises(ConfigError, match="combine='add'"):
    th.micro_config(corpus, artifacts, **{'fgram_model.zero_init_out': True})
  cfg = _attach_config(pretrained, **{'fgram_model.d_model': 48})
  data = inputs_lib.open_train_inputs(cfg, str(tmp_path))
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  _, state, _ = step_lib.create_train_state(cfg, mesh, run_lib.RunDir(w32).info()['vocab_size'],
                                            cfg.fgram.max_len, data.table)
  with pytest.raises(ConfigError, match=r'model.d_model is 64.*fgram_model.d_model=64'):
    init_from.init_params(cfg, str(tmp_path), state, mesh, data.tokenizer.fingerprint)
  assert init_from.attach_is_exact(cfg.fgram_model)
  assert not init_from.attach_is_exact(
      _attach_config(pretrained, **{'fgram_model.zero_init_out': False}).fgram_model)


def test_post_training_sweep_accounting(tmp_path):
  """experiments/sweeps/post_training.py at paper scale: the 4B backbone on the accelerator
  in every arm, A_f = Qwen3-8B / 14B (GQA, head_dim 128) without their untied output heads
  plus the projection to the 4B's width, 10M rows."""
  sweep = spec.load_sweep('experiments/sweeps/post_training.py', str(tmp_path))
  arms = [arm_accounting.account(p.cfg) for p in sweep.points]
  for arm in arms:
    assert arm.backbone_params == pytest.approx(4.02e9, rel=0.01)
  assert arms[0].side_params == 0
  vocab, d_4b = 151_936, 2560
  for arm, released, d in zip(arms[1:], (8.19e9, 14.77e9), (4096, 5120)):
    assert arm.side_params == pytest.approx(released - vocab * d + d * d_4b, rel=0.005)
    assert arm.host_rows == 10_000_000
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('overrides', [
    {'fgram_model.d_model': 48, 'fgram_model.num_heads': 4},  # GPT-2: learned positions.
    {'model.family': 'olmo', 'fgram_model.d_model': 48, 'fgram_model.mlp_dim': 96},  # RoPE.
    {'fgram_model.zero_init_out': True, 'fgram_model.combine': 'add',
     'fgram_model.final_norm': 'same'},  # The backbone's width, a projection.
], ids=['gpt2', 'olmo', 'shared'])
def test_af_of_its_own_width_is_counted(overrides):
  """The accounting (model/flops.py) counts exactly A_f's parameters, its own token
  table, positions and projection included; A_f of its own width outputs the backbone's."""
  cfg = th.micro_config('/unused', **overrides)
  lm = SconeLM(cfg.model, cfg.fgram_model, cfg.fgram.max_len, 64, nnx.Rngs(0))
  have = sum(v.size for k, v in jax.tree_util.tree_flatten_with_path(
      nnx.state(lm, nnx.Param))[0] if jax.tree_util.keystr(k).startswith("['fgram_model']"))
  assert flops.param_counts(cfg, 64).fgram_total == have
  assert (lm.fgram_model.pos_table is None) == (cfg.model.family == 'olmo')
  tokens_UxK = jnp.array([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]], jnp.int32)
  e_UxD = lm.fgram_model(tokens_UxK, jnp.array([2, 3]))
  assert e_UxD.shape == (2, cfg.model.d_model) and np.all(np.isfinite(e_UxD))
