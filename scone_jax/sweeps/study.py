"""Studies: each arm's learning rate chosen on validation data, then paired seeds.

A study file (e.g. experiments/sweeps/study.py) defines `BASE_CONFIG` and `get_study()`
returning a dict:

  arms:            {arm name: override dict}; one arm is the baseline (no A_f)
  learning_rates:  the lr grid every arm is tuned over
  seeds:           the comparison seeds (>= 3 for intervals worth reading)
  tune_seeds:      seeds of the tuning grid (default: the first comparison seed)
  baseline:        the baseline arm's name (default: the arm with num_layers == 0 and
                   no other f-gram kind)

Running it (`python -m scone_jax.sweeps --sweep=FILE`) has two phases in one sweep dir:
1. tune: every arm x lr x tune seed; each arm's lr is the grid value with the lowest loss
   on the VALIDATION corpora (eval corpora named 'valid.*': data.embedded_valid_fraction
   or data.valid_files), mean over tune seeds and validation corpora. The test corpora
   are never read here (`validation_loss` sees only 'valid.*' entries).
2. compare: every arm x comparison seed at its chosen lr. The seed fixes the data order and
   the initialisation stream, so arm A's and arm B's runs at one seed are paired.
Points are named by their overrides, so a comparison point equal to a tuning point (same
arm, lr and seed) is that same run, trained once. The selection and the whole grid are
written to SWEEP_DIR/study.json, which the report reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from typing import Any, Mapping, Sequence

from scone_jax import artifacts
from scone_jax import config as config_lib
from scone_jax.sweeps import backends
from scone_jax.sweeps import spec

LR_KEY = 'train.learning_rate'
SEED_KEY = 'train.seed'
STUDY_JSON = 'study.json'


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  path: str
  base_config: str
  arms: dict[str, dict[str, Any]]
  learning_rates: tuple[float, ...]
  seeds: tuple[int, ...]
  tune_seeds: tuple[int, ...]
  baseline: str


def is_study_file(path: str) -> bool:
  return hasattr(spec.load_sweep_module(path), 'get_study')


def load_study(path: str) -> Study:
  """Loads and checks a study file; SweepError naming the problem and the fix."""
  module = spec.load_sweep_module(path)
  if not hasattr(module, 'get_study'):
    raise spec.SweepError(f'{path} defines no get_study(); a study file returns '
                          '{"arms": ..., "learning_rates": ..., "seeds": ...}')
  d = module.get_study()
  unknown = set(d) - {'arms', 'learning_rates', 'seeds', 'tune_seeds', 'baseline'}
  if unknown:
    raise spec.SweepError(f'{path}: get_study() has unknown keys {sorted(unknown)}')
  arms = dict(d.get('arms') or {})
  lrs = tuple(float(x) for x in d.get('learning_rates') or ())
  seeds = tuple(int(x) for x in d.get('seeds') or ())
  tune_seeds = tuple(int(x) for x in d.get('tune_seeds') or seeds[:1])
  if len(arms) < 2 or not lrs or not seeds:
    raise spec.SweepError(f'{path}: a study needs >= 2 arms, a non-empty learning_rates '
                          'grid and seeds')
  if len(set(lrs)) != len(lrs) or min(lrs) <= 0:
    raise spec.SweepError(f'{path}: learning_rates {lrs} must be distinct and > 0')
  for arm, overrides in arms.items():
    fixed = {LR_KEY, SEED_KEY} & set(overrides)
    if fixed:
      raise spec.SweepError(f'{path}: arm {arm!r} sets {sorted(fixed)}; the study chooses '
                            'the learning rate and the seeds, remove them from the arm')
  baseline = d.get('baseline') or next(
      (a for a, o in arms.items() if o.get('fgram_model.num_layers') == 0
       and o.get('fgram_model.kind', 'network') == 'network'), '')
  if baseline not in arms:
    raise spec.SweepError(f'{path}: no baseline arm; name it with "baseline": ARM or give '
                          "one arm {'fgram_model.num_layers': 0}")
  name = os.path.splitext(os.path.basename(path))[0]
  return Study(name, path, module.BASE_CONFIG, arms, lrs, seeds, tune_seeds, baseline)


def point_overrides(study: Study, arm: str, lr: float, seed: int) -> dict[str, Any]:
  return {**study.arms[arm], LR_KEY: lr, SEED_KEY: seed}


def _sweep(study: Study, root: str, points: list[dict], extra: dict | None) -> spec.Sweep:
  sweep = spec.build_sweep(study.name, study.path, study.base_config, points, root, extra)
  for p in sweep.points:
    if not has_validation_split(p.cfg):
      raise spec.SweepError(
          f'{study.path}: point {p.overrides} has no validation corpus, so its learning '
          'rate cannot be chosen without looking at the test set; set '
          'data.embedded_valid_fraction > 0 (embedded corpus) or data.valid_files')
  return sweep


def has_validation_split(cfg: config_lib.Config) -> bool:
  if cfg.data.source == 'embedded':
    return cfg.data.embedded_valid_fraction > 0
  return bool(cfg.data.valid_files.strip())


def tune_plan(study: Study) -> list[tuple[str, float, int]]:
  """(arm, lr, seed) of each tuning point, in the order of tune_sweep's points."""
  return [(a, lr, s) for a in study.arms for lr in study.learning_rates
          for s in study.tune_seeds]


def compare_plan(study: Study, chosen: Mapping[str, float]) -> list[tuple[str, float, int]]:
  """(arm, lr, seed) of each comparison point of the arms in `chosen` (study order)."""
  return [(a, chosen[a], s) for a in study.arms if a in chosen for s in study.seeds]


def tune_sweep(study: Study, root: str, extra: dict | None = None) -> spec.Sweep:
  """Phase 1: every arm x learning rate x tune seed."""
  return _sweep(study, root, [point_overrides(study, *t) for t in tune_plan(study)], extra)


def compare_sweep(study: Study, root: str, chosen: Mapping[str, float],
                  extra: dict | None = None) -> spec.Sweep:
  """Phase 2: every arm of `chosen` x comparison seed at the arm's chosen lr."""
  return _sweep(study, root, [point_overrides(study, *t)
                              for t in compare_plan(study, chosen)], extra)


def validation_loss(corpora: Mapping[str, Any]) -> float:
  """Mean loss over the VALIDATION corpora of one eval record (nan if none).

  Only 'valid.*' entries are read: test corpora never influence a selection.
  """
  losses = [float(corpora[n]['loss']) for n in sorted(corpora)
            if config_lib.is_validation_corpus(n)]
  return sum(losses) / len(losses) if losses else math.nan


@dataclasses.dataclass
class Selection:
  """The tuning grid and each arm's chosen learning rate.

  grid[arm][lr] = {'valid_loss': mean over tune seeds (nan if none finished),
                   'valid_losses': each finished tune seed's loss, in tune-seed order,
                   'valid_std': their sample standard deviation (nan below 2),
                   'runs': run names, 'finished': count}.
  """
  grid: dict[str, dict[float, dict[str, Any]]]
  chosen: dict[str, float]
  at_edge: dict[str, bool]  # The chosen lr is the grid's smallest or largest value.
  validation_corpora: list[str]


def select_lrs(study: Study, tune: spec.Sweep, records: Mapping[str, Mapping[str, Any]],
               arms: Sequence[str] | None = None) -> Selection:
  """Chooses each arm's lr from finished tuning runs' eval records (run name -> corpora).

  Args:
    study, tune: the study and its tuning sweep (tune_sweep).
    records: run name -> final eval corpora (finished runs only).
    arms: choose for these arms only (default: all); the grid covers every arm.

  Raises:
    SweepError: one of `arms` has no finished tuning run with a validation result.
  """
  grid: dict[str, dict[float, dict[str, Any]]] = {
      a: {lr: {'valid_loss': math.nan, 'valid_losses': [], 'valid_std': math.nan,
               'runs': [], 'finished': 0}
          for lr in study.learning_rates} for a in study.arms}
  losses: dict[tuple[str, float], list[float]] = {}
  corpora: set[str] = set()
  for (arm, lr, _), p in zip(tune_plan(study), tune.points, strict=True):
    key = (arm, lr)
    cell = grid[arm][lr]
    cell['runs'].append(p.name)
    record = records.get(p.name)
    if record is None:
      continue
    corpora |= {n for n in record if config_lib.is_validation_corpus(n)}
    loss = validation_loss(record)
    if math.isfinite(loss):
      cell['finished'] += 1
      losses.setdefault(key, []).append(loss)
  chosen, at_edge = {}, {}
  for arm in study.arms:
    for lr, cell in grid[arm].items():
      if (arm, lr) in losses:
        seeds_losses = losses[arm, lr]
        cell['valid_loss'] = sum(seeds_losses) / len(seeds_losses)
        cell['valid_losses'] = list(seeds_losses)
        if len(seeds_losses) > 1:
          cell['valid_std'] = statistics.stdev(seeds_losses)
    if arms is not None and arm not in arms:
      continue
    scored = [(c['valid_loss'], lr) for lr, c in grid[arm].items()
              if math.isfinite(c['valid_loss'])]
    if not scored:
      raise spec.SweepError(f'arm {arm!r}: no tuning run finished with a validation loss '
                            '(see the runs\' log.txt); nothing to choose from')
    chosen[arm] = min(scored)[1]
    at_edge[arm] = len(study.learning_rates) > 1 and chosen[arm] in (
        min(study.learning_rates), max(study.learning_rates))
  return Selection(grid, chosen, at_edge, sorted(corpora))


def selection_record(study: Study, selection: Selection, compare: spec.Sweep,
                     extra: Mapping[str, Any]) -> dict[str, Any]:
  """What study.json holds: arms, grid, chosen lrs and the comparison runs per arm/seed."""
  runs: dict[str, dict[str, str]] = {a: {} for a in study.arms}
  plan = compare_plan(study, selection.chosen)
  for (arm, _, seed), p in zip(plan, compare.points, strict=True):
    runs[arm][str(seed)] = p.name
  return {
      'study': study.name, 'study_file': study.path, 'base_config': study.base_config,
      'arms': study.arms, 'baseline': study.baseline, 'extra_overrides': dict(extra),
      'learning_rates': list(study.learning_rates), 'seeds': list(study.seeds),
      'tune_seeds': list(study.tune_seeds),
      'selection': {'metric': 'mean loss over the validation corpora (mean over tune seeds)',
                    'validation_corpora': selection.validation_corpora,
                    'chosen': selection.chosen, 'at_edge': selection.at_edge,
                    'grid': {a: [{'lr': lr, **c} for lr, c in cells.items()]
                             for a, cells in selection.grid.items()}},
      'compare_runs': runs}


def read_study_json(sweep_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(sweep_dir, STUDY_JSON)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def finished_records(sweep: spec.Sweep) -> dict[str, dict[str, Any]]:
  """Run name -> final eval corpora, for the sweep's finished points."""
  out = {}
  for p in sweep.points:
    result = spec.read_eval(p.workdir, p.cfg.train.steps)
    if result is not None:
      out[p.name] = result['corpora']
  return out


def run_study(study: Study, root: str, python: str = sys.executable, parallel: int = 1,
              extra: dict | None = None, runner: backends.Runner = backends.shell_runner,
              out=None) -> tuple[dict[str, Any], list[backends.Outcome]]:
  """Tunes, selects and compares, arm by arm (local backend).

  Arms run in the study file's order, pipelined: while arm k's grid trains, arm k-1's
  comparison seeds (its lr already chosen) train alongside, so slots stay busy and a
  partial run already holds finished arms. study.json is rewritten after every arm's
  selection, so the report works on partial results. Returns the last study.json record
  and every outcome.
  """
  out = out or sys.stdout
  extra = dict(extra or {})
  tune = tune_sweep(study, root, extra)  # Validates every tuning point first.
  tuned = {p.name for p in tune.points}
  by_arm = {a: [p for (arm, _, _), p in zip(tune_plan(study), tune.points) if arm == a]
            for a in study.arms}
  print(f'study {study.name}: {len(study.arms)} arm(s) x {len(study.learning_rates)} lr(s) '
        f'x {len(study.tune_seeds)} tune seed(s) chosen on the validation corpora, then '
        f'{len(study.seeds)} paired seed(s) per arm at its lr', file=out, flush=True)
  outcomes: list[backends.Outcome] = []
  selected: list[str] = []
  pending: list[spec.Point] = []
  record: dict[str, Any] = {}
  arms = list(study.arms)
  for i in range(len(arms) + 1):
    batch = pending + (by_arm[arms[i]] if i < len(arms) else [])
    if batch:
      outcomes += backends.run_local(dataclasses.replace(tune, points=batch), python,
                                     parallel, runner=runner, out=out)
    if i == len(arms):
      break
    try:
      selection = select_lrs(study, tune, finished_records(tune), selected + [arms[i]])
    except spec.SweepError as e:
      print(f'  {arms[i]}: {e}; its comparison seeds are skipped', file=out, flush=True)
      pending = []
      continue
    selected.append(arms[i])
    edge = ' (at the edge of the grid: widen it)' if selection.at_edge[arms[i]] else ''
    print(f'  {arms[i]}: lr {selection.chosen[arms[i]]:g} chosen on '
          f'{", ".join(selection.validation_corpora)}{edge}', file=out, flush=True)
    compare = compare_sweep(study, root, selection.chosen, extra)
    record = selection_record(study, selection, compare, extra)
    os.makedirs(compare.dir, exist_ok=True)
    artifacts.write_json_atomic(os.path.join(compare.dir, STUDY_JSON), record)
    new = set(record['compare_runs'][arms[i]].values()) - tuned
    pending = [p for p in compare.points if p.name in new]
  return record, outcomes


def dry_run(study: Study, root: str, python: str, extra: dict | None = None,
            out=None) -> None:
  """Prints the tuning phase's commands; the comparison phase depends on its results."""
  out = out or sys.stdout
  tune = tune_sweep(study, root, extra)
  backends.dry_run(tune, python, out=out)
  print(f'\n# then: {len(study.arms)} arm(s) x seeds {list(study.seeds)} at each arm\'s '
        'chosen lr (the same commands with --config.train.learning_rate=CHOSEN)', file=out)
