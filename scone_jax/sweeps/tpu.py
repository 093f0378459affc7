"""TPU backends: TPU VMs that exist (`run_tpu`), or a queued slice per point (`run_queued`).

`--backend=tpu` runs points on TPU VMs that already exist (`run_tpu`, one point per free
VM, over `gcloud ... ssh --worker=all`); `--backend=tpu --tpu_queued=ACCELERATOR_TYPE` asks Cloud TPU for a
slice per point (`gcloud compute tpus queued-resources create`), waits until it is
ACTIVE, runs the point exactly as on an existing VM (the same bootstrap copy and ssh:
`tpu_command`), and deletes the slice whatever happened, so a failed point leaves
no billed TPU behind. Points run `parallel` at a time; a failed point (a spot slice
reclaimed, say) is retried on a fresh slice and resumes from its checkpoints under the
gs:// root. The flags follow `gcloud compute tpus queued-resources create --help` (Cloud
SDK 528); the tests check every generated command against the installed gcloud's parser.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import re
import shlex
import sys
import time
from typing import Sequence

from scone_jax import artifacts
from scone_jax.sweeps import backends, spec, status

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$')


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
  then evaluate unless train wrote eval.json, then the downstream stages if the sweep has
  them (spec.after_evaluate). The workdir must be shared storage (gs://) so a retried
  point resumes from its checkpoints.
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
            f'{{ test -f {eval_json} || {evaluate}; }}'
            + spec.after_evaluate_shell(point, python))
  return target.gcloud('ssh', target.tpu_name, f'--command={remote}')


# Shipped inside the package, so an installed (non-editable) scone_jax can launch too.
BOOTSTRAP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tpu_bootstrap.sh')


def bootstrap_copy_command(target: TpuTarget) -> str:
  """The gcloud scp that puts tpu_bootstrap.sh in every worker's home (once per sweep)."""
  return target.gcloud('scp', BOOTSTRAP_SCRIPT, f'{target.tpu_name}:tpu_bootstrap.sh')


def run_tpu(sweep: spec.Sweep, target: TpuTarget | Sequence[TpuTarget],
            runner: backends.Runner = backends.shell_runner, retries: int = 3,
            log_dir: str = 'runs/tpu_logs', out=None,
            retry_wait_s: float = 60.0) -> list[backends.Outcome]:
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
    return [backends.Outcome(p.name, 'failed', detail=detail) for p in sweep.points]
  progress = backends.Progress(len(sweep.points), out)

  def run_point(p: spec.Point) -> backends.Outcome:
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
    return backends.Outcome(p.name, status, time.time() - start, detail)

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



@dataclasses.dataclass(frozen=True)
class QueuedSlice:
  """The slice each point asks for.

  Attributes:
    accelerator_type: e.g. 'v5p-64', 'v5litepod-16'.
    runtime_version: the TPU VM image, e.g. 'v2-alpha-tpuv5' (v5p), 'v2-alpha-tpuv5-lite'.
    zone, project: where (project '' = gcloud's default).
    repo, ref: what the workers check out (as for TpuTarget).
    prefix: slice names are PREFIX-<hash of sweep and point> (lowercase, <= 32 chars).
    spot: ask for spot capacity (cheaper; may be reclaimed: the point is then retried).
    poll_s: seconds between state checks while the request waits for capacity.
  """
  accelerator_type: str
  runtime_version: str
  zone: str
  project: str = ''
  repo: str = ''
  ref: str = 'main'
  prefix: str = 'scone'
  spot: bool = False
  poll_s: int = 30

  def gcloud(self, verb: str, name: str, *args: str) -> str:
    flags = [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])
    argv = ['gcloud', 'compute', 'tpus', 'queued-resources', verb, name, *args, *flags]
    return ' '.join(shlex.quote(a) for a in argv)


def slice_name(qs: QueuedSlice, sweep: spec.Sweep, point: spec.Point) -> str:
  """A stable, valid name for the point's slice (a retry reuses it after the delete)."""
  name = f'{qs.prefix}-{artifacts.fingerprint(sweep.name, point.name)[:10]}'
  if not _NAME.match(name):
    raise spec.SweepError(f'queued-resource name {name!r} is invalid: --tpu_queued_prefix '
                          'must be lowercase letters, digits and hyphens, starting with a '
                          'letter, at most 20 characters')
  return name


def point_commands(qs: QueuedSlice, sweep: spec.Sweep,
                   point: spec.Point) -> list[tuple[str, str]]:
  """(what, command) for one point, in order: create, wait, bootstrap, run, delete."""
  name = slice_name(qs, sweep, point)
  target = TpuTarget(name, qs.zone, qs.project, qs.repo, qs.ref)
  create = qs.gcloud('create', name, f'--node-id={name}',
                     f'--accelerator-type={qs.accelerator_type}',
                     f'--runtime-version={qs.runtime_version}', *(['--spot'] if qs.spot else []))
  describe = qs.gcloud('describe', name, '--format=value(state.state)')
  wait = (f'while :; do s=$({describe}) || exit 1; case "$s" in ACTIVE) break ;; '
          f'FAILED|SUSPENDED) echo "queued resource {name} is $s" >&2; exit 1 ;; esac; '
          f'sleep {qs.poll_s}; done')
  return [('create', create), ('wait', wait),
          ('bootstrap', bootstrap_copy_command(target)),
          ('run', tpu_command(sweep, point, target)),
          ('delete', qs.gcloud('delete', name, '--force', '--quiet'))]


def dry_run_commands(qs: QueuedSlice, sweep: spec.Sweep) -> list[tuple[str, str]]:
  """Every point's commands in order (pasted into a shell: one point after another)."""
  return [(f'{p.name}: {what}', cmd) for p in sweep.points
          for what, cmd in point_commands(qs, sweep, p)]


def run_queued(sweep: spec.Sweep, qs: QueuedSlice, parallel: int = 1,
               runner: backends.Runner = backends.shell_runner,
               policy: status.RetryPolicy = status.RetryPolicy(),
               log_dir: str = 'runs/tpu_logs', out=None) -> list[backends.Outcome]:
  """Runs each unfinished point on its own slice, `parallel` at a time; the slice is
  deleted after every attempt, failed or not."""
  out = out or sys.stdout
  if not sweep.root.startswith('gs://'):
    raise spec.SweepError(f'--root={sweep.root} is local to this machine; a queued slice '
                          'writes its checkpoints and results to --root: use gs://BUCKET/...')
  os.makedirs(log_dir, exist_ok=True)
  progress = backends.Progress(len(sweep.points), out)

  def run_point(p: spec.Point) -> backends.Outcome:
    if spec.is_finished(p):
      progress.event(p.name, 'skipped')
      return backends.Outcome(p.name, 'skipped', detail='eval.json present')
    log = os.path.join(log_dir, f'{sweep.name}-{p.name}.txt')
    progress.event(p.name, 'started')
    start, rc = time.time(), 1
    for attempt in range(policy.retries + 1):
      commands = point_commands(qs, sweep, p)
      rc = 0
      for what, cmd in commands[:-1]:
        rc = runner(cmd, log)
        if rc:
          print(f'  {p.name}: {what} exited {rc}', file=out, flush=True)
          break
      runner(commands[-1][1], log)  # Delete the slice whatever happened.
      if rc == 0 or attempt == policy.retries:
        break
      time.sleep(policy.wait_s)
    state = 'done' if rc == 0 else 'failed'
    detail = '' if rc == 0 else f'  exit {rc} after {policy.retries} retries; log {log}'
    progress.event(p.name, state, detail)
    return backends.Outcome(p.name, state, time.time() - start, detail)

  with progress, concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    return list(pool.map(run_point, sweep.points))
