"""Sweeps as data: load a sweep file, validate every point, name it, build its commands.

A sweep file (experiments/sweeps/*.py) defines `BASE_CONFIG` ('experiments/gpt2.py:419m':
an experiment file plus its optional `get_config` argument) and `get_sweep()` returning a
list of override dicts with dotted keys ({'fgram.use_size': 1000, 'train.seed': 1}), and
optionally `DOWNSTREAM`, the tasks every point scores after evaluate
(downstream_stage.py), and `PROCESSES`, the processes each point's run needs (default 1;
the sweep CLI's --processes overrides it; `process_command`). This module turns that into
`Point`s: a validated `Config`, a stable run name and workdir, and shell-quoted command
lines. It never runs anything (see backends.py).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.machinery
import json
import os
import re
import shlex
import sys
import types
from typing import Any

from scone_jax import artifacts, cli, paths
from scone_jax import config as config_lib
from scone_jax.errors import UserError
from scone_jax.model import arm_accounting
from scone_jax.sweeps import downstream_stage

# Sections and keys that decide what `prepare` builds (tokenizer, token shards, f-gram
# table). Points that agree on these share one artifacts dir, so mining happens once.
# fgram.use_size only slices the mined table; miner/memory budget change how, not what.
_PREPARE_SECTIONS = ('data', 'tokenizer', 'fgram')
_PREPARE_IGNORED = ('data.artifacts_dir', 'fgram.use_size', 'fgram.miner',
                    'fgram.memory_budget_mb', 'data.allow_embedded',
                    'fgram.allow_short_table')
_NAME_MAX_CHARS = 100


class SweepError(UserError, ValueError):
  """A sweep file or one of its points is invalid; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: stable run name: readable overrides plus a hash of all of them.
    overrides: the point's own overrides (what the sweep file wrote, plus --set extras).
    launch_overrides: overrides passed on the command line: `overrides` plus launcher
      defaults (the shared artifacts dir), in a stable order.
    cfg: the validated, resolved Config the run will train.
    workdir: ROOT/SWEEP/NAME.
    downstream: what the point scores after evaluate (sweeps/downstream_stage.py), or
      None.
    processes: JAX processes every stage but prepare runs on (where a run executes, not
      what it computes: not part of the name, so a point may resume on another count).
  """
  name: str
  overrides: dict[str, Any]
  launch_overrides: dict[str, Any]
  cfg: config_lib.Config
  workdir: str
  downstream: downstream_stage.Downstream | None = None
  processes: int = 1


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  path: str
  base_config: str
  root: str
  points: list[Point]

  @property
  def dir(self) -> str:
    return _join(self.root, self.name)


def _join(root: str, *parts: str) -> str:
  # os.path.join would be fine for gs:// too, but keep one separator style explicitly.
  return '/'.join([root.rstrip('/'), *parts])


def _load_module(path: str, what: str) -> types.ModuleType:
  found = cli.find_file(path)  # The current directory first, then the repo root.
  if found is None:
    raise SweepError(cli.missing_file_message(path, what) +
                     ', e.g. experiments/sweeps/demo.py')
  path = found
  name = 'scone_sweep_' + re.sub(r'\W', '_', os.path.abspath(path))
  loader = importlib.machinery.SourceFileLoader(name, path)
  module = types.ModuleType(loader.name)
  module.__file__ = path
  sys.modules[name] = module  # dataclasses in the file need their module registered.
  loader.exec_module(module)
  return module


def load_base_config(spec: str) -> dict[str, Any]:
  """Loads 'experiments/X.py[:arg]' the way config_flags does; returns a plain dict."""
  path, _, arg = spec.partition(':')
  module = _load_module(path, 'base config file')
  if not hasattr(module, 'get_config'):
    raise SweepError(f'base config {path!r} defines no get_config(); experiment files '
                     'return a ConfigDict from get_config([arg])')
  cd = module.get_config(arg) if arg else module.get_config()
  return cd.to_dict() if hasattr(cd, 'to_dict') else dict(cd)


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any],
                    where: str) -> dict[str, Any]:
  """Returns a copy of `values` with dotted-key overrides set; unknown keys raise."""
  values = copy.deepcopy(values)
  for dotted, value in overrides.items():
    node = values
    *parents, leaf = dotted.split('.')
    for i, p in enumerate(parents):
      if not isinstance(node.get(p), dict):
        raise SweepError(f'{where}: unknown config key {dotted!r} ({".".join(parents[:i+1])!r} '
                         'is not a config section); see scone_jax/config.py for valid keys')
      node = node[p]
    if leaf not in node or isinstance(node[leaf], dict):
      valid = ', '.join(sorted(k for k, v in node.items() if not isinstance(v, dict)))
      raise SweepError(f'{where}: unknown config key {dotted!r}; valid keys in that '
                       f'section: {valid}')
    node[leaf] = value
  return values


def format_value(value: Any) -> str:
  """A config value as config_flags parses it from `--config.key=VALUE`."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (int, str)):
    return str(value)
  raise SweepError(f'override value {value!r} has type {type(value).__name__}; sweep values '
                   'must be bool, int, float or str')


def parse_set(items: list[str]) -> dict[str, Any]:
  """['train.steps=3', 'data.eval_files=a b'] -> {'train.steps': 3, ...}."""
  out = {}
  for item in items:
    key, sep, raw = item.partition('=')
    if not sep or not key:
      raise SweepError(f'--set={item!r} must look like KEY=VALUE, e.g. --set=train.steps=3')
    try:
      value = ast.literal_eval(raw)
    except (SyntaxError, ValueError):
      value = raw
    out[key] = value
  return out


def run_name(overrides: dict[str, Any], config_fingerprint: str = '') -> str:
  """Stable, filesystem-safe name: 'fgram.use_size=1000,train.seed=1-<hash8>'.

  The readable part may be truncated; the hash covers every override (key order does not
  matter) and the resolved config's fingerprint, so two different points never share a
  name, and editing the base experiment file gives new runs instead of skipping stale ones.
  """
  digest = artifacts.fingerprint(sorted(overrides.items()), config_fingerprint)[:8]
  readable = ','.join(f'{k}={format_value(v)}' for k, v in sorted(overrides.items()))
  readable = re.sub(r'[^A-Za-z0-9._=,+-]', '_', readable)[:_NAME_MAX_CHARS] or 'base'
  return f'{readable}-{digest}'


def prepare_fingerprint(cfg: config_lib.Config) -> str:
  """Fingerprint of what `prepare` builds for cfg (ignores slicing and miner choice)."""
  sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in _PREPARE_SECTIONS}
  for dotted in _PREPARE_IGNORED:
    section, key = dotted.split('.')
    sections[section].pop(key)
  return artifacts.fingerprint(sections)


def load_sweep(path: str, root: str, extra_overrides: dict[str, Any] | None = None,
               only: str = '', downstream: dict[str, Any] | None = None,
               processes: int | None = None) -> Sweep:
  """Loads and validates a whole sweep; raises SweepError before anything can launch.

  Args:
    path: the sweep file.
    root: runs go to ROOT/SWEEP_NAME/RUN_NAME (a local path or gs://...).
    extra_overrides: applied to every point after its own (e.g. --set=train.steps=3);
      they are part of each run name.
    only: keep points whose run name matches this regex (all points are still validated).
    downstream: keys overriding the sweep file's DOWNSTREAM dict (downstream_stage.py).
    processes: overrides the sweep file's PROCESSES (processes per point; default 1).
  """
  module = load_sweep_module(path)
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'sweep file {path!r} defines no get_sweep; a sweep file defines '
                     "BASE_CONFIG = 'experiments/X.py[:arg]' and get_sweep() -> list of "
                     'override dicts with dotted keys (or get_study(): see '
                     'scone_jax/sweeps/study.py)')
  points_overrides = module.get_sweep()
  if not isinstance(points_overrides, list) or not all(
      isinstance(p, dict) for p in points_overrides):
    raise SweepError(f'{path}: get_sweep() must return a list of dicts, got '
                     f'{type(points_overrides).__name__}')
  name = os.path.splitext(os.path.basename(path))[0]
  settings = {**getattr(module, 'DOWNSTREAM', {}), **(downstream or {})}
  try:
    ds = downstream_stage.from_settings(settings, path)
  except downstream_stage.DownstreamSettingError as e:
    raise SweepError(str(e)) from e
  return build_sweep(name, path, module.BASE_CONFIG, points_overrides, root,
                     extra_overrides, only, ds,
                     getattr(module, 'PROCESSES', 1) if processes is None else processes)


def load_sweep_module(path: str) -> types.ModuleType:
  """Loads a sweep file; SweepError if it has no BASE_CONFIG."""
  module = _load_module(path, 'sweep file')
  if not hasattr(module, 'BASE_CONFIG'):
    raise SweepError(f'sweep file {path!r} defines no BASE_CONFIG; a sweep file defines '
                     "BASE_CONFIG = 'experiments/X.py[:arg]' and get_sweep() -> list of "
                     'override dicts with dotted keys')
  return module


def build_sweep(name: str, path: str, base_config: str, points_overrides: list[dict],
                root: str, extra_overrides: dict[str, Any] | None = None,
                only: str = '', downstream: downstream_stage.Downstream | None = None,
                processes: int = 1) -> Sweep:
  """Validates and names the points of `points_overrides` (see load_sweep)."""
  if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
    raise SweepError(f'{path}: PROCESSES / --processes={processes!r} must be an int >= 1 '
                     '(the JAX processes each point runs on)')
  base = load_base_config(base_config)
  points, seen = [], {}
  for i, own in enumerate(points_overrides):
    overrides = {**own, **(extra_overrides or {})}
    where = f'{path} point {i} {own}'
    for value in overrides.values():
      format_value(value)
    values = apply_overrides(base, overrides, where)
    try:
      cfg = config_lib.from_configdict(values)
    except config_lib.ConfigError as e:
      raise SweepError(f'{where}: {e}') from e
    launch = dict(overrides)
    if not cfg.data.artifacts_dir:
      launch['data.artifacts_dir'] = _join(root, 'prepare', prepare_fingerprint(cfg))
      cfg = config_lib.replace(cfg, **{'data.artifacts_dir': launch['data.artifacts_dir']})
    # The artifacts dir follows --root; the run's identity must not.
    rname = run_name(overrides, artifacts.fingerprint(
        dataclasses.asdict(config_lib.replace(cfg, **{'data.artifacts_dir': ''}))))
    if rname in seen:
      raise SweepError(f'{path}: points {seen[rname]} and {i} have identical overrides '
                       f'{own}; remove the duplicate')
    seen[rname] = i
    if cfg.train.batch_size % processes:  # validate_runtime's rule, before any launch.
      raise SweepError(f'{where}: train.batch_size={cfg.train.batch_size} is not divisible '
                       f'by the {processes} processes (each reads an equal slice of every '
                       'batch); change PROCESSES/--processes or the batch size')
    points.append(Point(rname, overrides, launch, cfg, _join(root, name, rname),
                        downstream, processes))
  if only:
    points = [p for p in points if re.search(only, p.name)]
  return Sweep(name, path, base_config, root, points)


# Stages whose CLI takes the experiment config; the others read the run's W/config.json.
CONFIG_STAGES = ('prepare', 'train')


def command(sweep: Sweep, point: Point, python: str, stage: str = 'train',
            extra: dict[str, Any] | None = None) -> str:
  """The shell command running `python -m scone_jax.<stage>` for a point.

  Every argument is shell-quoted, so values with spaces, quotes, `$` or `;` reach the
  program unchanged. Stages after train (evaluate, export, generate) take only the
  workdir: the run's resolved config.json is the source of truth there.
  """
  args = [python, '-m', f'scone_jax.{stage}', f'--workdir={point.workdir}']
  if stage in CONFIG_STAGES:
    args.insert(3, f'--config={sweep.base_config}')
    for key, value in {**point.launch_overrides, **(extra or {})}.items():
      args.append(f'--config.{key}={format_value(value)}')
  return _quote(args)


def _quote(argv: list[str]) -> str:
  return ' '.join(shlex.quote(a) for a in argv)


def process_command(cmd: str, process_id: int, num_processes: int,
                    coordinator_address: str) -> str:
  """A stage's command (train, export or downstream: the entry points that take
  --config.distributed.*) as process `process_id` of `num_processes`, all meeting at
  `coordinator_address` (host:port, served by process 0)."""
  return cmd + ' ' + _quote(['--config.distributed.mode=explicit',
                             f'--config.distributed.coordinator_address={coordinator_address}',
                             f'--config.distributed.num_processes={num_processes}',
                             f'--config.distributed.process_id={process_id}'])


def process_env(process_id: int, num_processes: int,
                environ: dict[str, str]) -> dict[str, str]:
  """What process `process_id` of a point adds to the launcher's environment: its equal
  share of CUDA_VISIBLE_DEVICES where that lists the GPUs (two JAX processes must not
  both claim every GPU of the host); {} otherwise (CPU processes take their device count
  from XLA_FLAGS, TPU hosts run one process each).

  Raises:
    SweepError: the listed GPUs do not split equally between the processes.
  """
  visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if not visible or num_processes == 1:
    return {}
  if len(visible) % num_processes:
    raise SweepError(f'CUDA_VISIBLE_DEVICES={",".join(visible)} lists {len(visible)} GPUs, '
                     f'which do not split equally between {num_processes} processes per '
                     'point; list a multiple of the process count, or change --processes')
  share = len(visible) // num_processes
  return {'CUDA_VISIBLE_DEVICES': ','.join(visible[process_id * share:
                                                   (process_id + 1) * share])}


def process_log(workdir: str, process_id: int) -> str:
  """Where a stage's process appends its output: W/log.txt for process 0 (the point's
  log, as on one process), W/log.process<i>.txt for the others."""
  return os.path.join(workdir, 'log.txt' if process_id == 0 else
                      f'log.process{process_id}.txt')


def prepare_command(sweep: Sweep, point: Point, python: str) -> str:
  """The shared prepare of `point`'s artifacts group. It builds the table for the whole
  group, so it does not judge one point's S: each point's train checks its own S against
  the mined rows (prepare.check_table_rows) and only a point asking for more fails."""
  return command(sweep, point, python, 'prepare', extra={'fgram.allow_short_table': True})


def read_eval(workdir: str, steps: int) -> dict[str, Any] | None:
  """W/eval.json if it holds final results (step >= steps, >= 1 corpus), else None.

  The train loop may also write eval.json at `train.eval_every`: those intermediate
  results do not make a point finished.
  """
  try:
    result = json.loads(paths.read_text(paths.join(workdir, 'eval.json')))
  except (OSError, json.JSONDecodeError):
    return None
  if not isinstance(result, dict) or not result.get('corpora'):
    return None
  return result if int(result.get('step', -1)) >= steps else None


def is_finished(point: Point) -> bool:
  """True when the point needs nothing: eval.json holds its final results and, if it
  scores downstream tasks, downstream.json holds them for every path."""
  return (read_eval(point.workdir, point.cfg.train.steps) is not None and
          all(stage_done(point, f'downstream:{path}')
              for path in (point.downstream.paths_for(point.cfg) if point.downstream else ())))


def after_evaluate(point: Point, python: str) -> list[tuple[str, str, str]]:
  """(stage, command, check) for the stages after evaluate, in order: for path 'store'
  the export, then one downstream command per path. `check` is a shell command that
  exits 0 when the stage has nothing left to do (`stage_done` in a shell)."""
  ds = point.downstream
  if ds is None:
    return []
  steps, out = point.cfg.train.steps, []
  for path in ds.paths_for(point.cfg):
    check = downstream_stage.done_check_command(python, point.workdir, ds, path, steps)
    if path == 'store':  # The store path reads the export; it is not needed once scored.
      out.append(('export', _quote([python, '-m', 'scone_jax.export',
                                    f'--workdir={point.workdir}']), check))
    out.append((f'downstream:{path}',
                downstream_stage.command(python, point.workdir, ds, path), check))
  return out


def after_evaluate_shell(point: Point, python: str) -> str:
  """The after-evaluate stages as one shell fragment ('' if none), each skipped when
  its check passes, for backends that run a point as one command (TPU, xpk)."""
  return ''.join(f' && {{ {check} || {cmd}; }}'
                 for _, cmd, check in after_evaluate(point, python))


def stage_done(point: Point, stage: str) -> bool:
  """For a stage of `after_evaluate`: whether it has nothing left to do."""
  path = 'store' if stage == 'export' else stage.split(':', 1)[1]
  return downstream_stage.done(point.workdir, point.downstream, path, point.cfg.train.steps)


def write_point_json(sweep: Sweep, point: Point) -> None:
  """Records how the point was launched (the report reads it back)."""
  paths.makedirs(point.workdir)
  artifacts.write_json_atomic(paths.join(point.workdir, 'point.json'), {
      'sweep': sweep.name, 'sweep_file': sweep.path, 'base_config': sweep.base_config,
      'name': point.name, 'overrides': point.overrides,
      'launch_overrides': point.launch_overrides, 'processes': point.processes,
      'config': json.loads(point.cfg.to_json())})


def accounting_rows(sweep: Sweep,
                    af_tokens_per_token: float | None = None) -> list[dict[str, Any]]:
  """Per point: accelerator-resident and offloaded params, train/inference FLOPs/token
  (A_f at the worst case, and at a measured A_f tokens per main-model token if given):
  arm_accounting.run_columns, the columns results.csv has for the finished run."""
  return [{'run': p.name,
           **arm_accounting.run_columns(arm_accounting.account(p.cfg,
                                                               measured=af_tokens_per_token)),
           'seed': p.cfg.train.seed} for p in sweep.points]


def arm_rows(sweep: Sweep) -> list[dict[str, Any]]:
  """Per point: the arm's accelerator memory and params in training and at inference,
  its offloaded host store and FLOPs/token (arm_accounting.arm_columns, REPORT.md's
  per-arm table)."""
  return [{'run': p.name, **arm_accounting.arm_columns(arm_accounting.account(p.cfg))}
          for p in sweep.points]
