"""Studies: lr selection on validation only, paired intervals, the validation split."""

import json
import math
import os
import shlex

import pytest

from scone_jax import config as config_lib
from scone_jax import prepare
from scone_jax.corpus import CorpusError, build_embedded
from scone_jax.sweeps import spec, stats, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')
LRS = (1e-3, 2e-3, 4e-3)
# Validation loss is lowest at 2e-3 for the baseline and 4e-3 for SCONE; the TEST loss
# would pick the opposite ends. A selection that peeks at the test set picks wrong.
VALID = {('baseline', 1e-3): 3.0, ('baseline', 2e-3): 2.0, ('baseline', 4e-3): 2.5,
         ('scone', 1e-3): 3.0, ('scone', 2e-3): 2.6, ('scone', 4e-3): 2.2}
TEST = {k: 10.0 - v for k, v in VALID.items()}


def write_study(tmp_path, body=None, valid_fraction=0.05, name='mystudy'):
  path = tmp_path / f'{name}.py'
  path.write_text(body or (
      f'BASE_CONFIG = {TINY!r}\n'
      'def get_study():\n'
      "  return {'arms': {'baseline': {'fgram_model.num_layers': 0, "
      f"'data.embedded_valid_fraction': {valid_fraction}}}, "
      f"'scone': {{'data.embedded_valid_fraction': {valid_fraction}}}}}, "
      f"'learning_rates': {LRS!r}, 'seeds': (0, 1, 2)}}\n"))
  return str(path)


class Poisoned(dict):
  """A test-corpus result that fails the test if anything reads it."""

  def __getitem__(self, key):
    raise AssertionError(f'lr selection read a TEST corpus value ({key!r})')

  get = __getitem__


def arm_and_lr(overrides):
  arm = 'baseline' if overrides.get('fgram_model.num_layers') == 0 else 'scone'
  return arm, overrides['train.learning_rate']


def test_selection_reads_only_validation_corpora(tmp_path):
  s = study.load_study(write_study(tmp_path))
  assert s.baseline == 'baseline' and s.tune_seeds == (0,)
  tune = study.tune_sweep(s, str(tmp_path / 'runs'))
  assert len(tune.points) == 2 * len(LRS)
  records = {}
  for p in tune.points:
    key = arm_and_lr(p.overrides)
    records[p.name] = {'valid.stdlib': {'loss': VALID[key]},
                       'stdlib': Poisoned(loss=TEST[key])}
  sel = study.select_lrs(s, tune, records)
  assert sel.chosen == {'baseline': 2e-3, 'scone': 4e-3}
  assert sel.at_edge == {'baseline': False, 'scone': True}
  assert sel.validation_corpora == ['valid.stdlib']
  assert sel.grid['scone'][1e-3]['valid_loss'] == 3.0
  # A run without a validation result does not count; an arm with none cannot choose.
  records = {n: {'stdlib': {'loss': 1.0}} for n in records}
  with pytest.raises(spec.SweepError, match='no tuning run finished with a validation'):
    study.select_lrs(s, tune, records)


class FakeRunner:
  """Writes eval.json with the VALID/TEST losses above (seed shifts both)."""

  def __init__(self):
    self.trained = []

  def __call__(self, cmd, log):
    argv = shlex.split(cmd)
    if argv[2] != 'scone_jax.train':
      return 0
    args = dict(a[len('--config.'):].split('=', 1) for a in argv if a.startswith('--config.'))
    workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    self.trained.append(workdir)
    overrides = {'train.learning_rate': float(args['train.learning_rate'])}
    if args.get('fgram_model.num_layers') == '0':
      overrides['fgram_model.num_layers'] = 0
    key = arm_and_lr(overrides)
    seed = int(args['train.seed'])
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump({'step': 300, 'corpora': {
          'valid.stdlib': {'loss': VALID[key] + 0.01 * seed},
          'stdlib': {'loss': TEST[key] + 0.01 * seed, 'perplexity': math.exp(TEST[key]),
                     'bits_per_byte': 1.0, 'tokens': 100.0, 'fraction_evaluated': 1.0}}}, f)
    return 0


def test_run_study_tunes_then_compares_paired_seeds(tmp_path):
  s = study.load_study(write_study(tmp_path))
  runner = FakeRunner()
  record, outcomes = study.run_study(s, str(tmp_path / 'runs'), 'PY', runner=runner,
                                     out=open(os.devnull, 'w'))
  assert record['selection']['chosen'] == {'baseline': 2e-3, 'scone': 4e-3}
  # 6 tuning runs + 2 arms x 2 new seeds; seed 0 at the chosen lr is the tuning run.
  assert len(runner.trained) == 6 + 4 == len(set(runner.trained))
  assert all(o.status == 'done' for o in outcomes) and len(outcomes) == 10
  compare = record['compare_runs']
  assert set(compare) == {'baseline', 'scone'} and set(compare['scone']) == {'0', '1', '2'}
  tune_names = {p.name for p in study.tune_sweep(s, str(tmp_path / 'runs')).points}
  assert compare['scone']['0'] in tune_names and compare['scone']['1'] not in tune_names
  for arm, lr in (('baseline', 2e-3), ('scone', 4e-3)):
    for seed, name in compare[arm].items():
      point = json.load(open(tmp_path / 'runs' / 'mystudy' / name / 'point.json'))
      assert point['overrides']['train.learning_rate'] == lr
      assert point['overrides']['train.seed'] == int(seed)
  on_disk = study.read_study_json(str(tmp_path / 'runs' / 'mystudy'))
  assert on_disk['selection']['chosen'] == record['selection']['chosen']
  grid = {c['lr']: c['valid_loss'] for c in on_disk['selection']['grid']['baseline']}
  assert grid == {lr: VALID['baseline', lr] for lr in LRS}  # the full grid is recorded.
  # Rerun: every point is finished; nothing trains again.
  runner2 = FakeRunner()
  study.run_study(s, str(tmp_path / 'runs'), 'PY', runner=runner2, out=open(os.devnull, 'w'))
  assert runner2.trained == []


def test_study_needs_a_validation_split(tmp_path):
  s = study.load_study(write_study(tmp_path, valid_fraction=0.0))
  with pytest.raises(spec.SweepError, match='no validation corpus.*embedded_valid_fraction'):
    study.tune_sweep(s, str(tmp_path))
  bad = (f'BASE_CONFIG = {TINY!r}\ndef get_study():\n  return {{"arms": {{"a": '
         '{"train.learning_rate": 1.0}, "b": {}}, "learning_rates": [1e-3], "seeds": [0]}\n')
  with pytest.raises(spec.SweepError, match='study chooses the learning rate'):
    study.load_study(write_study(tmp_path, body=bad, name='bad'))
  nobase = (f'BASE_CONFIG = {TINY!r}\ndef get_study():\n  return {{"arms": {{"a": {{}}, '
            '"b": {}}, "learning_rates": [1e-3], "seeds": [0]}\n')
  with pytest.raises(spec.SweepError, match='no baseline arm'):
    study.load_study(write_study(tmp_path, body=nobase, name='nobase'))


def test_paired_interval_known_answer():
  # d = a - b per seed = [0.5, 1.0, 1.0]: mean 5/6, sample sd sqrt(1/12), n = 3, and
  # t(0.975, df=2) = 4.302652729749464 (tables), so half-width = 4.3026527 * sqrt(1/12) / sqrt(3).
  a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}  # seed 7 has no partner: dropped.
  b = {0: 0.5, 1: 1.0, 2: 2.0, 5: 0.0}
  d, seeds = stats.paired(a, b)
  half = 4.302652729749464 * math.sqrt(1 / 12) / math.sqrt(3)
  assert seeds == [0, 1, 2] and d.n == 3
  assert d.mean == pytest.approx(5 / 6)
  assert d.std == pytest.approx(math.sqrt(1 / 12))
  assert (d.lo, d.hi) == pytest.approx((5 / 6 - half, 5 / 6 + half))
  assert d.excludes_zero  # 0.833 - 0.717 > 0
  # Pairing matters: a seed effect shared by both arms cancels in the paired interval but
  # not in the unpaired one (the reason comparisons use the same seeds across arms).
  shared = {0: 0.0, 1: 5.0, 2: -5.0}
  scone = {s: v + 1.0 + 0.1 * s for s, v in shared.items()}
  d, _ = stats.paired(scone, shared)
  assert d.excludes_zero and d.hi - d.lo < 1.0
  assert stats.summarize(list(scone.values())).lo < 0 < stats.summarize(
      list(scone.values())).hi
  one = stats.summarize([3.0])
  assert one.n == 1 and math.isnan(one.lo) and not one.excludes_zero


def test_embedded_validation_split_is_disjoint(tmp_path):
  plain = build_embedded(str(tmp_path / 'plain'), 0.2, max_files=150)
  with_valid = build_embedded(str(tmp_path / 'valid'), 0.2, max_files=150,
                              valid_fraction=0.2)

  def modules(corpus, split):
    return {doc.source.split(':')[0] for doc in corpus.split(split)}
  train, test, valid = (modules(with_valid, s) for s in ('train', 'eval', 'valid'))
  assert valid and test and train
  assert not (train & test) and not (train & valid) and not (test & valid)
  # The test set is the same as without a validation split (its hash band is unchanged);
  # validation modules come out of train.
  assert test == modules(plain, 'eval')
  assert train | valid == modules(plain, 'train')
  assert 'valid' not in plain.sizes
  with pytest.raises(ValueError, match='data.embedded_valid_fraction'):
    plain.split('valid')
  with pytest.raises(ValueError, match='must be in'):
    build_embedded(str(tmp_path / 'bad'), 0.5, max_files=150, valid_fraction=0.6)


def test_valid_files_are_validation_corpora_disjoint_from_test(tmp_path):
  for name in ('train', 'test', 'val'):
    (tmp_path / f'{name}.txt').write_text('hello world\n')
  c = config_lib.base_config()
  c.data.source = 'files'
  c.data.train_files = str(tmp_path / 'train.txt')
  c.data.eval_files = f'prose={tmp_path / "test.txt"}'
  c.data.valid_files = f'prose={tmp_path / "val.txt"}'
  cfg = config_lib.from_configdict(c)
  corpora = prepare._corpora(cfg, str(tmp_path / 'a'), build=False)
  assert set(corpora.evals) == {'prose', 'valid.prose'}
  assert config_lib.is_validation_corpus('valid.prose')
  with pytest.raises(CorpusError, match='must not share files'):
    prepare._corpora(config_lib.replace(cfg, **{'data.valid_files': c.data.eval_files}),
                     str(tmp_path / 'a'), build=False)
  with pytest.raises(CorpusError, match='reserved for validation'):
    prepare._corpora(config_lib.replace(cfg, **{
        'data.eval_files': f'valid.x={tmp_path / "test.txt"}'}), str(tmp_path / 'a'),
        build=False)


@pytest.mark.parametrize('name', ['study', 'output_scale'])
def test_shipped_studies_validate(tmp_path, name):
  s = study.load_study(os.path.join(REPO, 'experiments', 'sweeps', f'{name}.py'))
  tune = study.tune_sweep(s, str(tmp_path))
  assert len(tune.points) == len(s.arms) * len(s.learning_rates) * len(s.tune_seeds)
  assert len(s.seeds) >= 3 and len(s.learning_rates) >= 3
  if name == 'study':  # lrs chosen on the mean of 2 tuning seeds (issue 28).
    assert len(s.tune_seeds) == 2
  assert len({p.cfg.data.artifacts_dir for p in tune.points}) == 1  # one prepare.
  if name == 'study':
    arms = {a: p.cfg for a, p in zip([t[0] for t in study.tune_plan(s)], tune.points)}
    sizes = sorted({c.fgram.requested_rows for c in arms.values() if c.has_fgram_side})
    assert len(sizes) >= 4 and sizes[-1] / sizes[0] >= 16
    assert len({c.fgram_model.num_layers for c in arms.values() if c.has_fgram_side}) >= 2
    assert not arms[s.baseline].has_fgram_side


def test_study_dry_run_cli(tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'scone_jax.sweeps',
                        '--sweep=experiments/sweeps/study.py', f'--root={tmp_path}',
                        '--dry_run'], cwd=REPO, capture_output=True, text=True, check=True)
  # Dry run: every arm's lr-grid commands (the seeds follow at the chosen lr).
  grid = spec.load_sweep_module(os.path.join(REPO, 'experiments/sweeps/study.py')).get_study()
  assert out.stdout.count('-m scone_jax.train ') == (
      len(grid['arms']) * len(grid['learning_rates']) * len(grid['tune_seeds']))
  assert "at each arm's chosen lr" in out.stdout
  assert not os.listdir(tmp_path)
  bad = subprocess.run([sys.executable, '-m', 'scone_jax.sweeps',
                        '--sweep=experiments/sweeps/study.py', f'--root={tmp_path}',
                        '--only=S=128'], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and 'drop --backend/--only' in bad.stderr


def test_two_tuning_seeds_choose_on_their_mean_never_on_test(tmp_path):
  """Seed 0 alone would choose 2e-3 for the baseline; seed 1 disagrees strongly, so the
  mean over both tuning seeds chooses 4e-3. Test-corpus values stay unread."""
  body = (f'BASE_CONFIG = {TINY!r}\n'
          'def get_study():\n'
          "  return {'arms': {'baseline': {'fgram_model.num_layers': 0, "
          "'data.embedded_valid_fraction': 0.05}, "
          "'scone': {'data.embedded_valid_fraction': 0.05}}, "
          f"'learning_rates': {LRS!r}, 'seeds': (0, 1, 2), 'tune_seeds': (0, 1)}}\n")
  s = study.load_study(write_study(tmp_path, body=body))
  assert s.tune_seeds == (0, 1)
  tune = study.tune_sweep(s, str(tmp_path / 'runs'))
  assert len(tune.points) == 2 * len(LRS) * 2
  shift = {('baseline', 2e-3): 0.9, ('baseline', 4e-3): -0.4}  # seed 1's change
  records = {}
  for p in tune.points:
    key = arm_and_lr(p.overrides)
    seed = p.overrides['train.seed']
    loss = VALID[key] + (shift.get(key, 0.0) if seed == 1 else 0.0)
    records[p.name] = {'valid.stdlib': {'loss': loss}, 'stdlib': Poisoned(loss=0.0)}
  sel = study.select_lrs(s, tune, records)
  assert sel.chosen == {'baseline': 4e-3, 'scone': 4e-3}
  cell = sel.grid['baseline'][2e-3]
  assert cell['valid_losses'] == [2.0, 2.9] and cell['finished'] == 2
  assert cell['valid_loss'] == pytest.approx(2.45)
  assert cell['valid_std'] == pytest.approx(math.sqrt(0.405))
  assert sel.grid['baseline'][4e-3]['valid_std'] == pytest.approx(math.sqrt(0.08))
