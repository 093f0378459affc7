"""Checks every byte of a run directory: `python -m scone_jax.verify --workdir=W`.

One line per item: config.json and run.json (they parse), every committed checkpoint step
(its checksums.json, scone_jax/checkpoint_files.py), the tokenizer, the f-gram table, the
train and eval token shards the run records (each file's sha256 and crc32c, and the
fingerprint run.json recorded), and the export store (W/export). Each is

  intact       every file matches what was recorded when it was written
  corrupt      what is wrong (a file, its checksum, a fingerprint, ...)
  unverified   why it cannot be checked (a checkpoint saved before checksums existed)
  missing      it should be there and is not
  absent       optional and not there (no f-gram table in a baseline run, no export yet)

Exit status 0 when every item is intact or absent, 2 otherwise. Unlike opening an
artifact for use (which checks crc32c within a budget and trusts a stat cache past it),
this always reads everything.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable, Literal

from absl import flags

from scone_jax import artifacts, checkpoint_files, cli, paths
from scone_jax import run as run_lib
from scone_jax.errors import UserError
from scone_jax.export import EXPORT_DIR, STORE_KIND

Status = Literal['intact', 'corrupt', 'unverified', 'missing', 'absent']
_OK = ('intact', 'absent')


@dataclasses.dataclass(frozen=True)
class Item:
  name: str
  status: Status
  detail: str = ''

  def line(self) -> str:
    return f'{self.name}: {self.status}' + (f' ({self.detail})' if self.detail else '')


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [type(e).__name__])[0][:500]


def _parse(name: str, path: str, read: Callable[[], Any]) -> tuple[Item, Any]:
  """(item, value) of reading one of W's JSON files with `read`."""
  if not paths.exists(path):
    return Item(name, 'missing', path), None
  try:
    return Item(name, 'intact'), read()
  except (UserError, ValueError, KeyError, TypeError) as e:
    return Item(name, 'corrupt', _first_line(e)), None


def _artifact(name: str, location: str, fingerprint: str | None = None,
              kind: str | None = None) -> Item:
  """Every file of an artifact directory against its manifest, and its fingerprint."""
  if not paths.isdir(location):
    return Item(name, 'missing', location)
  manifest = paths.join(location, artifacts.MANIFEST)
  if not paths.exists(manifest):
    return Item(name, 'corrupt', f'{location} has no {artifacts.MANIFEST}: incomplete')
  try:
    kind = kind or json.loads(paths.read_text(manifest)).get('kind')
    artifacts.read_manifest(location, kind, verify='full',
                            expect={'fingerprint': fingerprint} if fingerprint else None)
  except (UserError, ValueError, KeyError, TypeError, OSError) as e:
    return Item(name, 'corrupt', _first_line(e))
  return Item(name, 'intact')


def verify_run(workdir: str) -> list[Item]:
  """The verdict on each item of the run directory `workdir` (module docstring)."""
  run_dir = run_lib.RunDir(workdir)
  if not paths.isdir(run_dir.path):
    raise run_lib.RunError(f'{run_dir.path} does not exist: --workdir must be a training '
                           'run directory (python -m scone_jax.train --workdir=W makes one)')
  items = [_parse('config.json', run_dir.join(run_lib.CONFIG_FILE), run_dir.config)[0]]
  info_item, info = _parse('run.json', run_dir.join(run_lib.RUN_FILE), run_dir.info)
  items.append(info_item)
  steps = checkpoint_files.committed_steps(run_dir.checkpoint_dir)
  if not steps:
    items.append(Item('checkpoints', 'missing', f'no committed step in '
                      f'{run_dir.checkpoint_dir}'))
  for step in steps:
    check = checkpoint_files.check_step(run_dir.checkpoint_dir, step)
    items.append(Item(f'checkpoint step {step}', check.status, check.detail))
  if info is not None:
    refs = [('tokenizer', info.get('tokenizer')), ('f-gram table', info.get('fgram_table')),
            ('train token shards', info.get('train_shards'))]
    refs += [(f'eval token shards {name!r}', ref)
             for name, ref in sorted(info.get('eval_shards', {}).items())]
    for name, ref in refs:
      if ref is None:
        items.append(Item(name, 'absent', 'this run has none'))
      else:
        location = run_dir._location(ref)  # pylint: disable=protected-access
        items.append(_artifact(name, location, ref['fingerprint']))
  store = run_dir.join(EXPORT_DIR)
  items.append(_artifact('export store', store, kind=STORE_KIND) if paths.isdir(store)
               else Item('export store', 'absent', 'not exported'))
  return items


FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory (local or gs://).')


def main(argv):
  del argv
  items = verify_run(_WORKDIR.value)
  for item in items:
    print(item.line())
  if not all(item.status in _OK for item in items):
    sys.exit(cli.USER_ERROR_STATUS)


if __name__ == '__main__':
  cli.run('verify', main, FLAGS)
