"""Running a sweep's points: the local backend (subprocesses) and TPU pods (gcloud ssh).

Both take a `runner(cmd, log_path) -> exit code` so tests inject a fake one and no cloud
call is ever made from a test. A crashing point is reported and the others continue; the
caller turns the returned failures into a non-zero exit code.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

from scone_jax import paths
from scone_jax.sweeps import spec

Runner = Callable[[str, str], int]


def _local_log(log_path: str) -> str:
  """Where the log is appended: log_path itself, or for a gs:// path a local mirror that
  is uploaded whole after each command (object stores have no append)."""
  if not paths.is_remote(log_path):
    return log_path
  return os.path.join(tempfile.gettempdir(), 'scone_jax-sweep-logs',
                      re.sub(r'[^A-Za-z0-9_.-]', '_', log_path))


def shell_runner(cmd: str, log_path: str) -> int:
  """Runs `cmd` through bash, appending stdout+stderr to log_path (local or gs://)."""
  local = _local_log(log_path)
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  with open(local, 'a') as log:
    log.write(f'\n$ {cmd}\n')
    log.flush()
    rc = subprocess.run(cmd, shell=True, executable='/bin/bash', stdout=log,
                        stderr=subprocess.STDOUT, check=False).returncode
  if local != log_path:
    with open(local, 'rb') as f:
      paths.write_bytes(log_path, f.read())
  return rc


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
  """'step 120/300 loss 5.123' from the last line of W/metrics.jsonl ('' if none yet)."""
  try:
    with paths.path(paths.join(point.workdir, 'metrics.jsonl')).open('rb') as f:
      f.seek(max(0, paths.getsize(paths.join(point.workdir, 'metrics.jsonl')) - 4096))
      lines = f.read().decode(errors='replace').splitlines()
  except OSError:
    return ''
  for line in reversed(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'loss' in rec:
      return f'step {rec["step"]}/{point.cfg.train.steps} loss {rec["loss"]:.3f}'
  return ''


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


def _stage_commands(sweep: spec.Sweep, point: spec.Point,
                    python: str) -> list[tuple[str, str]]:
  return [('train', spec.command(sweep, point, python, 'train')),
          ('evaluate', spec.command(sweep, point, python, 'evaluate'))]


def prepare_groups(sweep: spec.Sweep) -> dict[str, list[spec.Point]]:
  """Points grouped by the artifacts dir they share (one prepare per group)."""
  groups: dict[str, list[spec.Point]] = {}
  for p in sweep.points:
    groups.setdefault(p.cfg.data.artifacts_dir, []).append(p)
  return groups


def run_local(sweep: spec.Sweep, python: str = sys.executable, parallel: int = 1,
              runner: Runner = shell_runner, out=None) -> list[Outcome]:
  """Runs every unfinished point: prepare once per artifacts dir, then train + evaluate.

  Finished points (complete W/eval.json) are skipped; interrupted ones rerun the same
  command and the trainer resumes from W/checkpoints. Logs go to W/log.txt.
  """
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
    rc = runner(spec.command(sweep, first, python, 'prepare'), log)
    if rc:
      broken_groups[adir] = f'prepare exited with {rc}; see {log}:\n{_tail(log)}'

  def _run_stages(p: spec.Point) -> Outcome:
    log = os.path.join(p.workdir, 'log.txt')
    start = time.time()
    for stage, cmd in _stage_commands(sweep, p, python):
      if stage == 'evaluate' and spec.is_finished(p):
        continue  # train already evaluated at its end.
      rc = runner(cmd, log)
      if rc:
        detail = f'  {stage} exited with {rc}; log {log}:\n{_tail(log)}'
        progress.event(p.name, 'failed', detail)
        return Outcome(p.name, 'failed', time.time() - start, detail)
    if not spec.is_finished(p):
      detail = f'  finished without writing {p.workdir}/eval.json; log {log}'
      progress.event(p.name, 'failed', detail)
      return Outcome(p.name, 'failed', time.time() - start, detail)
    progress.event(p.name, 'done')
    return Outcome(p.name, 'done', time.time() - start)

  def run_point(p: spec.Point) -> Outcome:
    if p.cfg.data.artifacts_dir in broken_groups:
      progress.event(p.name, 'failed', broken_groups[p.cfg.data.artifacts_dir])
      return Outcome(p.name, 'failed', detail=broken_groups[p.cfg.data.artifacts_dir])
    spec.write_point_json(sweep, p)
    progress.event(p.name, 'started')
    with progress.lock:
      progress.active[p.name] = p
    try:
      return _run_stages(p)
    finally:
      with progress.lock:
        progress.active.pop(p.name)

  with progress, concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    outcomes += list(pool.map(run_point, todo))
  return outcomes


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """Where and what to run on a TPU pod.

  Attributes:
    tpu_name, zone, project: the TPU VM (gcloud flags).
    repo: git URL or gs:// folder the workers fetch the code from.
    ref: git ref to check out (ignored for gs://).
    remote_dir: code checkout on each worker, relative to the ssh user's home.
  """
  tpu_name: str
  zone: str
  project: str = ''
  repo: str = ''
  ref: str = 'main'
  remote_dir: str = 'scone_jax'

  def gcloud(self, verb: str, *args: str) -> str:
    flags = [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])
    argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, *flags, '--worker=all']
    return ' '.join(shlex.quote(a) for a in argv)


def tpu_command(sweep: spec.Sweep, point: spec.Point, target: TpuTarget) -> str:
  """The gcloud command running one point on every host of the pod.

  On each worker: bootstrap (idempotent: code fetch + pinned install guarded by a marker
  file), then train with distributed.mode=auto (jax.distributed.initialize finds the pod),
  then evaluate unless train wrote eval.json. The workdir must be shared storage (gs://)
  so a retried point resumes from its checkpoints.
  """
  extra = {'distributed.mode': 'auto'}
  python = '.venv/bin/python'
  train = spec.command(sweep, point, python, 'train', extra)
  evaluate = spec.command(sweep, point, python, 'evaluate', extra)
  eval_json = shlex.quote(f'{point.workdir}/eval.json')
  bootstrap = ' '.join(shlex.quote(a) for a in
                       ['bash', 'tpu_bootstrap.sh', target.repo, target.ref, target.remote_dir])
  # gs:// workdirs cannot be tested with `test -f`; evaluate is idempotent, so run it
  # whenever eval.json is not visible locally.
  remote = (f'{bootstrap} && cd {shlex.quote(target.remote_dir)} && {train} && '
            f'{{ test -f {eval_json} || {evaluate}; }}')
  return target.gcloud('ssh', target.tpu_name, f'--command={remote}')


# Shipped inside the package, so an installed (non-editable) scone_jax can launch too.
BOOTSTRAP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tpu_bootstrap.sh')


def bootstrap_copy_command(target: TpuTarget) -> str:
  """The gcloud scp that puts tpu_bootstrap.sh in every worker's home (once per sweep)."""
  return target.gcloud('scp', BOOTSTRAP_SCRIPT, f'{target.tpu_name}:tpu_bootstrap.sh')


def run_tpu(sweep: spec.Sweep, target: TpuTarget | Sequence[TpuTarget],
            runner: Runner = shell_runner, retries: int = 3,
            log_dir: str = 'runs/tpu_logs', out=None,
            retry_wait_s: float = 60.0) -> list[Outcome]:
  """Runs the points on one TPU pod, or in parallel over several (one point per free
  target), retrying preempted (failed) ones on whichever target frees up next."""
  out = out or sys.stdout
  targets = [target] if isinstance(target, TpuTarget) else list(target)
  os.makedirs(log_dir, exist_ok=True)
  free: queue.Queue[TpuTarget] = queue.Queue()
  for t in targets:
    setup_log = os.path.join(log_dir, f'{sweep.name}-setup-{t.tpu_name}.txt')
    if runner(bootstrap_copy_command(t), setup_log):
      print(f'copying tpu_bootstrap.sh to {t.tpu_name} failed; not using it (see '
            f'{setup_log})', file=out, flush=True)
    else:
      free.put(t)
  if free.empty():
    detail = (f'copying tpu_bootstrap.sh to {", ".join(t.tpu_name for t in targets)} '
              f'failed; see {log_dir}')
    return [Outcome(p.name, 'failed', detail=detail) for p in sweep.points]
  progress = Progress(len(sweep.points), out)

  def run_point(p: spec.Point) -> Outcome:
    log = os.path.join(log_dir, f'{sweep.name}-{p.name}.txt')
    progress.event(p.name, 'started')
    start, rc = time.time(), 1
    for attempt in range(retries + 1):
      t = free.get()
      try:
        rc = runner(tpu_command(sweep, p, t), log)
      finally:
        free.put(t)
      if rc == 0:
        break
      if attempt < retries:
        print(f'  {p.name}: exit {rc} on {t.tpu_name} (preempted?), retry {attempt + 1}/'
              f'{retries} in {retry_wait_s:.0f}s; it resumes from its checkpoints',
              file=out, flush=True)
        time.sleep(retry_wait_s)
    status = 'done' if rc == 0 else 'failed'
    detail = '' if rc == 0 else f'  exit {rc} after {retries} retries; log {log}'
    progress.event(p.name, status, detail)
    return Outcome(p.name, status, time.time() - start, detail)

  with progress, concurrent.futures.ThreadPoolExecutor(max_workers=free.qsize()) as pool:
    return list(pool.map(run_point, sweep.points))


def tpu_dry_run_commands(sweep: spec.Sweep,
                         targets: Sequence[TpuTarget]) -> list[tuple[str, str]]:
  """(comment, command): the bootstrap copy to each target, then one ssh per point, the
  points dealt round-robin over the targets (paste each target's lines into its own
  shell to run them in parallel, as `--backend=tpu` does, without its retries)."""
  out = [(f'copy the worker bootstrap to every host of {t.tpu_name} (once per sweep)',
          bootstrap_copy_command(t)) for t in targets]
  for i, p in enumerate(sweep.points):
    t = targets[i % len(targets)]
    out.append((f'{p.name} (on {t.tpu_name})', tpu_command(sweep, p, t)))
  return out


def dry_run(sweep: spec.Sweep, python: str, out=None,
            af_tokens_per_token: float | None = None,
            commands: list[tuple[str, str]] | None = None) -> None:
  """Prints every command a run would execute, in order, then the accounting table (A_f's
  training FLOPs at the worst case and, if given, at a measured A_f tokens per token).

  `commands` are a remote backend's (comment, command) pairs (tpu_dry_run_commands,
  slurm.dry_run_commands, ...); default: the local backend's prepare, train, evaluate.
  """
  from scone_jax import report  # Deferred: report imports this package.
  out = out or sys.stdout
  if commands is None:
    commands = [(f'prepare {adir} (shared by {len(group)} point(s))',
                 spec.command(sweep, group[0], python, 'prepare'))
                for adir, group in prepare_groups(sweep).items()]
    for p in sweep.points:
      commands += [(f'{p.name}: {stage}', cmd)
                   for stage, cmd in _stage_commands(sweep, p, python)]
  for comment, cmd in commands:
    print(f'# {comment}', file=out)
    print(cmd, file=out)
  print(file=out)
  print(report.markdown_table(spec.accounting_rows(sweep, af_tokens_per_token)), file=out)
  print(file=out)
  print('Per arm: accelerator params/memory in training (params + grads + AdamW, no '
        'activations) and at inference (+ KV cache per sequence), the offloaded host store, '
        'FLOPs per token (scone_jax/model/arm_accounting.py)', file=out)
  print(report.markdown_table(spec.arm_rows(sweep)), file=out)
