"""Running a sweep's points: the local backend (subprocesses); TPU VMs are tpu.py's.

Backends take a `runner(cmd, log_path) -> exit code` so tests inject a fake one and no
cloud call is ever made from a test. A crashing point is reported and the others continue; the
caller turns the returned failures into a non-zero exit code.

Preemption. A point whose train exits with PREEMPTED (75, EX_TEMPFAIL: the trainer saved
a checkpoint on SIGTERM) is requeued: the same command reruns and resumes. SIGTERM to the
local runner itself is forwarded to every running child's process group; the runner waits
(at most `STOP_WAIT_S`) for them to save and exit, starts nothing more, reports the
interrupted points as failed ("rerun to resume") and returns: no child outlives it
holding a run's lock, so an immediate rerun resumes every point.

Points on several processes (spec.Point.processes = N > 1). Every stage but prepare starts
N processes at once (`stage_launches`: --config.distributed.* with a fresh coordinator
port per start, process i logging to spec.process_log(W, i)) and waits for all of them
(`shell_group_runner`): when one dies the others are killed (they would wait for it in a
collective) and the point fails naming the dead process's log. A rerun starts all N
again, and the trainer resumes from the point's checkpoint. --parallel counts processes:
an N-process point takes N slots (all of them if N > --parallel: it then runs alone).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

from scone_jax import metrics_file
from scone_jax import paths
from scone_jax.sweeps import spec
from scone_jax.sweeps import tables

Runner = Callable[[str, str], int]
# The train CLI's exit status when preempted (scone_jax/train/loop.EXIT_PREEMPTED; named
# here by the same POSIX constant so the launcher does not import the trainer).
PREEMPTED = os.EX_TEMPFAIL
# Times a local point's preempted stage is rerun (each resumes from its checkpoint).
REQUEUES = 3
# After forwarding SIGTERM, how long the runner waits for its children to save and exit
# before it kills them.
STOP_WAIT_S = 300.0


class _Children:
  """The running children's process groups, and whether the runner was told to stop."""

  def __init__(self):
    self.lock = threading.Lock()
    self.procs: set[subprocess.Popen] = set()
    self.stopping = threading.Event()

  def start(self, cmd: str, log, env: dict[str, str] | None = None
            ) -> subprocess.Popen | None:
    """Starts `cmd` in its own session (process group), with `env` added to this
    process's environment; None once stopping."""
    with self.lock:
      if self.stopping.is_set():
        return None
      proc = subprocess.Popen(cmd, shell=True, executable='/bin/bash', stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **env} if env else None)
      self.procs.add(proc)
      return proc

  def wait(self, proc: subprocess.Popen) -> int:
    """The child's exit status; when stopping, only once its whole process group has
    exited: bash may die of the forwarded SIGTERM before the trainer it started saved."""
    rc = proc.wait()
    if self.stopping.is_set():
      _reap_group(proc.pid, time.time() + STOP_WAIT_S)
    with self.lock:
      self.procs.discard(proc)
    return rc

  def stop(self, signum, frame) -> None:
    """The SIGTERM handler: forward to every child's group; start nothing more."""
    del frame
    self.stopping.set()
    with self.lock:
      for proc in self.procs:
        _signal_group(proc.pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
  try:
    os.killpg(pgid, signum)
  except ProcessLookupError:
    pass


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
    return True
  except ProcessLookupError:
    return False
  except PermissionError:
    return True


def _reap_group(pgid: int, deadline: float) -> None:
  """Waits until the group has exited, killing it at `deadline`."""
  while _group_alive(pgid) and time.time() < deadline:
    time.sleep(0.1)
  if _group_alive(pgid):
    _signal_group(pgid, signal.SIGKILL)


_CHILDREN = _Children()


def _local_log(log_path: str) -> str:
  """Where the log is appended: log_path itself, or for a gs:// path a local mirror that
  is uploaded whole after each command (object stores have no append)."""
  if not paths.is_remote(log_path):
    return log_path
  return os.path.join(tempfile.gettempdir(), 'scone_jax-sweep-logs',
                      re.sub(r'[^A-Za-z0-9_.-]', '_', log_path))


def _open_log(log_path: str, cmd: str):
  """The local file `cmd`'s output is appended to (its line written first)."""
  local = _local_log(log_path)
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  log = open(local, 'a')  # pylint: disable=consider-using-with
  log.write(f'\n$ {cmd}\n')
  log.flush()
  return log


def _close_log(log, log_path: str) -> None:
  """Closes it; a gs:// log_path gets the local mirror uploaded whole."""
  log.close()
  if log.name != log_path:
    with open(log.name, 'rb') as f:
      paths.write_bytes(log_path, f.read())


def shell_runner(cmd: str, log_path: str) -> int:
  """Runs `cmd` through bash in its own process group, appending stdout+stderr to
  log_path (local or gs://). Once the runner is stopping (SIGTERM) it starts nothing and
  returns PREEMPTED."""
  log = _open_log(log_path, cmd)
  try:
    proc = _CHILDREN.start(cmd, log)
    return PREEMPTED if proc is None else _CHILDREN.wait(proc)
  finally:
    _close_log(log, log_path)


@dataclasses.dataclass(frozen=True)
class Launch:
  """One process of a stage: its command, what it adds to the environment, its log."""
  cmd: str
  env: dict[str, str]
  log: str


# A stage's processes -> (exit status, index of the process that decided it; -1 if all
# exited 0). shell_group_runner; tests inject fakes.
GroupRunner = Callable[[Sequence[Launch]], tuple[int, int]]


def shell_group_runner(launches: Sequence[Launch], poll_s: float = 0.2) -> tuple[int, int]:
  """Starts every process of a stage at once (each as shell_runner starts one) and waits
  for all. The first to exit non-zero decides the stage's status. The others are then
  killed (SIGKILL): a survivor would wait for the dead process in its next collective,
  and a checkpoint is only ever read once committed, so nothing half-written survives.
  Except when it exited PREEMPTED or the runner is stopping: then every process is
  saving the same checkpoint (it needs all of them), so they get STOP_WAIT_S to exit.
  """
  logs = [_open_log(x.log, x.cmd) for x in launches]
  procs: list[subprocess.Popen | None] = []
  try:
    for x, log in zip(launches, logs):
      procs.append(_CHILDREN.start(x.cmd, log, x.env))  # None: stopping already.
    rc, first = 0, -1
    while True:
      codes = [PREEMPTED if p is None else p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c]
      if failed and first < 0:
        first = failed[0]
        rc = codes[first]
        grace = rc == PREEMPTED or _CHILDREN.stopping.is_set()
        deadline = time.time() + (STOP_WAIT_S if grace else 0.0)
        for p in procs:
          if p is not None:
            threading.Thread(target=_reap_group, args=(p.pid, deadline), daemon=True).start()
      if all(c is not None for c in codes):
        break
      time.sleep(poll_s)
    for p in procs:
      if p is not None:
        _CHILDREN.wait(p)
    return rc, first
  finally:
    for x, log in zip(launches, logs):
      _close_log(log, x.log)


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (a point's coordinator: one per start)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def stage_launches(point: spec.Point, cmd: str, port: int,
                   environ: dict[str, str] | None = None) -> list[Launch]:
  """The processes a stage of an N-process point starts on this machine: process i runs
  `cmd` as process i of N (spec.process_command) meeting at 127.0.0.1:`port`, with its
  share of the GPUs (spec.process_env of `environ`, default os.environ), logging to
  spec.process_log(W, i)."""
  environ = dict(os.environ if environ is None else environ)
  n = point.processes
  return [Launch(spec.process_command(cmd, i, n, f'127.0.0.1:{port}'),
                 spec.process_env(i, n, environ), spec.process_log(point.workdir, i))
          for i in range(n)]


def _tail(path: str, lines: int = 8) -> str:
  try:
    with open(_local_log(path), errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


@dataclasses.dataclass
class Outcome:
  name: str
  status: str  # 'done', 'skipped', 'failed'
  seconds: float = 0.0
  detail: str = ''


def _last_step(point: spec.Point) -> str:
  """'step 120/300 loss 5.123' from the latest loss in W/metrics.jsonl ('' if none yet)."""
  rec = metrics_file.last(point.workdir, 'loss')
  if rec is None:
    return ''
  return f'step {rec.get("step", "?")}/{point.cfg.train.steps} loss {rec["loss"]:.3f}'


class Progress:
  """One line per event with running totals, and a heartbeat listing running points'
  latest step; thread-safe."""

  def __init__(self, total: int, out=None, heartbeat_s: float = 30.0):
    self.total, self.out, self.start = total, out or sys.stdout, time.time()
    self.counts = {'done': 0, 'skipped': 0, 'failed': 0}
    self.running = 0
    self.active: dict[str, spec.Point] = {}
    self.lock = threading.Lock()
    self._stop = threading.Event()
    self._heartbeat_s = heartbeat_s

  def __enter__(self):
    threading.Thread(target=self._beat, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def _beat(self):
    while not self._stop.wait(self._heartbeat_s):
      with self.lock:
        for name, point in self.active.items():
          print(f'    {name}: {_last_step(point) or "starting"}', file=self.out, flush=True)

  def event(self, name: str, status: str, detail: str = ''):
    with self.lock:
      if status == 'started':
        self.running += 1
      else:
        self.running -= status != 'skipped'
        self.counts[status] += 1
      finished = sum(self.counts.values())
      elapsed = time.time() - self.start
      print(f'[{finished}/{self.total} finished, {self.running} running, '
            f'{self.counts["failed"]} failed, {elapsed:6.0f}s] {status:8s} {name}'
            + (f'\n{detail}' if detail else ''), file=self.out, flush=True)


def _stage_commands(sweep: spec.Sweep, point: spec.Point, python: str
                    ) -> list[tuple[str, str]]:
  """(stage, command): train, evaluate, then the downstream stages (spec.after_evaluate),
  each as one process runs it (on an N-process point, stage_launches adds each process's
  --config.distributed.* to it; evaluate, export and downstream take them as train does)."""
  return [('train', spec.command(sweep, point, python, 'train')),
          ('evaluate', spec.command(sweep, point, python, 'evaluate'))] + [
              (stage, cmd) for stage, cmd, _ in spec.after_evaluate(point, python)]


def _stage_done(point: spec.Point, stage: str) -> bool:
  """Whether a stage has nothing left to do: evaluate once the final eval.json is there
  (train evaluates at its end), train too when the point has downstream stages (a point
  rerun for them does not train again), the stages after evaluate by spec.stage_done."""
  if stage == 'train' and point.downstream is None:
    return False  # Unfinished points only get here; the trainer resumes.
  if stage in ('train', 'evaluate'):
    return spec.read_eval(point.workdir, point.cfg.train.steps) is not None
  return spec.stage_done(point, stage)


def prepare_groups(sweep: spec.Sweep) -> dict[str, list[spec.Point]]:
  """Points grouped by the artifacts dir they share (one prepare per group)."""
  groups: dict[str, list[spec.Point]] = {}
  for p in sweep.points:
    groups.setdefault(p.cfg.data.artifacts_dir, []).append(p)
  return groups


class _Slots:
  """--parallel as a budget of processes: a point takes as many slots as it runs
  processes (at most all of them), all at once, and gives them back when it ends."""

  def __init__(self, total: int):
    self.total, self.free = total, total
    self.cond = threading.Condition()

  def take(self, n: int) -> int:
    n = min(n, self.total)
    with self.cond:
      self.cond.wait_for(lambda: self.free >= n)
      self.free -= n
    return n

  def give(self, n: int) -> None:
    with self.cond:
      self.free += n
      self.cond.notify_all()


def run_local(sweep: spec.Sweep, python: str = sys.executable, parallel: int = 1,
              runner: Runner = shell_runner, out=None,
              group_runner: GroupRunner = shell_group_runner) -> list[Outcome]:
  """Runs every unfinished point: prepare once per artifacts dir, then train + evaluate.

  Finished points (complete W/eval.json) are skipped; interrupted ones rerun the same
  command and the trainer resumes from W/checkpoints; a preempted stage (exit PREEMPTED)
  is requeued up to REQUEUES times. SIGTERM to this process is forwarded to the running
  children (module docstring). Logs go to W/log.txt. `parallel` counts processes;
  `group_runner` runs the stages of points on several processes (`runner` the others).
  """
  with _forward_sigterm():
    return _run_local(sweep, python, parallel, runner, out, group_runner)


def _run_local(sweep: spec.Sweep, python: str, parallel: int, runner: Runner,
               out, group_runner: GroupRunner) -> list[Outcome]:
  out = out or sys.stdout
  progress = Progress(len(sweep.points), out)
  todo, outcomes = [], []
  for p in sweep.points:
    if spec.is_finished(p):
      outcomes.append(Outcome(p.name, 'skipped', detail='eval.json present'))
      progress.event(p.name, 'skipped')
    else:
      todo.append(p)
  broken_groups: dict[str, str] = {}
  for adir, group in prepare_groups(sweep).items():
    group = [p for p in group if p in todo]
    if not group:
      continue
    first = group[0]
    spec.write_point_json(sweep, first)
    log = os.path.join(first.workdir, 'log.txt')
    print(f'prepare {adir} (shared by {len(group)} point(s); log {log})', file=out, flush=True)
    rc = runner(spec.prepare_command(sweep, first, python), log)
    if rc:
      broken_groups[adir] = f'prepare exited with {rc}; see {log}:\n{_tail(log)}'

  def _run_stage(p: spec.Point, stage: str, cmd: str) -> tuple[int, str, str]:
    """Runs one stage once: (exit status, who exited so, their log)."""
    if p.processes == 1:
      log = spec.process_log(p.workdir, 0)
      return runner(cmd, log), stage, log
    launches = stage_launches(p, cmd, free_port())
    rc, first = group_runner(launches)
    if first < 0:
      return rc, stage, launches[0].log
    return (rc, f'{stage} process {first} of {p.processes} (the others were stopped)',
            launches[first].log)

  def _run_stages(p: spec.Point) -> Outcome:
    log = spec.process_log(p.workdir, 0)
    start = time.time()
    for stage, cmd in _stage_commands(sweep, p, python):
      if _stage_done(p, stage):
        continue
      rc, who, who_log = _run_stage(p, stage, cmd)
      for attempt in range(REQUEUES):
        if rc != PREEMPTED or _CHILDREN.stopping.is_set():
          break
        print(f'  {p.name}: {stage} was preempted (exit {rc}); requeued '
              f'{attempt + 1}/{REQUEUES}, it resumes from its checkpoint', file=out,
              flush=True)
        rc, who, who_log = _run_stage(p, stage, cmd)
      if rc and _CHILDREN.stopping.is_set():
        detail = (f'  {stage} interrupted by SIGTERM to the sweep (exit {rc}); rerun the '
                  f'sweep to resume it; log {who_log}')
        progress.event(p.name, 'failed', detail)
        return Outcome(p.name, 'failed', time.time() - start, detail)
      if rc:
        how = (f'was killed by {signal.Signals(-rc).name}' if rc < 0 and -rc in
               signal.valid_signals() else f'exited with {rc}')
        detail = f'  {who} {how}; log {who_log}:\n{_tail(who_log)}'
        progress.event(p.name, 'failed', detail)
        return Outcome(p.name, 'failed', time.time() - start, detail)
    if not spec.is_finished(p):
      missing = 'eval.json' if not _stage_done(p, 'evaluate') else 'downstream.json'
      detail = f'  finished without writing {p.workdir}/{missing}; log {log}'
      progress.event(p.name, 'failed', detail)
      return Outcome(p.name, 'failed', time.time() - start, detail)
    progress.event(p.name, 'done')
    return Outcome(p.name, 'done', time.time() - start)

  def run_point(p: spec.Point) -> Outcome:
    if p.cfg.data.artifacts_dir in broken_groups:
      progress.event(p.name, 'failed', broken_groups[p.cfg.data.artifacts_dir])
      return Outcome(p.name, 'failed', detail=broken_groups[p.cfg.data.artifacts_dir])
    spec.write_point_json(sweep, p)
    taken = slots.take(p.processes)
    progress.event(p.name, 'started')
    with progress.lock:
      progress.active[p.name] = p
    try:
      return _run_stages(p)
    finally:
      with progress.lock:
        progress.active.pop(p.name)
      slots.give(taken)

  slots = _Slots(max(1, parallel))
  with progress, concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    outcomes += list(pool.map(run_point, todo))
  return outcomes


class _forward_sigterm:  # pylint: disable=invalid-name
  """Within: SIGTERM goes to the children (`_Children.stop`), from the main thread only."""

  def __enter__(self):
    _CHILDREN.stopping.clear()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, _CHILDREN.stop)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def dry_run(sweep: spec.Sweep, python: str, out=None,
            af_tokens_per_token: float | None = None,
            commands: list[tuple[str, str]] | None = None) -> None:
  """Prints every command a run would execute, in order, then the accounting table (A_f's
  training FLOPs at the worst case and, if given, at a measured A_f tokens per token).

  `commands` are a remote backend's (comment, command) pairs (tpu_dry_run_commands,
  slurm.dry_run_commands, ...); default: the local backend's prepare, train, evaluate
  and downstream stages (a stage of an N-process point as its N processes, started in
  the background and waited for together, on a port free when printed: a run picks a
  fresh one per start).
  """
  out = out or sys.stdout
  if commands is None:
    commands = [(f'prepare {adir} (shared by {len(group)} point(s))',
                 spec.prepare_command(sweep, group[0], python))
                for adir, group in prepare_groups(sweep).items()]
    for p in sweep.points:
      for stage, cmd in _stage_commands(sweep, p, python):
        if p.processes == 1:
          commands.append((f'{p.name}: {stage}', cmd))
          continue
        parts = [' '.join([*(f'{k}={shlex.quote(v)}' for k, v in x.env.items()), x.cmd,
                           f'>> {shlex.quote(x.log)} 2>&1 &'])
                 for x in stage_launches(p, cmd, free_port())]
        commands.append((f'{p.name}: {stage} on {p.processes} processes',
                         '\n'.join(parts + ['wait'])))
  for comment, cmd in commands:
    print(f'# {comment}', file=out)
    print(cmd, file=out)
  print(file=out)
  print(tables.markdown_table(spec.accounting_rows(sweep, af_tokens_per_token)), file=out)
  print(file=out)
  print('Per arm: accelerator params/memory in training (params + grads + AdamW, no '
        'activations) and at inference (+ KV cache per sequence), the offloaded host store, '
        'FLOPs per token (scone_jax/model/arm_accounting.py)', file=out)
  print(tables.markdown_table(spec.arm_rows(sweep)), file=out)
