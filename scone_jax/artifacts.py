"""Artifacts on disk: atomic writes, manifests, checksums and fingerprints.

Every artifact (token shards, f-gram table, exported store, run outputs) is a directory
holding a `manifest.json`. It is built under a temporary sibling name and renamed into
place only when complete, so a reader never sees a half-written artifact as finished.
The manifest records what the artifact depends on (e.g. the tokenizer fingerprint) and a
sha256 and crc32c of each data file. `read_manifest(..., verify=True)` checks every file's
crc32c (~10 GB/s with the google-crc32c C extension, 6x sha256) on every open, up to
`OPEN_CRC32C_BYTES` per artifact, so flipped bytes are caught even when the file's size,
mtime and inode are unchanged; files past that budget are checked unless their size, mtime
and inode are those recorded when they last passed (`.verified.json` beside the manifest,
git's stat-cache idea): a resumed run does not re-read a multi-GB token file on every
restart. A manifest written before crc32c was recorded is checked by sha256 with the stat
cache alone. `verify='full'` always recomputes everything (sha256 and crc32c).

An artifact may live in an object store (gs://): it is then built in a local temp dir and
published by uploading its files with `manifest.json` LAST, after removing any old
manifest, so the manifest is the completion marker a reader requires (there is no
rename). There `verify=True` hashes files up to `REMOTE_VERIFY_BYTES` and checks the
sizes of larger ones (a multi-GB token file is not downloaded to every host at every
open; GCS checks crc32c on upload and download); `verify='full'` hashes everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

from absl import logging
import google_crc32c
import numpy as np

from scone_jax import paths
from scone_jax.errors import UserError

MANIFEST = 'manifest.json'
FORMAT_VERSION = 1
# Stat cache of files that passed their sha256 check (see the module docstring).
VERIFIED = '.verified.json'
# A file modified less than this long before it was checked is not cached: a same-size
# change within the file system's mtime granularity would keep its mtime ("racy git").
_RACY_SECONDS = 2.0
# verify=True on an object store hashes files up to this size (see the module docstring).
REMOTE_VERIFY_BYTES = 64 << 20
# verify=True checks the crc32c of this many bytes of an artifact's files on every open,
# stat cache or not; multi-GB token files rely on the stat cache past it. Measured: an
# S=10M f-gram table (355 MB) from the page cache takes 0.14-0.17 s on a 2-core box at
# load 12 (2.0-2.5 GB/s; its sha256 0.9 s); the C extension does 9.6 GB/s in memory.
OPEN_CRC32C_BYTES = 1 << 30
_CHUNK = 1 << 24
# Temporary names carry their writer ("<pid>@<host>") so that the next start can tell the
# leftovers of a killed stage (clean_stale_temps removes them) from a live writer's.
_OWNER = f'{os.getpid()}@{socket.gethostname()}'
_TEMP_NAME = re.compile(r'^\.(?:.*\.)?(?:tmp|old)-(?:(?P<pid>\d+)@(?P<host>[^/]+)-)?[^-]*$')
# A temp of unknown owner (another host, or named before owners were recorded) is removed
# only when older than this.
UNKNOWN_OWNER_STALE_SECONDS = 24 * 3600.0


class ArtifactError(UserError, RuntimeError):
  """An artifact is missing, incomplete, corrupted, or built from other inputs."""


def sha256_file(path: str, chunk: int = _CHUNK) -> str:
  return file_digests(path, sha256=True, crc32c=False, chunk=chunk).sha256


def crc32c_file(path: str) -> int:
  """The crc32c (Castagnoli) of a file's bytes, as an unsigned int."""
  return file_digests(path, sha256=False, crc32c=True).crc32c


@dataclasses.dataclass(frozen=True)
class Digests:
  sha256: str | None
  crc32c: int | None


def file_digests(path: str, sha256: bool = True, crc32c: bool = True,
                 chunk: int = _CHUNK) -> Digests:
  """The sha256 and/or crc32c of a file (local or URL), in one read."""
  sha = hashlib.sha256() if sha256 else None
  crc = 0
  for block in _blocks(path, chunk):
    if sha is not None:
      sha.update(block)
    if crc32c:
      crc = google_crc32c.extend(crc, block)
  return Digests(sha.hexdigest() if sha is not None else None, crc if crc32c else None)


def _blocks(path: str, chunk: int) -> Iterator[Any]:
  """A file's bytes in read-only blocks: slices of a memory map on local disk (no copies:
  ~1.5x faster than read() for crc32c), reads from an object store."""
  if not paths.is_remote(path) and os.path.getsize(path):
    mapped = np.memmap(path, np.uint8, mode='r')
    for start in range(0, mapped.size, chunk):
      yield mapped[start:start + chunk]
    return
  with paths.path(path).open('rb') as f:
    while block := f.read(chunk):
      yield block


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-serialisable parts (configs, other fingerprints)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _read_verified(directory: str) -> dict[str, Any]:
  """The stat cache of `directory` ({} if absent or unreadable: then files are hashed)."""
  try:
    with open(os.path.join(directory, VERIFIED)) as f:
      cache = json.load(f)
    return cache if isinstance(cache, dict) else {}
  except (OSError, ValueError):
    return {}


def write_json_atomic(path: str, obj: Any) -> None:
  if paths.is_remote(path):  # One PUT: the object appears whole or not at all.
    paths.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.tmp-{_OWNER}-', dir=directory)
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final_path: str, overwrite: bool = True) -> Iterator[str]:
  """Yields a temp dir next to `final_path`; renames it into place on success.

  On an exception the temp dir is removed and any existing artifact is left untouched.
  For an object-store `final_path` the temp dir is local and published by upload, the
  manifest last (see the module docstring).
  """
  if paths.is_remote(final_path):
    with _remote_atomic_dir(final_path, overwrite) as tmp:
      yield tmp
    return
  final_path = os.path.abspath(final_path)
  parent = os.path.dirname(final_path)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(final_path) and not overwrite:
    raise ArtifactError(f'{final_path} already exists; remove it or pick another path')
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(final_path)}.tmp-{_OWNER}-',
                         dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(final_path):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(final_path)}.old-{_OWNER}-',
                           dir=parent)
    os.rmdir(old)
    os.replace(final_path, old)
    os.replace(tmp, final_path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final_path)


@contextlib.contextmanager
def _remote_atomic_dir(final_path: str, overwrite: bool) -> Iterator[str]:
  if not overwrite and paths.exists(paths.join(final_path, MANIFEST)):
    raise ArtifactError(f'{final_path} already exists; remove it or pick another path')
  tmp = tempfile.mkdtemp(prefix='scone_jax-upload-')
  try:
    yield tmp
    publish(tmp, final_path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def publish(local_dir: str, final_path: str) -> None:
  """Uploads `local_dir` to `final_path` (an object-store prefix), manifest last.

  The old manifest goes first, so while the upload runs readers see an incomplete
  artifact (and say so), never a mix of old and new files passing as complete.
  """
  paths.remove(paths.join(final_path, MANIFEST))
  paths.rmtree(final_path)
  names = sorted(paths.walk_files(local_dir))
  for name in [n for n in names if n != MANIFEST] + [n for n in names if n == MANIFEST]:
    if name == VERIFIED:
      continue
    with open(os.path.join(local_dir, name), 'rb') as src, \
        paths.path(paths.join(final_path, name)).open('wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


def write_manifest(directory: str, kind: str, meta: dict[str, Any],
                   files: list[str] | None = None) -> dict[str, Any]:
  """Writes `manifest.json` with the sha256, crc32c and size of `files` (relative to
  directory)."""
  if files is None:
    files = sorted(f for f in os.listdir(directory) if f not in (MANIFEST, VERIFIED) and
                   os.path.isfile(os.path.join(directory, f)))
  entries = {}
  for f in files:
    digests = file_digests(paths.join(directory, f))
    entries[f] = {'sha256': digests.sha256, 'crc32c': digests.crc32c,
                  'bytes': paths.getsize(paths.join(directory, f))}
  manifest = {
      'kind': kind,
      'format_version': FORMAT_VERSION,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'files': entries,
      **meta,
  }
  write_json_atomic(paths.join(directory, MANIFEST), manifest)
  return manifest


def read_manifest(directory: str, kind: str, verify: bool | str = True,
                  expect: dict[str, Any] | None = None) -> dict[str, Any]:
  """Reads and checks a manifest; raises ArtifactError saying what is wrong and the fix.

  Args:
    directory: the artifact directory.
    kind: the expected artifact kind (e.g. 'fgram_table').
    verify: False checks sizes only; True also each file's crc32c up to
      OPEN_CRC32C_BYTES, and past that (or for a manifest without crc32c) its checksum
      unless unchanged (size, mtime, inode) since it last passed; 'full' recomputes
      every file's sha256 and crc32c.
    expect: manifest fields that must match (e.g. {'tokenizer_fingerprint': fp}).
  """
  if verify not in (False, True, 'full'):
    raise ValueError(f"verify={verify!r} must be False, True or 'full'")
  remote = paths.is_remote(directory)
  path = paths.join(directory, MANIFEST)
  if not remote and not os.path.isdir(directory):
    raise ArtifactError(f'{directory} does not exist (expected a {kind} artifact directory)')
  if not paths.exists(path):
    if remote and not paths.isdir(directory):
      raise ArtifactError(f'{directory} does not exist (expected a {kind} artifact '
                          'directory)')
    raise ArtifactError(f'{directory} has no {MANIFEST}: it is incomplete or not a {kind}; '
                        'rebuild it')
  try:
    manifest = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ArtifactError(f'{path} is corrupted ({e}); rebuild the {kind}') from e
  if manifest.get('kind') != kind:
    raise ArtifactError(f'{directory} holds a {manifest.get("kind")!r}, not a {kind!r}')
  if remote:
    _check_remote_files(directory, kind, manifest, verify)
  else:
    _check_local_files(directory, kind, manifest, verify)
  for key, want in (expect or {}).items():
    have = manifest.get(key)
    if have != want:
      raise ArtifactError(
          f'{kind} at {directory} was built with {key}={have!r} but this run has {want!r}; '
          f'rebuild the {kind} for these inputs (or point to the matching one)')
  return manifest


def _check_local_files(directory: str, kind: str, manifest: dict[str, Any],
                       verify: bool | str) -> None:
  verified = _read_verified(directory) if verify is True else {}
  passed = {}
  crc_budget = OPEN_CRC32C_BYTES
  for name, info in manifest.get('files', {}).items():
    fpath = os.path.join(directory, name)
    if not os.path.exists(fpath):
      raise ArtifactError(f'{kind} at {directory} is missing file {name}; rebuild it')
    if os.path.getsize(fpath) != info['bytes']:
      raise ArtifactError(f'{kind} file {fpath} has {os.path.getsize(fpath)} bytes, manifest '
                          f'says {info["bytes"]}: truncated or modified; rebuild it')
    if not verify:
      continue
    st = os.stat(fpath)
    entry = {'sha256': info['sha256'], 'stat': [st.st_size, st.st_mtime_ns, st.st_ino]}
    cached = verified.get(name) == entry
    # A file that passed its sha256 unchanged can still rot in place (same size, mtime and
    # inode): the cheap crc32c catches that on every open while the budget lasts.
    if 'crc32c' in info and (verify == 'full' or (cached and info['bytes'] <= crc_budget)):
      crc_budget -= info['bytes']
      if crc32c_file(fpath) != info['crc32c']:
        raise ArtifactError(f'{kind} file {fpath} fails its crc32c checksum: corrupted; '
                            'rebuild it')
    if cached:
      continue
    if sha256_file(fpath) != info['sha256']:
      raise ArtifactError(f'{kind} file {fpath} fails its sha256 checksum: corrupted; '
                          'rebuild it')
    if time.time() - st.st_mtime > _RACY_SECONDS:
      passed[name] = entry
  if passed:
    try:
      write_json_atomic(os.path.join(directory, VERIFIED), {**verified, **passed})
    except OSError:
      pass  # A read-only artifact is simply checked in full next time.


def _check_remote_files(directory: str, kind: str, manifest: dict[str, Any],
                        verify: bool | str) -> None:
  for name, info in manifest.get('files', {}).items():
    fpath = paths.join(directory, name)
    try:
      size = paths.getsize(fpath)
    except (OSError, FileNotFoundError) as e:
      raise ArtifactError(f'{kind} at {directory} is missing file {name}; rebuild it') from e
    if size != info['bytes']:
      raise ArtifactError(f'{kind} file {fpath} has {size} bytes, manifest says '
                          f'{info["bytes"]}: truncated or modified; rebuild it')
    if verify == 'full' or (verify and size <= REMOTE_VERIFY_BYTES):
      if sha256_file(fpath) != info['sha256']:
        raise ArtifactError(f'{kind} file {fpath} fails its sha256 checksum: corrupted; '
                            'rebuild it')


def _temp_is_stale(name: str, path: str) -> bool:
  m = _TEMP_NAME.match(name)
  if m is None:
    return False
  if m['pid'] is not None and m['host'] == socket.gethostname():
    pid = int(m['pid'])
    if pid == os.getpid():
      return False
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False
  try:
    return time.time() - os.path.getmtime(path) > UNKNOWN_OWNER_STALE_SECONDS
  except FileNotFoundError:
    return False


def clean_stale_temps(directory: str, max_depth: int = 3) -> list[str]:
  """Removes the temporary files and folders of `atomic_dir` / `write_json_atomic` left
  under `directory` (down to `max_depth` levels) by a stage that was killed; returns them.

  A temp whose writer is a dead process on this host goes at once; one of a live process
  stays; one of unknown owner goes when older than UNKNOWN_OWNER_STALE_SECONDS.
  """
  removed = []
  if not os.path.isdir(directory):
    return removed
  base_depth = directory.rstrip(os.sep).count(os.sep)
  for root, dirs, files in os.walk(directory):
    for name in list(dirs) + files:
      path = os.path.join(root, name)
      if _temp_is_stale(name, path):
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        removed.append(path)
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in removed and
               not d.startswith('.') and root.count(os.sep) - base_depth < max_depth - 1]
  if removed:
    logging.warning('removed %d temporary file(s)/folder(s) left by a killed stage: %s',
                    len(removed), ', '.join(removed))
  return removed
