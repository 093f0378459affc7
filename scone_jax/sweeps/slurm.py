"""The SLURM backend: a sweep's points as one sbatch job array, a study as two.

Studies (tuning array, then comparison array) are in slurm_study.py. Plain `sbatch`, not
submitit: job arrays, `--dependency=afterok`, `--requeue` and
`--signal` are first-class sbatch options, the generated batch script is a file a user can
read, edit and resubmit by hand, states come from `scontrol show job -o` (no sacct, which
needs slurmdbd), and there is no extra dependency to pin on every cluster.

What runs: prepare once per artifacts dir (one job each), then an array whose task i runs
point i's stages, the SAME commands the local backend runs (backends._stage_commands), so
results are bitwise equal to `--backend=local`. A point on several processes (more than
one node, or the sweep's PROCESSES / --processes = N: N tasks, N / nodes per node) runs
its stages but prepare under `srun` with `distributed.mode=auto` (jax.distributed finds
the processes from SLURM's environment). Resume is the trainer's checkpoint auto-resume:
- preemption: the trainer saves and exits 75 on SIGTERM; the batch script then
  `scontrol requeue`s its own task (at most RetryPolicy.retries times: SLURM_RESTART_COUNT);
- time limit: `--signal=B:TERM@S` sends the batch shell SIGTERM S seconds early; it passes
  it on to the stage, which saves and exits 75, and the task is requeued the same way;
- node failure / scheduler preemption: `--requeue` lets SLURM requeue the task itself.
A point whose stages fail otherwise is reported failed (a deterministic crash repeats).

Every point's job id, attempts and state go to the sweep's status.json (status.py).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from scone_jax import paths
from scone_jax.sweeps import backends, spec, status

Run = Callable[[Sequence[str]], subprocess.CompletedProcess]

# scontrol's JobState values after which a job does not run again by itself.
TERMINAL = frozenset({'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL',
                      'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE', 'PREEMPTED'})
_FINISHED_CHECK = ('import sys; from scone_jax.sweeps import spec; '
                   'sys.exit(spec.read_eval(sys.argv[1], int(sys.argv[2])) is None)')


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess:
  """Runs a SLURM client (sbatch, scontrol, sinfo); output captured, never raises."""
  return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """A point's job resources (sbatch options) and how it runs.

  Attributes:
    partition: sbatch --partition ('' = the cluster's default partition).
    nodes: nodes per point; > 1 runs train under srun with distributed.mode=auto.
    gpus_per_node: sbatch --gpus-per-node (0: none requested).
    cpus_per_task: sbatch --cpus-per-task (0: the cluster's default).
    mem: sbatch --mem, e.g. '64G' ('' = the cluster's default).
    time: sbatch --time limit, e.g. '04:00:00' ('' = the partition's default).
    account: sbatch --account.
    extra: more sbatch options, one per '#SBATCH' line, e.g. ('--qos=high',).
    setup: shell lines run before a point's stages, e.g. 'module load cuda/12.4'.
    max_parallel: array tasks running at once (sbatch --array=...%N; 0 = no limit).
    shared_fs: the (local-path) sweep root is on a filesystem every node mounts.
    signal_s: seconds before the time limit the job gets SIGTERM (save and requeue).
  """
  partition: str = ''
  nodes: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int = 0
  mem: str = ''
  time: str = ''
  account: str = ''
  extra: tuple[str, ...] = ()
  setup: str = ''
  max_parallel: int = 0
  shared_fs: bool = False
  signal_s: int = 120

  def sbatch_lines(self) -> list[str]:
    opts = [f'--nodes={self.nodes}', f'--signal=B:TERM@{self.signal_s}']
    for flag, value in (('partition', self.partition), ('gpus-per-node', self.gpus_per_node),
                        ('cpus-per-task', self.cpus_per_task), ('mem', self.mem),
                        ('time', self.time), ('account', self.account)):
      if value:
        opts.append(f'--{flag}={value}')
    return [f'#SBATCH {o}' for o in opts + list(self.extra)]


_FIELDS = {f.name for f in dataclasses.fields(SlurmOptions)}


def make_options(where: str, values: dict[str, Any]) -> SlurmOptions:
  """SlurmOptions from a dict (sweep file SLURM, slurm_resources(), flags); checked."""
  unknown = set(values) - _FIELDS
  if unknown:
    raise spec.SweepError(f'{where}: unknown SLURM option(s) {sorted(unknown)}; valid: '
                          f'{", ".join(sorted(_FIELDS))}')
  values = dict(values)
  if isinstance(values.get('extra'), str):
    values['extra'] = (values['extra'],)
  values['extra'] = tuple(values.get('extra', ()))
  opts = SlurmOptions(**values)
  if opts.nodes < 1 or opts.gpus_per_node < 0 or opts.max_parallel < 0:
    raise spec.SweepError(f'{where}: nodes={opts.nodes}, gpus_per_node={opts.gpus_per_node} '
                          f'and max_parallel={opts.max_parallel} must be >= 1, >= 0, >= 0')
  bad = [e for e in opts.extra if not e.startswith('-') or '\n' in e]
  if bad:
    raise spec.SweepError(f'{where}: extra sbatch options {bad} must each be one option '
                          "starting with '-', e.g. '--qos=high'")
  return opts


def point_options(sweep: spec.Sweep, flag_values: dict[str, Any]) -> dict[str, SlurmOptions]:
  """Point name -> its options: the sweep file's SLURM dict, then its optional
  slurm_resources(overrides) -> dict for that point, then the --slurm.* flags set."""
  module = spec.load_sweep_module(sweep.path)
  base = dict(getattr(module, 'SLURM', {}))
  per_point = getattr(module, 'slurm_resources', None)
  out = {}
  for p in sweep.points:
    own = dict(per_point(dict(p.overrides))) if per_point else {}
    out[p.name] = make_options(f'{sweep.path} point {p.name}', {**base, **own, **flag_values})
  return out


def _partitions(run: Run) -> tuple[dict[str, int], str]:
  """(partition -> its node count, the default partition's name)."""
  proc = run(['sinfo', '-h', '-o', '%P %D'])
  if proc.returncode:
    raise spec.SweepError(f'sinfo failed ({proc.stderr.strip() or proc.returncode}): is '
                          'this a SLURM login node and the controller up?')
  counts: dict[str, int] = {}
  default = ''
  for line in proc.stdout.splitlines():
    name, count = line.split()
    if name.endswith('*'):
      name = default = name.rstrip('*')
    counts[name] = counts.get(name, 0) + int(count)
  return counts, default


def check_cluster(sweep: spec.Sweep, options: dict[str, SlurmOptions],
                  run: Run = run_command) -> None:
  """Every error a submission would hit, raised before anything is submitted."""
  for p in sweep.points:
    tasks_per_node(p, options[p.name].nodes)
  for name, opts in options.items():
    if opts.nodes > 1 and not paths.is_remote(sweep.root) and not opts.shared_fs:
      raise spec.SweepError(
          f'point {name} runs on {opts.nodes} nodes but --root={sweep.root} is a local '
          'path the other nodes may not see: use a gs:// root, or pass '
          '--slurm.shared_fs if it is on a filesystem every node mounts')
  if not shutil.which('sbatch'):
    raise spec.SweepError('sbatch is not on PATH: run from a SLURM login node (or after '
                          "`module load slurm`), or use --backend=local")
  counts, default = _partitions(run)
  for name, opts in options.items():
    partition = opts.partition or default
    if partition not in counts:
      raise spec.SweepError(
          f'point {name}: partition {partition or "(default)"!r} does not exist on this '
          f'cluster (partitions: {", ".join(sorted(counts)) or "none"}); pass '
          '--slurm.partition=ONE_OF_THEM')
    if opts.nodes > counts[partition]:
      raise spec.SweepError(
          f'point {name} asks for {opts.nodes} nodes; partition {partition!r} has '
          f'{counts[partition]}: lower --slurm.nodes or pick a larger partition')


def script_dir(sweep_dir: str) -> str:
  """Where batch scripts and job logs go: under the sweep when it is a local path (sbatch
  reads scripts and writes logs locally), else runs/slurm/SWEEP on this machine."""
  if paths.is_remote(sweep_dir):
    return os.path.abspath(os.path.join('runs', 'slurm', os.path.basename(sweep_dir)))
  return os.path.abspath(os.path.join(sweep_dir, 'slurm'))


def tasks_per_node(point: spec.Point, nodes: int) -> int:
  """srun tasks per node of a point: its processes over `nodes` (one per node for a
  point that asks for one process)."""
  if point.processes > 1 and point.processes % nodes:
    raise spec.SweepError(f'point {point.name} runs on {point.processes} processes, which '
                          f'do not split equally over {nodes} nodes; make PROCESSES/'
                          '--processes a multiple of --slurm.nodes')
  return max(1, point.processes // nodes)


def point_body(sweep: spec.Sweep, point: spec.Point, python: str, nodes: int) -> str:
  """Bash lines running one point's stages (a function body; `return` on failure)."""
  w, steps = shlex.quote(point.workdir), point.cfg.train.steps
  per_node = tasks_per_node(point, nodes)
  stages = backends._stage_commands(sweep, point, python)
  if nodes * per_node > 1:  # jax.distributed reads SLURM's environment.
    srun = f'srun --nodes={nodes} --ntasks-per-node={per_node} --kill-on-bad-exit=1 '
    auto = ' ' + shlex.quote('--config.distributed.mode=auto')
    stages = [(stage, srun + cmd + auto) for stage, cmd in stages]
  checks = {stage: check for stage, _, check in spec.after_evaluate(point, python)}
  done = ' && '.join([f'finished {w} {steps}'] + list(dict.fromkeys(checks.values())))
  lines = [f'{done} && {{ echo "{point.name}: already finished"; return 0; }}']
  for stage, cmd in stages:
    if stage == 'evaluate' or (stage == 'train' and point.downstream is not None):
      # Train evaluates at its end; evaluate covers a run that did not. A point rerun for
      # its downstream stages does not train again.
      lines.append(f'finished {w} {steps} || run_stage {shlex.quote(cmd)} || return')
    elif stage in checks:  # Downstream stages: skipped once downstream.json holds them.
      lines.append(f'{checks[stage]} || run_stage {shlex.quote(cmd)} || return')
    else:
      lines.append(f'run_stage {shlex.quote(cmd)} || return')
  missing = shlex.quote(f'finished without writing {point.workdir}/eval.json')
  lines.append(f'finished {w} {steps} || {{ echo {missing}; return 1; }}')
  missing = shlex.quote(f'finished without every downstream task in '
                        f'{point.workdir}/downstream.json')
  lines += [f'{check} || {{ echo {missing}; return 1; }}'
            for check in dict.fromkeys(checks.values())]
  return '\n'.join(lines)


_PRELUDE = r'''set -u
run_stage() {  # In the background, so a SIGTERM to this shell reaches the stage.
  echo "\$ $1"
  bash -c "$1" &
  local child=$! rc
  trap 'kill -TERM $child 2>/dev/null' TERM
  wait $child; rc=$?
  while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
  trap - TERM
  return $rc
}
finished() { @PYTHON@ -c @FINISHED_CHECK@ "$1" "$2"; }
finish() {  # Exit 75: preempted, the checkpoint is saved; requeue to resume from it.
  if [ "$1" -eq 75 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt @RETRIES@ ]; then
    echo "preempted (exit 75): requeue $((${SLURM_RESTART_COUNT:-0} + 1))/@RETRIES@"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$1"
}
'''


def batch_script(job_name: str, opts: SlurmOptions, bodies: list[str], python: str,
                 retries: int, log_dir: str, dependency: str = '',
                 tasks_per_node: int = 1) -> str:
  """An sbatch script: an array with one task per body (one job if a single body), each
  allocating `tasks_per_node` tasks per node for its sruns (tasks_per_node())."""
  head = ['#!/bin/bash', f'#SBATCH --job-name={job_name}', '#SBATCH --requeue',
          '#SBATCH --open-mode=append', f'#SBATCH --chdir={os.getcwd()}']
  if tasks_per_node > 1:
    head.append(f'#SBATCH --ntasks-per-node={tasks_per_node}')
  if len(bodies) > 1:
    throttle = f'%{opts.max_parallel}' if opts.max_parallel else ''
    head += [f'#SBATCH --array=0-{len(bodies) - 1}{throttle}',
             f'#SBATCH --output={log_dir}/%x-%A_%a.txt']
  else:
    head.append(f'#SBATCH --output={log_dir}/%x-%j.txt')
  if dependency:
    head += [f'#SBATCH --dependency={dependency}', '#SBATCH --kill-on-invalid-dep=yes']
  prelude = (_PRELUDE.replace('@RETRIES@', str(retries))
             .replace('@FINISHED_CHECK@', shlex.quote(_FINISHED_CHECK))
             .replace('@PYTHON@', shlex.quote(python)))
  parts = ['\n'.join(head + opts.sbatch_lines()), prelude]
  if opts.setup:
    parts.append(opts.setup)
  if len(bodies) == 1:
    parts.append(f'point() {{\n{bodies[0]}\n}}\npoint\nfinish $?')
  else:
    cases = '\n'.join(f'  {i}) point_{i} ;;' for i in range(len(bodies)))
    funcs = '\n'.join(f'point_{i}() {{\n{b}\n}}' for i, b in enumerate(bodies))
    parts.append(f'{funcs}\ncase "$SLURM_ARRAY_TASK_ID" in\n{cases}\n'
                 '  *) echo "no point for array task $SLURM_ARRAY_TASK_ID"; exit 1 ;;\nesac\n'
                 'finish $?')
  return '\n'.join(parts) + '\n'


def submit(script: str, path: str, run: Run = run_command) -> str:
  """Writes the script (temp + rename) and sbatch-es it; returns the job id."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(script)
  os.replace(tmp, path)
  proc = run(['sbatch', '--parsable', path])
  if proc.returncode:
    raise spec.SweepError(f'sbatch {path} failed: {proc.stderr.strip() or proc.stdout}; '
                          'jobs this run submitted before it keep running (squeue --me)')
  return proc.stdout.strip().split(';')[0]


def _expand(task_ids: str) -> list[str]:
  """'0-3%2' / '1,3' / '5' -> ['0', '1', ...]."""
  out = []
  for part in task_ids.split('%')[0].split(','):
    lo, _, hi = part.partition('-')
    out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
  return out


class SlurmUnreachable(spec.SweepError):
  """scontrol failed for another reason than an unknown job (controller busy or down)."""


def job_states(job_id: str, run: Run = run_command) -> dict[str, dict[str, str]]:
  """'123' or '123_4' -> {'123_4': {'state', 'exit', 'restarts'}, ...} ({} if purged).

  Raises:
    SlurmUnreachable: scontrol failed otherwise (a wait retries rather than concluding
      that every job is gone).
  """
  proc = run(['scontrol', 'show', 'job', '-o', job_id])
  if proc.returncode:
    if 'invalid job id' in (proc.stderr + proc.stdout).lower():
      return {}
    raise SlurmUnreachable(f'scontrol show job {job_id} failed: '
                           f'{(proc.stderr or proc.stdout).strip() or proc.returncode}')
  out = {}
  for line in proc.stdout.splitlines():
    fields = dict(kv.split('=', 1) for kv in line.split() if '=' in kv)
    info = {'state': fields.get('JobState', 'UNKNOWN'), 'exit': fields.get('ExitCode', ''),
            'restarts': fields.get('Restarts', '0')}
    task = fields.get('ArrayTaskId')
    if task and fields.get('ArrayJobId'):
      for t in _expand(task):
        out[f'{fields["ArrayJobId"]}_{t}'] = info
    else:
      out[fields.get('JobId', job_id)] = info
  return out


def array_id(job: str) -> str:
  """'123_4' -> '123' (the array a task belongs to; a plain job id is its own)."""
  return job.split('_')[0]


def live_jobs(entries: dict[str, dict[str, Any]], run: Run = run_command) -> dict[str, str]:
  """Point name -> job id, for status-file entries whose SLURM job is still queued or
  running (a second invocation waits on these instead of submitting them again)."""
  jobs = {n: e['job_id'] for n, e in entries.items()
          if e.get('backend') == 'slurm' and e.get('job_id')}
  states: dict[str, dict[str, str]] = {}
  for array in {array_id(j) for j in jobs.values()}:
    states.update(job_states(array, run))
  return {n: j for n, j in jobs.items()
          if j in states and states[j]['state'] not in TERMINAL}


def refresh(sweep: spec.Sweep, run: Run = run_command) -> None:
  """Brings status.json's submitted/running SLURM points up to date from scontrol (for
  `--status` on a sweep nobody waited for); a no-op where scontrol is not installed or
  the controller does not answer (the recorded states are shown then)."""
  entries = {n: e for n, e in status.read(sweep.dir).items()
             if e.get('backend') == 'slurm' and e.get('state') in ('submitted', 'running')}
  if not entries or not shutil.which('scontrol'):
    return
  states: dict[str, dict[str, str]] = {}
  try:
    for array in {array_id(e['job_id']) for e in entries.values()}:
      states.update(job_states(array, run))
  except SlurmUnreachable as e:
    print(f'warning: {e}; showing the last recorded states', file=sys.stderr)
    return
  points = {p.name: p for p in sweep.points}
  updates = {}
  for name, e in entries.items():
    info = states.get(e['job_id'], {'state': 'GONE', 'restarts': '0'})
    if info['state'] in TERMINAL or info['state'] == 'GONE':
      done = name in points and spec.is_finished(points[name])
      state = 'done' if done else 'failed'
    else:
      state = 'running' if info['state'] == 'RUNNING' else 'submitted'
    updates[name] = {'state': state, 'slurm_state': info['state'],
                     'restarts': int(info['restarts'])}
  status.update(sweep.dir, updates)


def _submit_arrays(sweep: spec.Sweep, options: dict[str, SlurmOptions],
                   todo: list[spec.Point], python: str, policy: status.RetryPolicy,
                   run: Run, out) -> dict[str, tuple[str, str]]:
  """Prepare jobs, then one array per distinct resource set; point name -> (job, log)."""
  sdir = script_dir(sweep.dir)
  logs = os.path.join(sdir, 'logs')
  os.makedirs(logs, exist_ok=True)  # sbatch does not create its --output directory.
  prepare_ids = []
  for adir, group in backends.prepare_groups(dataclasses.replace(sweep, points=todo)).items():
    first = group[0]
    # Prepare is one process: no GPUs, one node, the points' partition/account/setup.
    opts = dataclasses.replace(options[first.name], nodes=1, gpus_per_node=0)
    body = f'run_stage {shlex.quote(spec.prepare_command(sweep, first, python))}'
    name = f'prepare-{os.path.basename(adir)}'
    job = submit(batch_script(f'{sweep.name}-prepare', opts, [body], python,
                              policy.retries, logs), os.path.join(sdir, f'{name}.sh'), run)
    print(f'prepare {adir}: job {job} (shared by {len(group)} point(s))', file=out)
    prepare_ids.append(job)
  dependency = 'afterok:' + ':'.join(prepare_ids) if prepare_ids else ''
  by_opts: dict[SlurmOptions, list[spec.Point]] = {}
  for p in todo:
    by_opts.setdefault(options[p.name], []).append(p)
  jobs = {}
  for k, (opts, group) in enumerate(by_opts.items()):
    for p in group:
      spec.write_point_json(sweep, p)
    bodies = [point_body(sweep, p, python, opts.nodes) for p in group]
    job_name = f'{sweep.name}-points'
    array = submit(batch_script(job_name, opts, bodies, python, policy.retries, logs,
                                dependency, tasks_per_node(group[0], opts.nodes)),
                   os.path.join(sdir, f'points-{k}.sh'), run)
    print(f'{len(group)} point(s): job {array}', file=out)
    for i, p in enumerate(group):
      job = f'{array}_{i}' if len(group) > 1 else array
      jobs[p.name] = (job, os.path.join(logs, f'{job_name}-{job}.txt'))
  return jobs


def submit_sweep(sweep: spec.Sweep, flag_options: dict[str, Any], python: str,
                 policy: status.RetryPolicy, run: Run = run_command,
                 out=None) -> tuple[dict[str, str], list[backends.Outcome]]:
  """Checks the cluster, then submits every point neither finished nor already queued.

  Returns (point name -> SLURM job id of every point to wait for, outcomes of the points
  skipped because they are finished). Raises SweepError before submitting anything if a
  point's options cannot run on this cluster.
  """
  out = out or sys.stdout
  options = point_options(sweep, flag_options)
  check_cluster(sweep, options, run)
  live = live_jobs(status.read(sweep.dir), run)
  skipped = [backends.Outcome(p.name, 'skipped', detail='eval.json present')
             for p in sweep.points if spec.is_finished(p)]
  todo = [p for p in sweep.points if not spec.is_finished(p) and p.name not in live]
  for name in live:
    print(f'{name}: already queued as job {live[name]}; not submitted again', file=out)
  submitted = _submit_arrays(sweep, options, todo, python, policy, run, out) if todo else {}
  entries = {o.name: {'state': 'skipped'} for o in skipped}
  previous = status.read(sweep.dir)
  for name, (job, log) in submitted.items():
    entries[name] = {'backend': 'slurm', 'job_id': job, 'state': 'submitted', 'log': log,
                     'attempts': previous.get(name, {}).get('attempts', 0) + 1}
  status.update(sweep.dir, entries)
  return {**live, **{n: j for n, (j, _) in submitted.items()}}, skipped


def wait_jobs(jobs: dict[str, str], run: Run = run_command, poll_s: float = 10.0,
              out=None, unreachable_polls: int = 30) -> dict[str, dict[str, str]]:
  """Polls scontrol until every job (key -> job id) ends; key -> its last job info.

  A job scontrol no longer knows (purged after MinJobAge) has ended: state 'GONE'. An
  unreachable controller is retried for `unreachable_polls` polls in a row, then raised.
  """
  out = out or sys.stdout
  last: dict[str, dict[str, str]] = {}
  failures = 0
  while True:
    states: dict[str, dict[str, str]] = {}
    try:
      for array in sorted({array_id(j) for j in jobs.values()}):
        states.update(job_states(array, run))
    except SlurmUnreachable as e:
      failures += 1
      if failures >= unreachable_polls:
        raise
      print(f'  {e}; retrying in {poll_s:.0f}s', file=out, flush=True)
      time.sleep(poll_s)
      continue
    failures = 0
    pending = 0
    for key, job in jobs.items():
      info = states.get(job, {'state': 'GONE', 'exit': '', 'restarts': '0'})
      if info['state'] != last.get(key, {}).get('state'):
        print(f'  {key}: job {job} {info["state"]}', file=out, flush=True)
      last[key] = info
      pending += info['state'] not in TERMINAL and info['state'] != 'GONE'
    if not pending:
      return last
    time.sleep(poll_s)


def outcomes(sweep: spec.Sweep, jobs: dict[str, str],
             infos: dict[str, dict[str, str]]) -> list[backends.Outcome]:
  """Each waited-for point's outcome (done = final eval.json), recorded in status.json."""
  entries, result = {}, []
  logs = status.read(sweep.dir)
  for p in sweep.points:
    if p.name not in jobs:
      continue
    info = infos[p.name]
    if spec.is_finished(p):
      result.append(backends.Outcome(p.name, 'done'))
    else:
      log = logs.get(p.name, {}).get('log', '')
      result.append(backends.Outcome(
          p.name, 'failed', detail=f'  job {jobs[p.name]} ended {info["state"]} (exit '
          f'{info["exit"] or "?"}) without final results; log {log}'))
    entries[p.name] = {'state': result[-1].status, 'detail': result[-1].detail,
                       'slurm_state': info['state'], 'restarts': int(info['restarts'])}
  status.update(sweep.dir, entries)
  return result


def run_slurm(sweep: spec.Sweep, flag_options: dict[str, Any], python: str,
              policy: status.RetryPolicy, wait: bool = True, run: Run = run_command,
              poll_s: float = 10.0, out=None) -> list[backends.Outcome]:
  """Submits the sweep; with `wait`, waits for its jobs and returns every point's outcome
  (without: the skipped points' only; `status` shows the rest)."""
  out = out or sys.stdout
  jobs, skipped = submit_sweep(sweep, flag_options, python, policy, run, out)
  if not wait or not jobs:
    return skipped
  infos = wait_jobs(jobs, run, poll_s, out)
  return skipped + outcomes(sweep, jobs, infos)


def dry_run_commands(sweep: spec.Sweep, flag_options: dict[str, Any], python: str,
                     policy: status.RetryPolicy) -> list[tuple[str, str]]:
  """(comment, command) pairs: pasted into bash in order, they submit what `run_slurm`
  submits (every point; the arrays depend on the prepare jobs through $PREPARE_k)."""
  options = point_options(sweep, flag_options)
  logs = os.path.join(script_dir(sweep.dir), 'logs')
  out = [('sbatch does not create the job logs\' directory', f'mkdir -p {shlex.quote(logs)}')]
  groups = backends.prepare_groups(sweep)
  for k, (adir, group) in enumerate(groups.items()):
    opts = dataclasses.replace(options[group[0].name], nodes=1, gpus_per_node=0)
    body = f'run_stage {shlex.quote(spec.prepare_command(sweep, group[0], python))}'
    script = batch_script(f'{sweep.name}-prepare', opts, [body], python, policy.retries,
                          logs)
    out.append((f'prepare {adir} (shared by {len(group)} point(s))',
                f"PREPARE_{k}=$(sbatch --parsable <<'SCONE_EOF'\n{script}SCONE_EOF\n)"))
  dependency = ('--dependency=afterok:' + ':'.join(f'$PREPARE_{k}' for k in range(len(groups)))
                + ' --kill-on-invalid-dep=yes')
  by_opts: dict[SlurmOptions, list[spec.Point]] = {}
  for p in sweep.points:
    by_opts.setdefault(options[p.name], []).append(p)
  for opts, group in by_opts.items():
    bodies = [point_body(sweep, p, python, opts.nodes) for p in group]
    script = batch_script(f'{sweep.name}-points', opts, bodies, python, policy.retries, logs,
                          tasks_per_node=tasks_per_node(group[0], opts.nodes))
    out.append((f'{len(group)} point(s): {", ".join(p.name for p in group)}',
                f"sbatch {dependency} <<'SCONE_EOF'\n{script}SCONE_EOF"))
  return out
