"""Checkpoint steps on disk: which are committed, and whether their bytes are intact.

Orbax detects a truncated or missing file but not flipped bytes: a checkpoint with bit rot
restores as NaN weights without an error. So once a step is committed, process 0 records
the size and crc32c (~10 GB/s) of every file under `W/checkpoints/<step>/` in
`<step>/checksums.json` (written atomically), and every restore checks them first.

Process 0 hashes all of the step's files, rather than each process the files it wrote:
which files a process writes (orbax's ocdbt.process_<i>/ folders, the shared _METADATA,
grain's per-process JSON) is orbax's and grain's internal layout, which changes between
versions; all processes already share the checkpoint directory (orbax requires it), and
hashing after the commit needs no extra barrier (the commit is the barrier). The cost is
one read of the step by one host, in a background thread (train/checkpoint.py), at
crc32c's speed (2-2.5 GB/s from the page cache on a loaded 2-core box; 9.6 GB/s in memory).
Every restore reads the step once more to check it (its files are then in the page cache).

A step saved before checksums were recorded (no checksums.json) is 'unverified': it is
accepted, with a warning, so older runs keep working.

Listing steps needs no orbax CheckpointManager (a read-only one logs "Given directory is
read only" on every open): a committed step is a directory named by its integer alone
(orbax writes `<step>.orbax-checkpoint-tmp-<time>` and renames it when committed; a step
moved aside is `<step>.corrupt-<time>`), and in an object store (no rename) one holding
orbax's `commit_success.txt`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax
import jax.numpy as jnp

from scone_jax import artifacts, paths
from scone_jax.errors import UserError

CHECKSUMS_FILE = 'checksums.json'
COMMIT_FILE = 'commit_success.txt'  # orbax's completion marker where it cannot rename.
_FORMAT_VERSION = 1

Status = Literal['intact', 'unverified', 'corrupt']


class CheckpointCorruptError(UserError, RuntimeError):
  """A checkpoint step's files fail their checksums, or its weights are not finite."""


@dataclasses.dataclass(frozen=True)
class StepCheck:
  """The verdict on one step: 'intact', 'unverified' (no checksums: an older version
  saved it) or 'corrupt'; `detail` says what is wrong (or why it is unverified)."""
  step: int
  status: Status
  detail: str = ''


def step_dir(directory: str, step: int) -> str:
  return paths.join(directory, str(int(step)))


def committed_steps(directory: str) -> list[int]:
  """The committed steps under a checkpoints directory, oldest first."""
  if not paths.isdir(directory):
    return []
  remote = paths.is_remote(directory)
  steps = []
  for entry in paths.path(directory).iterdir():
    if not entry.name.isdigit() or not entry.is_dir():
      continue
    if remote and not paths.exists(paths.join(directory, entry.name, COMMIT_FILE)):
      continue  # An upload in progress, or a killed one.
    steps.append(int(entry.name))
  return sorted(steps)


def write_checksums(directory: str, step: int) -> dict[str, Any]:
  """Records the size and crc32c of every file of committed `step` (call on process 0
  only, after the commit); returns the record."""
  root = step_dir(directory, step)
  files = {}
  for name in sorted(paths.walk_files(root)):
    if not _recorded(name):
      continue
    fpath = paths.join(root, name)
    files[name] = {'bytes': paths.getsize(fpath), 'crc32c': artifacts.crc32c_file(fpath)}
  record = {'format_version': _FORMAT_VERSION, 'step': int(step), 'files': files}
  artifacts.write_json_atomic(paths.join(root, CHECKSUMS_FILE), record)
  return record


def _recorded(name: str) -> bool:
  """Whether a file of a step has its checksum recorded: not our own record or its temp,
  and not orbax's commit markers (their text names the path, so a step copied elsewhere,
  e.g. into a bucket, gets new ones)."""
  base = name.rsplit('/', 1)[-1]
  return name != CHECKSUMS_FILE and base != COMMIT_FILE and not base.startswith('.tmp-')


def check_step(directory: str, step: int) -> StepCheck:
  """Checks the files of `step` against its checksums.json (reads every byte)."""
  root = step_dir(directory, step)
  record_path = paths.join(root, CHECKSUMS_FILE)
  if not paths.exists(record_path):
    return StepCheck(step, 'unverified', f'no {CHECKSUMS_FILE}: saved by an older version')
  try:
    files = json.loads(paths.read_text(record_path))['files']
  except (ValueError, KeyError, TypeError) as e:
    return StepCheck(step, 'corrupt', f'{CHECKSUMS_FILE} is unreadable ({e})')
  bad = []
  for name, info in sorted(files.items()):
    if not _recorded(name):
      continue
    fpath = paths.join(root, name)
    if not paths.exists(fpath):
      bad.append(f'{name} is missing')
    elif (size := paths.getsize(fpath)) != info['bytes']:
      bad.append(f'{name} has {size} bytes, {info["bytes"]} were saved')
    elif artifacts.crc32c_file(fpath) != info['crc32c']:
      bad.append(f'{name} fails its crc32c (flipped bytes)')
  if bad:
    more = f' (and {len(bad) - 1} more file(s))' if len(bad) > 1 else ''
    return StepCheck(step, 'corrupt', bad[0] + more)
  return StepCheck(step, 'intact')


def raise_if_corrupt(directory: str, check: StepCheck, intact: int | None = None) -> None:
  """Raises CheckpointCorruptError naming the step, what is wrong and the fix, if `check`
  says corrupt; `intact`: the newest intact step, if the caller knows it."""
  if check.status != 'corrupt':
    return
  older = (f'; step {intact} is the newest intact one (`python -m scone_jax.evaluate '
           f'--step={intact}` evaluates it; training resumes from it)' if intact is not None
           else '')
  raise CheckpointCorruptError(
      f'checkpoint step {check.step} in {directory} is corrupt: {check.detail}. Check the '
      f'run with `python -m scone_jax.verify --workdir={_workdir_of(directory)}`{older}')


def _workdir_of(directory: str) -> str:
  """The run directory W of a checkpoints directory W/checkpoints."""
  return directory.rstrip('/').rsplit('/', 1)[0]


def newest_intact(directory: str, steps: list[int]) -> int | None:
  """The newest of `steps` whose files pass their checksums (or have none to check)."""
  for step in sorted(steps, reverse=True):
    if check_step(directory, step).status != 'corrupt':
      return step
  return None


def all_finite(tree: Any) -> bool:
  """Whether every floating-point array of `tree` is free of NaN and Inf (one reduction
  per array, on the arrays' devices)."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)]
  return all(bool(c) for c in checks)
