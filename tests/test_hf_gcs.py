"""model.init_from=gs://bucket/dir against the local GCS emulator (tests/gcs_emulator.py): a
sharded checkpoint with its index loads bit for bit, every request for a .safetensors
object is a byte range (its header, or rows inside one tensor) and each tensor's bytes
are fetched once; a missing shard is refused naming it. export_hf copies a store from a
run in the bucket."""

from __future__ import annotations

import os

import gcsfs
import numpy as np
import pytest

from gcs_emulator import gcs  # noqa: F401  (the fixture)
from scone_jax import artifacts, export_hf, paths
from scone_jax.config import MeshConfig
from scone_jax.export import STORE_KIND
from scone_jax.hf import load as hf_load
from scone_jax.hf.safetensors import CheckpointError, read_header
from test_hf_load import expected, load, write_checkpoint


def _upload(local: str, remote: str, skip: str = '') -> None:
  for name in os.listdir(local):
    if name != skip:
      with open(os.path.join(local, name), 'rb') as f:
        paths.write_bytes(paths.join(remote, name), f.read())


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('qwen3_sharded'))
  return directory, write_checkpoint(directory, shards=3)


def test_sharded_checkpoint_loads_from_the_bucket_by_byte_range(gcs, local, monkeypatch):
  directory, tensors = local
  remote = f'{gcs}/hf/qwen3_sharded'
  _upload(directory, remote)
  requests = []
  original = gcsfs.GCSFileSystem._cat_file_sequential

  async def spy(self, path, start=None, end=None, **kwargs):
    requests.append((path.rsplit('/', 1)[-1], start, end))
    return await original(self, path, start=start, end=end, **kwargs)
  monkeypatch.setattr(gcsfs.GCSFileSystem, '_cat_file_sequential', spy)

  cfg, params = load(remote, MeshConfig(data=2, fsdp=2, tensor=2))
  assert cfg.model.init_from == remote
  want = expected(cfg, tensors)
  for name, array in params.items():
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data).view(np.uint16),
                                    want[name][shard.index].view(np.uint16), err_msg=name)

  spans = {}  # file -> [(start, end)] of its tensors' bytes.
  for file in sorted(f for f in os.listdir(directory) if f.endswith('.safetensors')):
    infos = read_header(os.path.join(directory, file)).values()
    spans[file] = sorted((i.start, i.end) for i in infos)
  data = 0
  for file, start, end in requests:
    if file not in spans:
      continue
    assert start is not None and end is not None, f'{file} fetched whole'
    if start < spans[file][0][0]:  # The header: its length, then its JSON.
      assert (start, end) == (0, 8) or start == 8, (file, start, end)
      continue
    assert any(a <= start and end <= b for a, b in spans[file]), (file, start, end)
    data += end - start
  assert data == sum(t.nbytes for t in tensors.values())  # Each byte once.


def test_a_missing_shard_in_the_bucket_is_refused(gcs, local):
  directory, _ = local
  missing = 'model-00002-of-00003.safetensors'
  remote = f'{gcs}/hf/qwen3_missing_shard'
  _upload(directory, remote, skip=missing)
  with pytest.raises(CheckpointError, match=f'"weight_map" names {missing}, which is missing '
                     f'from {remote}'):
    hf_load.open_tensors(remote)


def test_a_store_in_the_bucket_is_copied_by_its_manifest(gcs, tmp_path):
  """export_hf's store copy from a run in a bucket (no links there): every file the
  manifest lists, then the manifest, equal to the source."""
  local = str(tmp_path / 'export')
  os.makedirs(os.path.join(local, 'c', '0'))
  for name, data in (('zarr.json', b'{}'), ('c/0/0', os.urandom(3000))):
    with open(os.path.join(local, name), 'wb') as f:
      f.write(data)
  want = artifacts.write_manifest(local, STORE_KIND, {'num_rows': 3},
                                  files=['zarr.json', 'c/0/0'])
  remote = f'{gcs}/runs/scone/export'
  for name in ('zarr.json', 'c/0/0', 'manifest.json'):
    with open(os.path.join(local, name), 'rb') as f:
      paths.write_bytes(paths.join(remote, name), f.read())
  dst = str(tmp_path / 'hf' / 'fgram_store')
  export_hf.copy_store(remote, dst)
  assert artifacts.read_manifest(dst, STORE_KIND, verify='full') == want
