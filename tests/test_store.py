"""EmbeddingStore and the zarr3 writer: round trips, foreign readers, resume, bad input."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from scone_jax import artifacts
from scone_jax.export import format as store_format
from scone_jax.export import writer
from scone_jax.serve import EmbeddingStore

S, D = 1000, 8


def _rows(start, stop):
  # A deterministic function of the row index so any slice can be checked.
  r = np.arange(start, stop, dtype=np.float32)[:, None]
  return np.sin(r * 0.37 + np.arange(D, dtype=np.float32)[None] * 1.3) * (1 + r / S)


def _write(path, dtype='float32', chunk_rows=256, inner_rows=16, meta=None, fn=_rows):
  return writer.write_store(str(path), S, D, dtype, chunk_rows, fn,
                            meta or {'checkpoint_step': 7, 'table_fingerprint': 'tab'},
                            inner_rows=inner_rows, progress=False)


@pytest.mark.parametrize('dtype', ['float32', 'float16', 'bfloat16'])
@pytest.mark.parametrize('tier,reader', [('ram', 'auto'), ('disk', 'memmap'),
                                         ('disk', 'tensorstore')])
def test_gather_matches_numpy_reference(tmp_path, dtype, tier, reader):
  path = _write(tmp_path / 'export', dtype)
  store = EmbeddingStore.open(path, tier, expect={'checkpoint_step': 7},
                              disk_reader=reader, verify=True)
  assert store.reader == {'ram': 'numpy'}.get(tier, reader)
  want_SxD = _rows(0, S).astype(store_format.DTYPES[dtype])
  rows_N = np.array([0, -1, 999, 255, 256, 3, 3, -1, 511, 767, 768])
  got_NxD = store.gather(rows_N)
  assert got_NxD.dtype == store_format.DTYPES[dtype]
  ref_NxD = np.stack([want_SxD[r] if r >= 0 else np.zeros(D, want_SxD.dtype)
                      for r in rows_N])
  np.testing.assert_array_equal(got_NxD.astype(np.float32), ref_NxD.astype(np.float32))
  assert store.gather(np.array([-1, -1])).any() == 0
  assert store.gather(np.zeros(0, np.int64)).shape == (0, D)
  assert (store.num_rows, store.d_model) == (S, D)
  assert store.nbytes == S * D * store_format.DTYPES[dtype].itemsize
  assert store.stats.calls == 3 and store.stats.rows == len(rows_N) + 2
  assert store.stats.hits == 9 and store.stats.bytes > 0
  with pytest.raises(IndexError, match='different f-gram tables'):
    store.gather(np.array([S]))


def test_ram_gather_every_id_array_kind(tmp_path):
  """The RAM tier's gather calls its compiled kernel directly for C-ordered int64 ids and
  through numba's dispatcher for anything else: both give the reference rows and stats."""
  store = EmbeddingStore.open(_write(tmp_path / 'export', 'bfloat16'), 'ram')
  want_SxD = _rows(0, S).astype(ml_dtypes.bfloat16)
  ids = np.array([5, -1, 999, 0, 17, 17, 640, -1], np.int64)
  readonly = ids.copy()
  readonly.flags.writeable = False
  kinds = [ids, ids.astype(np.int32), ids[ids >= 0].astype(np.uint32), ids[::2],
           np.repeat(ids, 2)[::2], readonly, ids.tolist()]
  for rows in kinds:
    rows_N = np.asarray(rows)
    ref = np.stack([want_SxD[r] if r >= 0 else np.zeros(D, want_SxD.dtype) for r in rows_N])
    got = store.gather(rows)
    assert got.dtype == want_SxD.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))
  assert store.stats.calls == len(kinds)
  assert store.stats.rows == sum(len(k) for k in kinds)
  assert store.stats.hits == sum(int((np.asarray(k) >= 0).sum()) for k in kinds)
  for bad in (np.array([3, S], np.int64), np.array([3, -2], np.int64),
              np.array([3, S], np.int32)):
    with pytest.raises(IndexError, match='index 1'):
      store.gather(bad)
  assert store.stats.calls == len(kinds)  # A refused gather is not counted.
  with pytest.raises(ValueError, match='1-D integer'):
    store.gather(np.zeros((2, 2), np.int64))


def test_plain_tensorstore_reads_the_store(tmp_path):
  path = _write(tmp_path / 'export', 'bfloat16')
  arr = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path}}).result()
  assert arr.dtype.numpy_dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(arr.read().result(),
                                _rows(0, S).astype(ml_dtypes.bfloat16))


def _register_zarr_bfloat16():
  """zarr-python 3.1 has no built-in bfloat16 (a zarr3 extension type); a user adds it so."""
  import dataclasses
  from zarr.core.dtype import Float16, data_type_registry

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class BFloat16(Float16):
    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = 'bfloat16'
    _zarr_v2_names = ()

    def to_native_dtype(self):
      return np.dtype(ml_dtypes.bfloat16)

    @classmethod
    def _check_native_dtype(cls, dtype):
      return dtype == np.dtype(ml_dtypes.bfloat16)

  data_type_registry.register('bfloat16', BFloat16)


@pytest.mark.parametrize('dtype', ['float32', 'float16', 'bfloat16'])
def test_zarr_python_reads_the_store(tmp_path, dtype):
  zarr = pytest.importorskip('zarr')
  if dtype == 'bfloat16':
    _register_zarr_bfloat16()
  path = _write(tmp_path / 'export', dtype)
  z = zarr.open_array(path, mode='r')
  assert z.shape == (S, D)
  np.testing.assert_array_equal(np.asarray(z[:]),
                                _rows(0, S).astype(store_format.DTYPES[dtype]))


def test_resume_skips_done_shards_and_result_is_identical(tmp_path):
  out = tmp_path / 'export'
  calls = []

  def dies_at_third_shard(start, stop):
    if len(calls) == 2:
      raise KeyboardInterrupt('simulated kill')
    calls.append(start)
    return _rows(start, stop)

  with pytest.raises(KeyboardInterrupt):
    _write(out, fn=dies_at_third_shard)
  assert not out.exists() and (tmp_path / 'export.partial').is_dir()
  resumed = []

  def counting(start, stop):
    resumed.append(start)
    return _rows(start, stop)

  _write(out, fn=counting)
  assert resumed == [512, 768]  # Shards 0 and 1 were done before the kill.
  assert not (tmp_path / 'export.partial').exists()
  assert not (tmp_path / 'export.partial.done').exists()
  store = EmbeddingStore.open(str(out), 'ram', verify=True)
  np.testing.assert_array_equal(store.gather(np.arange(S)), _rows(0, S))


def test_non_finite_shard_fails_keeps_the_old_store_and_resumes(tmp_path):
  """A NaN in the third shard fails the write naming its row; the complete store already at
  out stays byte-identical (the new rows go to the partial write), and a rerun with finite
  rows resumes after the two good shards."""
  out = tmp_path / 'export'
  _write(out, meta={'checkpoint_step': 6})
  old = {p: p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()}

  def nan_at_row_600(start, stop):
    rows = _rows(start, stop)
    if start <= 600 < stop:
      rows[600 - start, 3] = np.nan
    return rows

  with pytest.raises(ValueError, match=r'store row 600 is not finite .* checkpoint step 7'):
    _write(out, fn=nan_at_row_600)
  assert {p: p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()} == old
  resumed = []
  _write(out, fn=lambda a, b: resumed.append(a) or _rows(a, b))
  assert resumed == [512, 768]
  store = EmbeddingStore.open(str(out), 'ram', verify=True, expect={'checkpoint_step': 7})
  np.testing.assert_array_equal(store.gather(np.arange(S)), _rows(0, S))


def test_partial_from_another_plan_is_discarded(tmp_path):
  out = tmp_path / 'export'
  with pytest.raises(KeyboardInterrupt):
    def dies(start, stop):
      if start:
        raise KeyboardInterrupt
      return _rows(start, stop)
    _write(out, fn=dies, meta={'checkpoint_step': 1})
  seen = []
  _write(out, fn=lambda a, b: seen.append(a) or _rows(a, b), meta={'checkpoint_step': 2})
  assert seen == [0, 256, 512, 768]


def test_zero_rows_keep_the_memmap_layout(tmp_path):
  path = _write(tmp_path / 'export', fn=lambda a, b: np.zeros((b - a, D), np.float32))
  store = EmbeddingStore.open(path, 'disk', disk_reader='memmap')
  assert not store.gather(np.array([0, 999])).any()


def test_fingerprint_mismatch_is_a_clear_error(tmp_path):
  path = _write(tmp_path / 'export')
  with pytest.raises(artifacts.ArtifactError, match='table_fingerprint'):
    EmbeddingStore.open(path, 'ram', expect={'table_fingerprint': 'other'})
  with pytest.raises(artifacts.ArtifactError, match='checkpoint_step'):
    EmbeddingStore.open(path, 'disk', expect={'checkpoint_step': 8})
  with pytest.raises(artifacts.ArtifactError, match='dtype'):
    EmbeddingStore.open(path, 'ram', expect={'dtype': 'bfloat16'})


@pytest.mark.parametrize('tier', ['ram', 'disk'])
def test_truncated_store_is_a_clear_error(tmp_path, tier):
  path = _write(tmp_path / 'export')
  shard = os.path.join(path, store_format.shard_file(1))
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(artifacts.ArtifactError, match='truncated'):
    EmbeddingStore.open(path, tier)
  os.remove(shard)
  with pytest.raises(artifacts.ArtifactError, match='missing file c/1/0'):
    EmbeddingStore.open(path, tier)


def _edit_json(path, key, value):
  with open(path) as f:
    obj = json.load(f)
  obj[key] = value
  with open(path, 'w') as f:
    json.dump(obj, f)


def test_wrong_dtype_in_metadata_is_a_clear_error(tmp_path):
  path = _write(tmp_path / 'export', 'float16')
  _edit_json(os.path.join(path, 'zarr.json'), 'data_type', 'float32')
  with pytest.raises(artifacts.ArtifactError, match='zarr.json .* truncated or modified'):
    EmbeddingStore.open(path, 'ram')
  # A manifest claiming another dtype than the zarr3 metadata.
  _write(tmp_path / 'export', 'float16')
  _edit_json(os.path.join(path, 'manifest.json'), 'dtype', 'bfloat16')
  with pytest.raises(artifacts.ArtifactError, match='modified after export'):
    EmbeddingStore.open(path, 'ram')


def test_missing_store_tells_how_to_export(tmp_path):
  with pytest.raises(artifacts.ArtifactError, match='python -m scone_jax.export'):
    EmbeddingStore.open(str(tmp_path / 'nope'), 'ram')
  with pytest.raises(ValueError, match="'ram' or 'disk'"):
    EmbeddingStore.open(str(tmp_path), 'gpu')


def _flip_byte(path, shard, offset):
  shard = os.path.join(path, store_format.shard_file(shard))
  with open(shard, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def test_flipped_byte_fails_ram_open_and_disk_first_read(tmp_path):
  path = _write(tmp_path / 'export')
  _flip_byte(path, 1, 40)  # A row byte of shard 1 (rows 256..511); sizes still match.
  with pytest.raises(artifacts.ArtifactError, match=r'c/1/0 \(rows 256..511\) fails its '
                     'checksum'):
    EmbeddingStore.open(path, 'ram')
  store = EmbeddingStore.open(path, 'disk', disk_reader='memmap')  # Opens: nothing read.
  np.testing.assert_array_equal(store.gather(np.array([0, 255, 600])),
                                _rows(0, S)[[0, 255, 600]])  # Other shards are fine.
  for _ in range(2):  # Not marked checked after a failure: every read of it fails.
    with pytest.raises(artifacts.ArtifactError, match='c/1/0 .* fails its checksum'):
      store.gather(np.array([3, 300]))
  with pytest.raises(artifacts.ArtifactError, match='c/1/0 .* fails its checksum'):
    EmbeddingStore.open(path, 'disk', shard_checks='open')
  ts_store = EmbeddingStore.open(path, 'disk', disk_reader='tensorstore')
  with pytest.raises(artifacts.ArtifactError, match='c/1/0 .* fails its checksum'):
    ts_store.gather(np.array([300]))
  # Checks off: the corrupted bytes are served (what the checks exist to prevent).
  unchecked = EmbeddingStore.open(path, 'ram', shard_checks='off')
  assert not np.array_equal(unchecked.gather(np.array([256, 257])), _rows(256, 258))
  with pytest.raises(artifacts.ArtifactError, match='sha256 checksum'):
    EmbeddingStore.open(path, 'ram', verify=True)


def test_flipped_shard_index_is_named_on_open(tmp_path):
  path = _write(tmp_path / 'export')
  shard = os.path.join(path, store_format.shard_file(1))
  _flip_byte(path, 1, os.path.getsize(shard) - 12)  # Inside the index, before its crc.
  for tier in ('ram', 'disk'):
    with pytest.raises(artifacts.ArtifactError, match=r'c/1/0 \(rows 256..511\) has a '
                       r'corrupted shard index .* `python -m scone_jax.export`'):
      EmbeddingStore.open(path, tier)


def test_tiers_return_identical_rows(tmp_path):
  path = _write(tmp_path / 'export', 'bfloat16', chunk_rows=128, inner_rows=16)
  rng = np.random.default_rng(0)
  ram = EmbeddingStore.open(path, 'ram', load_workers=3)
  disks = [EmbeddingStore.open(path, 'disk', disk_reader=r, shard_checks=c)
           for r, c in (('memmap', 'first_touch'), ('memmap', 'open'), ('tensorstore', 'off'))]
  ref_SxD = _rows(0, S).astype(ml_dtypes.bfloat16)
  assert ram.raw_rows.shape == (S + 1, D) and not ram.raw_rows[S].any()
  for n in (1, 16, 300):
    rows = rng.integers(-1, S, n)
    want = np.where(rows[:, None] >= 0, ref_SxD[rows], 0).astype(ml_dtypes.bfloat16)
    for store in [ram] + disks:
      store.prefetch(rows)
      got = store.gather(rows)
      assert got.dtype == ml_dtypes.bfloat16 and got.flags.c_contiguous
      np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
      slab = np.zeros((n, D + 1), ml_dtypes.bfloat16)
      store.gather(rows, out=slab[:, :D])  # A strided out= (the decoder's slab).
      np.testing.assert_array_equal(slab[:, :D].view(np.uint16), want.view(np.uint16))
