"""One status file per sweep (SWEEP_DIR/status.json), written by every backend.

It maps each point to the backend that last ran it, the backend's job id (a SLURM array
task '123_4', an xpk workload name, a TPU target), how many attempts it took and its state
('submitted', 'running', 'done', 'failed', 'skipped'), so a sweep started on one backend
can be inspected, resumed or reported from any machine that sees its root (a local path
or gs://). The file is rewritten whole (temp + rename, one PUT on gs://), never appended:
a reader sees the old or the new version, never half of one.

The retry/resume policy is shared too (`RetryPolicy`): a point that fails is retried at
most `retries` times, and every retry reruns the same command, which resumes from the
point's checkpoints (the trainer's auto-resume). Exit status 75 (EX_TEMPFAIL) is a
preemption: the trainer saved and stopped on SIGTERM, so a retry loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from scone_jax import artifacts, paths
from scone_jax.sweeps import spec

STATUS_JSON = 'status.json'
PREEMPTED_EXIT = 75
STATES = ('submitted', 'running', 'done', 'failed', 'skipped')

_lock = threading.Lock()  # Threads of one process (local --parallel) update one file.


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How often a failed point is retried and how long to wait first (every backend)."""
  retries: int = 3
  wait_s: float = 60.0

  def __post_init__(self):
    if self.retries < 0 or self.wait_s < 0:
      raise spec.SweepError(f'retries={self.retries} and retry wait {self.wait_s}s must be '
                            '>= 0; pass e.g. --retries=3')


def path(sweep_dir: str) -> str:
  return paths.join(sweep_dir, STATUS_JSON)


def read(sweep_dir: str) -> dict[str, dict[str, Any]]:
  """Point name -> entry ({} when the sweep has no status file yet)."""
  try:
    record = json.loads(paths.read_text(path(sweep_dir)))
  except FileNotFoundError:
    return {}
  except (OSError, json.JSONDecodeError) as e:
    raise spec.SweepError(f'{path(sweep_dir)} is unreadable ({e}); delete it: the next run '
                          'rewrites it from the points\' own files') from e
  return record.get('points', {})


def update(sweep_dir: str, entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Merges `entries` (point name -> fields to set) into the file; returns the result.

  Fields: backend, job_id, state (one of STATES), attempts, detail, log. An entry's
  `updated` time is set here.
  """
  for name, fields in entries.items():
    state = fields.get('state')
    if state is not None and state not in STATES:
      raise ValueError(f'point {name}: state {state!r} is not one of {STATES}')
  paths.makedirs(sweep_dir)
  with _lock, _file_lock(sweep_dir):
    points = read(sweep_dir)
    now = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    for name, fields in entries.items():
      points[name] = {**points.get(name, {}), **fields, 'updated': now}
    artifacts.write_json_atomic(path(sweep_dir), {'points': points})
  return points


@contextlib.contextmanager
def _file_lock(sweep_dir: str) -> Iterator[None]:
  """Processes sharing a local sweep dir (SLURM tasks) update the file one at a time, so
  none loses another's entry; on gs:// each writer's points are its own (no lock)."""
  if paths.is_remote(sweep_dir):
    yield
    return
  with open(os.path.join(sweep_dir, STATUS_JSON + '.lock'), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def record_outcomes(sweep_dir: str, backend: str, outcomes: Iterable[Any]) -> None:
  """Records a finished backend run's outcomes (objects with name/status/detail)."""
  previous = read(sweep_dir)
  entries = {}
  for o in outcomes:
    attempts = previous.get(o.name, {}).get('attempts', 0)
    entries[o.name] = {'backend': backend, 'state': o.status, 'detail': o.detail,
                       'attempts': attempts + (o.status != 'skipped')}
  update(sweep_dir, entries)


def table(sweep: spec.Sweep, last_step: Callable[[spec.Point], str]) -> list[dict[str, Any]]:
  """One row per point: its backend, job, state, attempts and latest logged step.

  A point whose eval.json holds its final results is 'done' whatever the file says (it may
  have finished after the last update, e.g. a SLURM job nobody waited for).
  """
  entries = read(sweep.dir)
  rows = []
  for p in sweep.points:
    e = entries.get(p.name, {})
    state = 'done' if spec.is_finished(p) else e.get('state', 'not started')
    rows.append({'run': p.name, 'backend': e.get('backend', ''), 'job': e.get('job_id', ''),
                 'state': state, 'attempts': e.get('attempts', 0),
                 'last step': last_step(p)})
  return rows
