"""GKE through xpk: one workload per point on a TPU or GPU cluster, all in parallel.

`--backend=xpk` submits every unfinished point as its own workload (`xpk workload create`,
the launcher MaxText documents), then waits for each (`xpk workload list
--wait-for-job-completion`). The workload runs a container image holding this repo and its
pinned requirements (docs/LAUNCH.md gives the three-line Dockerfile) with the SAME train
and evaluate commands as every other backend; the root must be gs:// (the pods write their
checkpoints and results there), so a restarted workload (`--max-restarts`) resumes from its
checkpoints, and a second invocation skips finished points. TPU device types (v5p-8,
v5litepod-16, ...) take `--num-slices`; GPU ones (h100-80gb-8, ...) `--num-nodes`.
Multi-host points run with distributed.mode=auto (jax.distributed finds the pods).
The flags follow xpk 1.16.0 (`xpk workload create --help`); tests/test_sweep_backends.py
runs every generated command through the installed xpk's own argument parser.
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

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$')
_TPU_TYPE = re.compile(r'^v\d+[a-z]*(pod)?-\d+$')  # v4-8, v5p-128, v5litepod-16, v6e-8.


@dataclasses.dataclass(frozen=True)
class XpkTarget:
  """A GKE cluster created with `xpk cluster create`, and what each point gets there.

  Attributes:
    cluster, project, zone: the cluster (project/zone '' = gcloud's defaults).
    device_type: e.g. 'v5p-8' (TPU) or 'h100-80gb-8' (GPU).
    docker_image: an image with this repo at its working directory and its requirements.
    count: TPU slices (--num-slices) or GPU nodes (--num-nodes) per point.
    python: the interpreter in the image.
    max_restarts: GKE restarts of a failed workload (each resumes from checkpoints).
    prefix: workload names are PREFIX-<hash of sweep and point>.
  """
  cluster: str
  device_type: str
  docker_image: str
  project: str = ''
  zone: str = ''
  count: int = 1
  python: str = 'python3'
  max_restarts: int = 3
  prefix: str = 'scone'

  @property
  def is_tpu(self) -> bool:
    return bool(_TPU_TYPE.match(self.device_type))

  def xpk(self, *args: str) -> str:
    flags = [f'--cluster={self.cluster}']
    flags += [f'--project={self.project}'] if self.project else []
    flags += [f'--zone={self.zone}'] if self.zone else []
    return ' '.join(shlex.quote(a) for a in ['xpk', 'workload', *args, *flags])


def workload_name(target: XpkTarget, sweep: spec.Sweep, point: spec.Point) -> str:
  name = f'{target.prefix}-{artifacts.fingerprint(sweep.name, point.name)[:10]}'
  if not _NAME.match(name):
    raise spec.SweepError(f'workload name {name!r} is invalid: --xpk.prefix must be '
                          'lowercase letters, digits and hyphens, starting with a letter')
  return name


def point_command(target: XpkTarget, sweep: spec.Sweep, point: spec.Point) -> str:
  """What the workload's container runs: train, then evaluate (idempotent; a gs:// workdir
  cannot be checked with `test -f` from the container's shell), then the downstream
  stages if the sweep has them (spec.after_evaluate)."""
  multi = target.is_tpu or target.count > 1  # TPU: one process per host even at count 1.
  extra = {'distributed.mode': 'auto'} if multi else {}
  train = spec.command(sweep, point, target.python, 'train', extra)
  evaluate = spec.command(sweep, point, target.python, 'evaluate')
  return f'{train} && {evaluate}' + spec.after_evaluate_shell(point, target.python)


def create_command(target: XpkTarget, sweep: spec.Sweep, point: spec.Point) -> str:
  count = (f'--num-slices={target.count}' if target.is_tpu
           else f'--num-nodes={target.count}')
  return target.xpk('create', f'--workload={workload_name(target, sweep, point)}',
                    f'--device-type={target.device_type}', count,
                    f'--docker-image={target.docker_image}',
                    f'--command={point_command(target, sweep, point)}',
                    f'--max-restarts={target.max_restarts}',
                    # 75: preempted (saved on SIGTERM); xpk restarts 42, 127-255 by default.
                    f'--restart-on-exit-codes={status.PREEMPTED_EXIT}')


def wait_command(target: XpkTarget, sweep: spec.Sweep, point: spec.Point) -> str:
  return target.xpk('list', f'--wait-for-job-completion={workload_name(target, sweep, point)}')


def check(target: XpkTarget, sweep: spec.Sweep) -> None:
  """Errors a submission would hit, raised before anything is submitted."""
  if not sweep.root.startswith('gs://'):
    raise spec.SweepError(f'--root={sweep.root} is local to this machine; GKE pods write '
                          'checkpoints and results to --root: use gs://BUCKET/...')
  missing = [f'--xpk.{n}' for n in ('cluster', 'device_type', 'docker_image')
             if not getattr(target, n)]
  if missing:
    raise spec.SweepError(f'--backend=xpk needs {", ".join(missing)} (docs/LAUNCH.md)')
  if target.count < 1:
    raise spec.SweepError(f'--xpk.count={target.count} must be >= 1')


def dry_run_commands(target: XpkTarget, sweep: spec.Sweep) -> list[tuple[str, str]]:
  """Every point's create (all run in parallel on the cluster), then every wait."""
  check(target, sweep)
  return ([(f'{p.name}: submit', create_command(target, sweep, p)) for p in sweep.points]
          + [(f'{p.name}: wait', wait_command(target, sweep, p)) for p in sweep.points])


def run_xpk(sweep: spec.Sweep, target: XpkTarget,
            runner: backends.Runner = backends.shell_runner,
            log_dir: str = 'runs/xpk_logs', out=None) -> list[backends.Outcome]:
  """Submits every unfinished point, then waits for all; done = final eval.json."""
  out = out or sys.stdout
  check(target, sweep)
  os.makedirs(log_dir, exist_ok=True)
  progress = backends.Progress(len(sweep.points), out)
  todo = []
  outcomes = []
  for p in sweep.points:
    if spec.is_finished(p):
      progress.event(p.name, 'skipped')
      outcomes.append(backends.Outcome(p.name, 'skipped', detail='eval.json present'))
    else:
      todo.append(p)

  def log(p: spec.Point) -> str:
    return os.path.join(log_dir, f'{sweep.name}-{p.name}.txt')

  submitted = []
  for p in todo:
    spec.write_point_json(sweep, p)
    rc = runner(create_command(target, sweep, p), log(p))
    if rc:
      detail = f'  xpk workload create exited {rc}; log {log(p)}'
      progress.event(p.name, 'started')
      progress.event(p.name, 'failed', detail)
      outcomes.append(backends.Outcome(p.name, 'failed', detail=detail))
    else:
      progress.event(p.name, 'started')
      submitted.append(p)

  def wait(p: spec.Point) -> backends.Outcome:
    start = time.time()
    rc = runner(wait_command(target, sweep, p), log(p))
    if rc == 0 and spec.is_finished(p):
      progress.event(p.name, 'done')
      return backends.Outcome(p.name, 'done', time.time() - start)
    detail = (f'  workload {workload_name(target, sweep, p)} ended (wait exit {rc}) without '
              f'final results in {p.workdir}; log {log(p)}')
    progress.event(p.name, 'failed', detail)
    return backends.Outcome(p.name, 'failed', time.time() - start, detail)

  with progress, concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, len(submitted))) as pool:
    outcomes += list(pool.map(wait, submitted))
  return outcomes
