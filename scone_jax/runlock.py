"""One writer per run directory: a lock file holding who writes it.

`W/.lock` is created exclusively (O_EXCL) and holds {pid, host, started, heartbeat}. A
second `train` on W finds it and stops at once, naming the holder. A lock whose holder is
gone does not block forever: on the same host a dead pid is detected directly; for a holder
on another host (a shared file system) the lock is stale once its heartbeat, refreshed by a
background thread every `HEARTBEAT_SECONDS`, is older than `STALE_SECONDS`. A stale lock is
taken over with a warning naming the old holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging
from scone_jax.errors import UserError

LOCK_FILE = '.lock'
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 10 * HEARTBEAT_SECONDS


class RunLockedError(UserError, RuntimeError):
  """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  return True


def read_lock(workdir: str) -> dict[str, Any] | None:
  """The lock's holder record, or None when unlocked (or unreadable: a torn write)."""
  try:
    with open(os.path.join(workdir, LOCK_FILE)) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _stale_reason(holder: dict[str, Any], path: str) -> str | None:
  """Why the lock held by `holder` is stale, or None while its holder may be alive."""
  if holder.get('host') == socket.gethostname():
    pid = holder.get('pid')
    if not isinstance(pid, int) or not _pid_alive(pid):
      return f'process {pid} no longer runs on this host'
    return None
  try:
    age = time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return 'it was just released'
  if age > STALE_SECONDS:
    return f'its heartbeat is {age:.0f} s old (> {STALE_SECONDS:.0f} s)'
  return None


def _describe(holder: dict[str, Any]) -> str:
  return (f'pid {holder.get("pid")} on host {holder.get("host")} (since '
          f'{holder.get("started")})')


class RunLock:
  """Exclusive writer lock on a run directory; use as a context manager.

  Raises RunLockedError on entry when a live process holds it.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._record: dict[str, Any] | None = None

  def acquire(self) -> None:
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = read_lock(self.workdir)
        if holder is None:
          continue  # Released meanwhile: try again.
        reason = _stale_reason(holder, self.path)
        if reason is None:
          raise RunLockedError(
              f'{self.workdir} is being written by {_describe(holder)}: another train '
              f'holds its lock {self.path}. Wait for it to finish or stop it; if it is '
              'gone and its host cannot tell (another machine), delete the lock file')
        # Take over only the lock we judged stale (another process may have done so).
        if read_lock(self.workdir) == holder:
          logging.warning('run lock %s: taking over from %s: %s', self.path,
                          _describe(holder), reason)
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
      self._record = record
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name='scone_jax.runlock')
      self._thread.start()
      return
    raise RunLockedError(f'could not take the lock {self.path} (it keeps changing hands); '
                         'is another train starting on the same run directory?')

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError:
        return

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._record is not None and read_lock(self.workdir) == self._record:
      os.remove(self.path)
    self._record = None

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
