"""Cloud TPU queued resources: a slice created for each point, run, then deleted.

Where `--backend=tpu` runs points on TPU VMs that already exist (backends.run_tpu, one
point per free VM), `--backend=tpu --tpu_queued=ACCELERATOR_TYPE` asks Cloud TPU for a
slice per point (`gcloud compute tpus queued-resources create`), waits until it is
ACTIVE, runs the point exactly as on an existing VM (the same bootstrap copy and ssh:
backends.tpu_command), and deletes the slice whatever happened, so a failed point leaves
no billed TPU behind. Points run `parallel` at a time; a failed point (a spot slice
reclaimed, say) is retried on a fresh slice and resumes from its checkpoints under the
gs:// root. The flags follow `gcloud compute tpus queued-resources create --help` (Cloud
SDK 528); the tests check every generated command against the installed gcloud's parser.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shlex
import sys
import time

from scone_jax import artifacts
from scone_jax.sweeps import backends, spec, status

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$')


@dataclasses.dataclass(frozen=True)
class QueuedSlice:
  """The slice each point asks for.

  Attributes:
    accelerator_type: e.g. 'v5p-64', 'v5litepod-16'.
    runtime_version: the TPU VM image, e.g. 'v2-alpha-tpuv5' (v5p), 'v2-alpha-tpuv5-lite'.
    zone, project: where (project '' = gcloud's default).
    repo, ref: what the workers check out (as for backends.TpuTarget).
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
  target = backends.TpuTarget(name, qs.zone, qs.project, qs.repo, qs.ref)
  create = qs.gcloud('create', name, f'--node-id={name}',
                     f'--accelerator-type={qs.accelerator_type}',
                     f'--runtime-version={qs.runtime_version}', *(['--spot'] if qs.spot else []))
  describe = qs.gcloud('describe', name, '--format=value(state.state)')
  wait = (f'while :; do s=$({describe}) || exit 1; case "$s" in ACTIVE) break ;; '
          f'FAILED|SUSPENDED) echo "queued resource {name} is $s" >&2; exit 1 ;; esac; '
          f'sleep {qs.poll_s}; done')
  return [('create', create), ('wait', wait),
          ('bootstrap', backends.bootstrap_copy_command(target)),
          ('run', backends.tpu_command(sweep, point, target)),
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
