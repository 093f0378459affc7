"""The shipped paper sweeps reproduce the paper's grids, checked on their dry-run output.

Every number below is the paper's (Yu et al. 2025, WebText and OLMo tables): parameter
counts must print within 1%, and S, K, A_f size, token budget and seeds must match.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from scone_jax import config as config_lib
from scone_jax.model import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, G = 1e6, 1e9
GPT2_D = {'128m': 1024, '204m': 1024, '419m': 1536, '759m': 1536, '589m': 1536,
          '1099m': 1536}
GPT2_LAYERS = {'128m': 6, '204m': 12, '419m': 12, '759m': 24, '589m': 18, '1099m': 36}
GPT2_PARAMS = {'128m': 128 * M, '204m': 204 * M, '419m': 419 * M, '759m': 759 * M,
               '589m': 589 * M, '1099m': 1099 * M}
OLMO_PARAMS = {'0.7b': 711 * M, '1b': 1014 * M, '1.3b': 1316 * M, '1.9b': 1920 * M}
WEBTEXT_TOKENS, OLMO_TOKENS = 80 * G, 200 * G
MAIN = ('128m', '419m', '589m')


def gpt2_af(name, multiplier):
  """The paper's A_f size: multiplier x the backbone's non-embedding 12 d^2 L params."""
  return multiplier * 12 * GPT2_D[name] ** 2 * GPT2_LAYERS[name]


def row(params, af=0.0, s=0, k=5, tokens=WEBTEXT_TOKENS, seed=0):
  return {'accel_params': params, 'af_params': af, 'S': s, 'K': k, 'train_tokens': tokens,
          'seed': seed}


def expected_backbone_gpt2():
  return ([row(GPT2_PARAMS[n]) for n in GPT2_PARAMS] +
          [row(GPT2_PARAMS[n], gpt2_af(n, 1), 100 * M) for n in MAIN])


def expected_num_fgrams():
  grid = (512 * 1024, 1024 ** 2, 2 * 1024 ** 2, 4 * 1024 ** 2, 10 * M, 20 * M, 100 * M)
  return [r for n in MAIN for r in
          [row(GPT2_PARAMS[n])] + [row(GPT2_PARAMS[n], gpt2_af(n, 1), s) for s in grid]]


def expected_af_size():
  rows = [r for n in MAIN for r in [row(GPT2_PARAMS[n])] +
          [row(GPT2_PARAMS[n], gpt2_af(n, m), 100 * M) for m in (0.5, 1, 2, 3)]]
  # The paper's own A_f sizes for its 419M model: 170M (6 layers) and 1020M (36).
  assert sum(r['accel_params'] == 419 * M and r['af_params'] == pytest.approx(a, rel=0.01)
             for r in rows for a in (170 * M, 1020 * M)) == 2
  return rows


def expected_max_len():
  base, af = GPT2_PARAMS['419m'], gpt2_af('419m', 1)
  return ([row(base, seed=s) for s in range(3)] +
          [row(base, af, 20 * M, k, seed=s) for k in range(2, 9) for s in range(3)])


def expected_backbone_olmo():
  rows = [row(p, tokens=OLMO_TOKENS) for p in OLMO_PARAMS.values()]
  rows += [row(OLMO_PARAMS['1.3b'], af, 10 * M, tokens=OLMO_TOKENS) for af in (0.6 * G, 1.8 * G)]
  rows.append(row(OLMO_PARAMS['1b'], 1.8 * G, 1 * G, tokens=OLMO_TOKENS))
  return rows


EXPECTED = {'backbone_gpt2': expected_backbone_gpt2, 'num_fgrams': expected_num_fgrams,
            'af_size': expected_af_size, 'max_len': expected_max_len,
            'backbone_olmo': expected_backbone_olmo}
_SUFFIX = {'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12}


def parse_number(cell):
  """'418.7M' -> 418.7e6 (sweeps/tables.fmt_cell's SI cells)."""
  cell = cell.strip()
  if cell and cell[-1] in _SUFFIX:
    return float(cell[:-1]) * _SUFFIX[cell[-1]]
  return float(cell)


def parse_table(out):
  """The dry run's first table (the per-arm table follows it after a blank line)."""
  all_lines = out.splitlines()
  start = next(i for i, l in enumerate(all_lines) if l.startswith('| '))
  lines = []
  for l in all_lines[start:]:
    if not l.startswith('|'):
      break
    if l.startswith('| '):
      lines.append(l)
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  assert header[0] == 'run', out
  return [dict(zip(header, (c.strip() for c in l.strip('|').split('|')))) for l in lines[1:]]


def dry_run(name, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'scone_jax.sweeps', f'--sweep=experiments/sweeps/{name}.py',
       f'--root={tmp_path}', '--dry_run', '--downstream_tasks='],  # No task files here.
      cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.listdir(tmp_path)  # A dry run writes nothing.
  return proc.stdout


def _key(r):
  return (r['accel_params'], r['af_params'], r['S'], r['K'], r['seed'])


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_paper_sweep_dry_run_matches_paper_tables(name, tmp_path):
  out = dry_run(name, tmp_path)
  printed = [{k: parse_number(r[k]) for k in ('accel_params', 'af_params', 'S', 'K',
                                              'train_tokens', 'seed')}
             for r in parse_table(out)]
  expected = EXPECTED[name]()
  assert len(printed) == len(expected), out
  # Distinct sizes differ by far more than 2%, so sorting pairs each printed row with its
  # paper row whenever every value is within 1%.
  for got, want in zip(sorted(printed, key=_key), sorted(expected, key=_key)):
    for col in ('accel_params', 'af_params', 'train_tokens'):
      assert got[col] == pytest.approx(want[col], rel=0.01), (col, got, want)
    assert got['S'] == pytest.approx(want['S'], rel=1e-3), (got, want)
    assert (got['K'], got['seed']) == (want['K'], want['seed']), (got, want)


@pytest.mark.parametrize('spec,layers', [('experiments/gpt2.py:419m,af_layers=6', 6),
                                         ('experiments/gpt2.py:419m,af=3', 36),
                                         ('experiments/olmo.py:1b,af_layers=12', 12),
                                         ('experiments/olmo.py:1.3b,af_layers=36', 36),
                                         ('experiments/olmo.py:1b', 0)])
def test_af_set_by_layers_or_multiplier(spec, layers):
  cfg = _preset(spec)
  assert cfg.fgram_model.num_layers == layers
  assert cfg.has_fgram_side == bool(layers)
  assert (f'_af{layers}l' in cfg.name) == bool(layers)


@pytest.mark.parametrize('arg,match', [('1b,af=0.5,af_layers=3', 'twice'),
                                       ('1b,af=0.3', 'whole number of layers'),
                                       ('1b,af_layers=x', 'not a number'),
                                       ('1b,af_layers=-1', '>= 0')])
def test_af_arg_errors(arg, match):
  with pytest.raises(ValueError, match=match):
    _preset(f'experiments/olmo.py:{arg}')


def _preset(spec):
  path, _, arg = spec.partition(':')
  loaded = importlib.util.spec_from_file_location('preset', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(loaded)
  loaded.loader.exec_module(module)
  return config_lib.from_configdict(module.get_config(arg) if arg else module.get_config())


def test_af_layers_for():
  assert presets.af_layers_for(0.5, 12) == 6 and presets.af_layers_for(3, 12) == 36
  with pytest.raises(ValueError, match='af_layers'):
    presets.af_layers_for(0.5, 7)


def test_allow_embedded_does_not_change_what_prepare_builds(tmp_path):
  from scone_jax.sweeps import spec
  path = tmp_path / 'two.py'
  path.write_text("BASE_CONFIG = 'experiments/gpt2.py:128m'\n\ndef get_sweep():\n"
                  "  return [{'data.allow_embedded': True}, {'data.allow_embedded': False}]\n")
  sweep = spec.load_sweep(str(path), str(tmp_path / 'runs'))
  assert len({p.cfg.data.artifacts_dir for p in sweep.points}) == 1
