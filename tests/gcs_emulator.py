"""A local GCS emulator for the tests: `gcs` fixture -> 'gs://<bucket>' served on localhost.

`gcp-storage-emulator` (requirements-dev.txt) serves the GCS JSON API in memory on a free
port. The environment the clients read is set before the first gs:// access and is
inherited by CLI subprocesses:
  STORAGE_EMULATOR_HOST    gcsfs (under etils.epath) and google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL tensorstore's gcs kvstore (orbax checkpoints, the export store)
  GCE_METADATA_ROOT        an invalid host, so no client waits on GCE metadata credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs otherwise probes the bucket type over
                           gRPC first, which the emulator does not serve (~60 s timeout)
  FSSPEC_GS_TOKEN=anon     gcsfs uses no credentials
No real credentials or network are used. The same variables point a shell at an emulator
(README, "Buckets").

`LAUNCHER` runs the emulator with two gaps to real GCS closed, both of which tensorstore
relies on: object downloads carry the `x-goog-generation` header (OCDBT, orbax's checkpoint
format, fails with "Malformed StorageGeneration" without it), and object listings honour
`startOffset`/`endOffset` (tensorstore lists and deletes key ranges with them; ignored, a
`delete_existing` open of one store would delete the whole bucket).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = 'scone-test'

# Runs the emulator with downloads carrying x-goog-generation, as GCS's do (see above).
LAUNCHER = """
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
        response['x-goog-generation'] = str(obj['generation'])
        response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    except Exception:  # Missing object: the original handler answers 404.
        pass
    return _download(request, response, storage, *args, **kwargs)
objects.download = download
_ls = objects.ls
def ls(request, response, storage, *args, **kwargs):
    start = (request.query.get('startOffset') or [None])[0]
    end = (request.query.get('endOffset') or [None])[0]
    if start is not None or end is not None:
        reply = response.json
        def in_range(listing):
            items = [i for i in listing.get('items', []) if
                     (start is None or i['name'] >= start) and (end is None or i['name'] < end)]
            reply({**listing, 'items': items})
        response.json = in_range
    return _ls(request, response, storage, *args, **kwargs)
objects.ls = ls  # Both patches precede the server module, which builds the routing table.
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def emulator_env(url: str) -> dict[str, str]:
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GCE_METADATA_ROOT': 'metadata.google.internal.invalid',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'FSSPEC_GS_TOKEN': 'anon'}


@pytest.fixture(scope='session')
def gcs():
  """Starts the emulator for the session; yields 'gs://BUCKET'. Stops it at the end."""
  pytest.importorskip('gcp_storage_emulator')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  proc = subprocess.Popen(
      [sys.executable, '-c', LAUNCHER, 'start', f'--port={port}',
       f'--default-bucket={BUCKET}', '--in-memory'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=1)
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f'the GCS emulator did not start on {url}')
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in emulator_env(url)}
  os.environ.update(emulator_env(url))
  try:
    yield f'gs://{BUCKET}'
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


if __name__ == '__main__':
  # python tests/gcs_emulator.py start --port=9023 --default-bucket=BUCKET --in-memory
  exec(compile(LAUNCHER, 'gcs_emulator.LAUNCHER', 'exec'))  # pylint: disable=exec-used
