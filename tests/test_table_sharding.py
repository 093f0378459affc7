"""kind='table' on a mesh: its [P, D] rows (and AdamW moments) are split over the mesh axes
that divide P, a split that leaves a factor replicated is logged, and a table that cannot
fit the devices' declared memory fails before any param exists, naming bytes and a mesh."""

import logging
import time

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from phrase_fixtures import K, V, table  # noqa: F401  (the table fixture)
from scone_jax import compat, config
from scone_jax.model import arm_accounting, logical_to_spec, trained_table
from scone_jax.train import step as step_lib
from test_combine_table import D, _cfg
from test_decode import ONE_DEVICE


# P x D x 4 bytes x 4 copies = 1024 x 32 x 16 = 524,288 bytes; 100,000 per device needs a
# split of 6 or more: fsdp=8 (65,536 per device) fits, the data-only mesh does not.
_DECLARED = {'train.device_memory_bytes': 100_000}


def _rows(state):
  return state.params['fgram_model']['rows'][...]


@pytest.fixture(scope='module')
def fsdp8(table):
  cfg = config.replace(_cfg('table'), **_DECLARED)
  return step_lib.create_train_state(cfg, compat.make_mesh((1, 8, 1)), V, K, table)[1]


def test_fsdp_8_splits_rows_and_moments_eight_ways(fsdp8, table):
  rows = _rows(fsdp8)
  assert rows.shape == (trained_table.padded_rows(len(table)), D)
  assert {s.data.shape for s in rows.addressable_shards} == {(rows.shape[0] // 8, D)}
  assert len({s.device for s in rows.addressable_shards}) == 8
  # AdamW's moments follow the rows: the optimizer state is split the same way.
  moments = [x for x in jax.tree.leaves(fsdp8.opt_state) if x.shape == rows.shape]
  assert len(moments) == 2 and all(m.sharding == rows.sharding for m in moments)


def test_a_product_that_does_not_divide_p_shards_over_the_axes_that_do(table, caplog):
  # fsdp=3 does not divide P = 1024: the rows split over tensor=2 only, which is logged,
  # and the values are the one-device init's.
  assert trained_table.padded_rows(len(table)) == 1024
  mesh = compat.make_mesh((1, 3, 2), devices=jax.devices()[:6])
  with caplog.at_level(logging.WARNING):
    _, state, _ = step_lib.create_train_state(_cfg('table'), mesh, V, K, table)
  rows = _rows(state)
  assert rows.sharding.spec[0] == 'tensor'
  assert any("('fgram_rows', 'embed') (1024, 32)" in r.getMessage() and
             'each device holds 3x its share' in r.getMessage() for r in caplog.records)
  _, one, _ = step_lib.create_train_state(_cfg('table'), ONE_DEVICE, V, K, table)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(_rows(one)))
  # A padded P that fsdp x tensor divides splits over both; the largest product wins
  # (parameters only: an activation keeps all-or-nothing).
  names = ('fgram_rows', 'embed')
  assert logical_to_spec(names, (1023, D), mesh) == P(None, None)
  assert logical_to_spec(names, (3072, D), mesh, partial=True) == P(('fsdp', 'tensor'), None)
  assert logical_to_spec(names, (1023, D), mesh, partial=True) == P('fsdp', None)
  assert logical_to_spec(names, (1025, D), mesh, partial=True) == P(None, None)


def test_a_table_too_large_for_the_devices_fails_fast_naming_bytes_and_mesh(fsdp8, table):
  cfg = config.replace(_cfg('table'), **_DECLARED)
  started = time.perf_counter()
  with pytest.raises(arm_accounting.TableMemoryError,
                     match=r"kind='table': the \[1,024, 32\] float32 rows .* need 524,288 "
                           r'bytes, 524,288 per device split 1 ways .* 100,000 bytes '
                           r'\(config.train.device_memory_bytes\). To fit, set '
                           r'--config.mesh.fsdp=8 .*65,536 bytes per device'):
    step_lib.create_train_state(cfg, compat.make_mesh((8, 1, 1)), V, K, table)
  assert time.perf_counter() - started < 5
  # What the message proposes was built under the same declared memory (the fixture).
  assert _rows(fsdp8).sharding.shard_shape(_rows(fsdp8).shape)[0] == 1024 // 8
  tight = config.replace(cfg, **{'train.device_memory_bytes': 50_000})
  with pytest.raises(arm_accounting.TableMemoryError,
                     match='no mesh of these 8 devices fits it: it needs at least 11 devices'):
    step_lib.create_train_state(tight, compat.make_mesh((1, 8, 1)), V, K, table)
