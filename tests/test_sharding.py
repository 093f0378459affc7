"""Sharding table tests on 8 fake CPU devices, mesh (data=2, fsdp=2, tensor=2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scone_jax import compat
from scone_jax.model import SconeLM, create_sharded, logical_to_spec, model_shardings
from test_model import K, V, _scone_batch, tiny_cfg


@pytest.fixture(scope='module')
def mesh():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices: run under tests/conftest.py')
  return compat.make_mesh((2, 2, 2))


def test_logical_to_spec_rules():
  assert logical_to_spec(('vocab', 'embed')) == P('tensor', 'fsdp')
  # batch takes fsdp first, so embed is replicated in activations (one use per mesh axis).
  assert logical_to_spec(('batch', 'length', 'embed')) == P(('data', 'fsdp'), None, None)
  assert logical_to_spec(('layers', 'embed', 'heads', 'kv')) == P(None, 'fsdp', 'tensor', None)
  assert logical_to_spec((None, 'mlp')) == P(None, 'tensor')
  with pytest.raises(ValueError, match='unknown logical axis'):
    logical_to_spec(('vocabulary',))


def test_logical_to_spec_drops_what_the_mesh_cannot_hold(mesh):
  # 61 rows do not split over tensor=2: replicated rather than an invalid sharding.
  assert logical_to_spec(('vocab', 'embed'), (61, 32), mesh) == P(None, 'fsdp')
  small = compat.make_mesh((2, 2), ('data', 'fsdp'), devices=jax.devices()[:4])
  assert logical_to_spec(('embed', 'mlp'), (32, 128), small) == P('fsdp', None)
  with pytest.raises(ValueError, match='one name per dimension'):
    logical_to_spec(('embed',), (3, 4), mesh)


def test_params_born_sharded_and_forward_matches_one_device(mesh):
  cfg = tiny_cfg('gpt2', tied_embeddings=False)
  batch = _scone_batch(np.random.default_rng(0))[2]
  batch = {k: jnp.concatenate([v, v]) if k.endswith('BxT') else v for k, v in batch.items()}
  ref_lm = SconeLM(cfg.model, cfg.fgram_model, K, V, nnx.Rngs(0))
  ref = np.asarray(ref_lm(batch))

  lm = create_sharded(lambda: SconeLM(cfg.model, cfg.fgram_model, K, V, nnx.Rngs(0)), mesh)
  bb = lm.backbone
  assert bb.blocks.wq[...].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert bb.blocks.w_out[...].sharding.spec == P(None, 'tensor', 'fsdp')
  assert bb.head[...].sharding.spec == P('fsdp', None)  # V=61 is odd: vocab replicated
  assert lm.fgram_model.pos_table[...].sharding.spec == P(None, 'fsdp')
  shard_shape = bb.blocks.w_in[...].addressable_shards[0].data.shape
  assert shard_shape == (2, 16, 64)  # [L, D/fsdp, F/tensor]
  # A_f shares the backbone's table object: one array, not a copy.
  assert lm.fgram_model.token_embed is bb.token_embed

  graphdef, state = nnx.split(lm)
  with compat.set_mesh(mesh):
    batch_sharding = NamedSharding(mesh, P(('data', 'fsdp')))
    sharded_batch = {k: jax.device_put(v, batch_sharding) if k.endswith('BxT') else v
                     for k, v in batch.items()}
    out = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, sharded_batch)
  # Reductions are split differently across devices: fp32 rounding only.
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_model_shardings_tree_matches_state(mesh):
  cfg = tiny_cfg('olmo', af_layers=0)
  _, state = nnx.split(nnx.eval_shape(lambda: SconeLM(cfg.model, cfg.fgram_model, K, 64,
                                                      nnx.Rngs(0))))
  shardings = model_shardings(state, mesh)
  table = shardings['backbone']['token_embed']['table'].get_value()
  assert isinstance(table, NamedSharding) and table.spec == P('tensor', 'fsdp')
  leaves = jax.tree.leaves(shardings)
  assert len(leaves) == len(jax.tree.leaves(state))
