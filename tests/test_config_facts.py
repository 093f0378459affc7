"""Facts derived once on the config (S, the stored-row rule, hashed's combine) and a check
that no module re-derives S from `fgram.use_size` itself."""

import ast
import pathlib

import pytest

from scone_jax import config

REPO = pathlib.Path(__file__).resolve().parents[1]
# Where the rule holds: the package (config.py itself excepted) and the benchmarks.
SCANNED = ('scone_jax', 'benchmarks')


def _cfg(**overrides):
  return config.replace(config.from_configdict(config.base_config()), **overrides)


def use_size_reads(source: str) -> list[int]:
  """Lines that read an attribute named use_size (x.use_size, getattr(x, 'use_size'))."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Attribute) and node.attr == 'use_size':
      lines.append(node.lineno)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and
          node.func.id in ('getattr', 'hasattr') and len(node.args) >= 2 and
          isinstance(node.args[1], ast.Constant) and node.args[1].value == 'use_size'):
      lines.append(node.lineno)
  return sorted(lines)


def test_the_scan_sees_every_form_of_a_read():
  source = ('a = cfg.fgram.use_size or cfg.fgram.size\n'
            "b = getattr(cfg.fgram, 'use_size')\n"
            "c = {'fgram.use_size': 5}  # an override key: not a read\n"
            'def f(use_size=0):\n  return use_size\n')
  assert use_size_reads(source) == [1, 2]


# The schema defines the fact (requested_rows, rows_used); the rules check the value.
CONFIG_FILES = {REPO / 'scone_jax' / name for name in ('config_schema.py', 'config_checks.py')}


def test_only_config_reads_use_size():
  files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob('*.py'))]
  assert len(files) > 50  # The scan reaches the package.
  offenders = [f'{p.relative_to(REPO)}:{line}' for p in files
               if p not in CONFIG_FILES
               for line in use_size_reads(p.read_text())]
  assert not offenders, ('read S through cfg.fgram.requested_rows / cfg.fgram.rows_used('
                         f'table_rows), not fgram.use_size: {offenders}')


def test_requested_rows_and_rows_used():
  whole = _cfg(**{'fgram.size': 1000})
  assert whole.fgram.requested_rows == 1000  # use_size=0: the whole mined size.
  assert whole.fgram.rows_used(400) == 400  # A table mined short of the size.
  assert whole.fgram.rows_used(1000) == 1000
  part = _cfg(**{'fgram.size': 1000, 'fgram.use_size': 300})
  assert part.fgram.requested_rows == 300
  assert part.fgram.rows_used(1000) == 300 and part.fgram.rows_used(200) == 200


@pytest.mark.parametrize('overrides,rule', [
    ({'fgram_model.num_layers': 1}, 'replace'),
    ({'fgram_model.num_layers': 1, 'fgram_model.combine': 'add'}, 'add'),
    ({'fgram_model.num_layers': 1, 'fgram_model.combine': 'gate'}, 'add'),
    ({'fgram_model.kind': 'table', 'fgram_model.combine': 'gate'}, 'add'),
    ({'fgram_model.kind': 'hashed', 'fgram_model.hash_buckets': 8}, 'add'),
])
def test_stored_rule(overrides, rule):
  assert _cfg(**overrides).fgram_model.stored_rule == rule


def test_hashed_derives_add_and_refuses_gate():
  hashed = _cfg(**{'fgram_model.kind': 'hashed', 'fgram_model.hash_buckets': 8})
  assert hashed.fgram_model.combine == 'add'
  assert _cfg(**{'fgram_model.kind': 'hashed', 'fgram_model.hash_buckets': 8,
                 'fgram_model.combine': 'add'}) == hashed  # Spelling it changes nothing.
  with pytest.raises(config.ConfigError, match="leave config.fgram_model.combine unset"):
    _cfg(**{'fgram_model.kind': 'hashed', 'fgram_model.hash_buckets': 8,
            'fgram_model.combine': 'gate'})
  # Leaving kind='hashed' re-derives combine: the derived 'add' does not stick.
  back = config.replace(hashed, **{'fgram_model.kind': 'network',
                                   'fgram_model.num_layers': 1})
  assert back.fgram_model.combine == 'replace'
