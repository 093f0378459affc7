"""The store writer's split between processes (writer.Part) and its per-shard resume, in
one process: two row groups run as threads whose collectives are a threading.Barrier, so
the lock-step rounds, the ownership split and the one manifest are checked without
starting processes (tests/test_multihost_export.py runs real ones, marked slow)."""

import json
import os
import threading

import numpy as np
import pytest

from scone_jax.export import writer
from scone_jax.serve import EmbeddingStore

S, D, CHUNK = 45, 8, 8  # 6 shards, the last one 5 rows.
ROWS_SxD = np.random.default_rng(0).standard_normal((S, D)).astype(np.float32)


class _Killed(Exception):
  """What a kill -9 leaves behind: the shards and markers written so far."""


class _Threads:
  """Collectives between N threads, as multihost_utils gives them between processes."""

  def __init__(self, n: int):
    self.wait = threading.Barrier(n, timeout=60).wait
    self.values = [0] * n

  def part(self, group: int, groups: int) -> writer.Part:
    def agree_max(n: int) -> int:
      self.values[group] = n
      self.wait()
      top = max(self.values)
      self.wait()  # Nobody overwrites a value before everyone has read them all.
      return top
    return writer.Part(group=group, groups=groups, writes=True, first=group == 0,
                       agree_max=agree_max, barrier=lambda name: self.wait())


def _write(out, calls, part=writer.Part(), fail_after=None):
  def compute_rows(start, stop):
    if fail_after is not None and len(calls) == fail_after:
      raise _Killed()
    calls.append((start, stop))
    return ROWS_SxD[start:stop]
  return writer.write_store(str(out), S, D, 'float32', CHUNK, compute_rows, {'step': 1},
                            progress=False, part=part)


def _write_in_groups(out, groups: int) -> list[list[tuple[int, int]]]:
  """write_store by `groups` row groups as threads; each group's compute_rows calls."""
  threads, calls, errors = _Threads(groups), [[] for _ in range(groups)], []

  def run(group):
    try:
      _write(out, calls[group], threads.part(group, groups))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  workers = [threading.Thread(target=run, args=(g,)) for g in range(groups)]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  assert not errors, errors
  return calls

def _store_files(path):
  """Every file's bytes; the manifest's fields but its creation time."""
  files = {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), 'rb').read()
           for d, _, names in os.walk(path) for f in names}
  manifest = json.loads(files.pop('manifest.json'))
  del manifest['created']
  return files, manifest


@pytest.fixture(scope='module')
def one_writer(tmp_path_factory):
  out = tmp_path_factory.mktemp('one') / 'export'
  _write(out, [])
  return out


def test_two_row_groups_write_the_one_writer_store(one_writer, tmp_path):
  calls = _write_in_groups(tmp_path / 'export', 2)
  # Group g computed exactly shards g, g + 2, g + 4, and both ran the same 3 rounds.
  assert calls[0] == [(0, 8), (16, 24), (32, 40)]
  assert calls[1] == [(8, 16), (24, 32), (40, 45)]
  # One manifest, the same bytes as one writer's: shards, checksums and all.
  assert _store_files(str(tmp_path / 'export')) == _store_files(str(one_writer))
  assert not os.path.exists(str(tmp_path / 'export') + '.partial.done')
  np.testing.assert_array_equal(
      EmbeddingStore.open(str(tmp_path / 'export'), 'ram', verify=True).gather(np.arange(S)),
      ROWS_SxD)


def test_idle_groups_take_part_in_every_round(tmp_path):
  """Four groups over 6 shards, resumed after shards 0-4 were written and markers 0 and 4
  lost: group 0 redoes 2 shards, group 1 its unfinished one, groups 2 and 3 none, yet
  every group answers both rounds (start == stop) so the collectives stay in step."""
  out = tmp_path / 'export'
  with pytest.raises(_Killed):
    _write(out, [], fail_after=5)
  done = str(out) + '.partial.done'
  for i in (0, 4):
    os.remove(os.path.join(done, f'{i}.json'))
  calls = _write_in_groups(out, 4)
  assert calls == [[(0, 8), (32, 40)], [(40, 45), (0, 0)], [(0, 0)] * 2, [(0, 0)] * 2]
  np.testing.assert_array_equal(
      EmbeddingStore.open(str(out), 'ram', verify=True).gather(np.arange(S)), ROWS_SxD)


def test_resume_recomputes_a_shard_whose_bytes_changed(one_writer, tmp_path):
  out = tmp_path / 'export'
  with pytest.raises(_Killed):
    _write(out, [], fail_after=3)
  partial = str(out) + '.partial'
  marked = sorted(int(f[:-5]) for f in os.listdir(str(out) + '.partial.done')
                  if f[:-5].isdigit())
  assert marked == [0, 1, 2]
  # Shard 1's bytes change after its marker (a torn or corrupted file): its crc32c no
  # longer matches, so the resume recomputes it, and only it besides the unfinished ones.
  shard = os.path.join(partial, 'c', '1', '0')
  data = bytearray(open(shard, 'rb').read())
  data[0] ^= 0xFF
  open(shard, 'wb').write(bytes(data))
  calls = []
  _write(out, calls)
  assert calls == [(8, 16), (24, 32), (32, 40), (40, 45)]
  assert _store_files(str(out)) == _store_files(str(one_writer))
  assert len(_store_files(str(out))[1]['shard_crc32c']) == 6
