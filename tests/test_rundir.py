"""A run directory reopens anywhere: W/run.json, weights-only restore, no corpus, no train/.

Fast: a copy of the shared reference run, moved and reopened with every raw-corpus reader
made to fail, evaluates, exports and generates exactly as the original. Slow: a run with
model.vocab_size=600 over a 512-piece tokenizer whose corpus is deleted and whose
directory (artifacts inside) is moved, then evaluate / export / generate.
"""

import ast
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

import train_helpers as th
from scone_jax import run as run_lib

compile_cache = th.compile_cache
REPO = pathlib.Path(__file__).resolve().parent.parent


def _outputs(workdir: str) -> dict:
  """evaluate, export and greedy generation of the run at `workdir`."""
  from scone_jax import evaluate as evaluate_lib, generate
  from scone_jax.export.export import export_store
  from scone_jax import restore
  from scone_jax.serve import EmbeddingStore
  record = evaluate_lib.evaluate(workdir)
  # The host decode loop: main's device loop does not compile on an 8-device CPU mesh yet.
  cfg = restore.run_config(workdir, {'serve.max_new_tokens': 5, 'serve.temperature': 0.0,
                                     'serve.decode_loop': 'host'})
  out = {'eval': record}
  if cfg.has_fgram_side:
    path = export_store(cfg, workdir, progress=False)
    store = EmbeddingStore.open(path, 'ram')
    out['rows'] = store.gather(np.arange(store.num_rows)).view(np.uint16)
  out['texts'] = generate.generate(cfg, workdir, ['the of and', 'w1 w2']).texts
  return out


def _assert_same(a: dict, b: dict) -> None:
  assert a['eval'] == b['eval']
  assert a['texts'] == b['texts']
  if 'rows' in a:
    np.testing.assert_array_equal(a['rows'], b['rows'])


def test_run_json_records_what_readers_need(tmp_path_factory):
  cfg, workdir = th.reference_run(str(tmp_path_factory.getbasetemp()))
  run = run_lib.RunDir(workdir)
  info = run.info()
  assert info['vocab_size'] == 512 and info['fgram_max_len'] == cfg.fgram.max_len
  assert info['checkpoint_steps'] == run.checkpoint_steps() == [2, 4]
  assert run.tokenizer().fingerprint == info['tokenizer']['fingerprint']
  assert run.table().fingerprint == info['fgram_table']['fingerprint']
  assert set(run.eval_shards()) == {'heldout'}
  assert set(info['train_shards']) == {'location', 'fingerprint'}


def test_moved_run_reopens_without_the_corpus(tmp_path, tmp_path_factory, monkeypatch):
  _, workdir = th.reference_run(str(tmp_path_factory.getbasetemp()))
  original = str(tmp_path / 'original')
  shutil.copytree(workdir, original)
  want = _outputs(original)
  moved = str(tmp_path / 'elsewhere' / 'run')
  shutil.copytree(workdir, moved)
  shutil.rmtree(os.path.join(moved, 'export'), ignore_errors=True)
  os.remove(os.path.join(moved, 'eval.json'))
  from scone_jax.corpus import readers

  def no_corpus(*args, **kwargs):
    raise AssertionError('a reader of a finished run touched the raw corpus')
  monkeypatch.setattr(readers, '_file_identity', no_corpus)
  monkeypatch.setattr(readers.FileCorpus, '__iter__', no_corpus)
  monkeypatch.setattr(readers, 'expand_globs', no_corpus)
  _assert_same(_outputs(moved), want)


def test_missing_run_record_is_a_clear_error(tmp_path, tmp_path_factory):
  from scone_jax import evaluate as evaluate_lib
  _, workdir = th.reference_run(str(tmp_path_factory.getbasetemp()))
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  os.remove(os.path.join(run, 'run.json'))
  with pytest.raises(run_lib.RunError, match='run.json does not exist'):
    evaluate_lib.evaluate(run)


@pytest.mark.slow
def test_vocab_600_run_with_its_corpus_deleted_and_moved(tmp_path):
  """model.vocab_size=600 over a 512-piece tokenizer: evaluate, export, generate and the
  accounting use the trained size, before and after the corpus goes and W moves."""
  from scone_jax import generate
  from scone_jax import restore
  from scone_jax.serve.accounting import account
  from scone_jax.train import loop
  corpus = str(tmp_path / 'corpus')
  th.write_corpus(corpus, num_train_docs=400)
  cfg = th.micro_config(corpus, **{'model.vocab_size': 600, 'model.max_seq_len': 64})
  workdir = str(tmp_path / 'run')
  loop.train(cfg, workdir)
  assert run_lib.RunDir(workdir).vocab_size == 600
  want = _outputs(workdir)
  serve_cfg = restore.run_config(workdir, {'serve.decode_loop': 'host'})
  run, decoder = generate.build_decoder(serve_cfg, workdir)
  assert run.lm.backbone.token_embed.table[...].shape[0] == 600
  assert account(serve_cfg, decoder, run.vocab_size).table()
  shutil.rmtree(corpus)
  moved = str(tmp_path / 'moved' / 'run')
  shutil.move(workdir, moved)
  for name in ('eval.json', 'export'):
    shutil.rmtree(os.path.join(moved, name), ignore_errors=True)
    if os.path.exists(os.path.join(moved, name)):
      os.remove(os.path.join(moved, name))
  _assert_same(_outputs(moved), want)


# ---- layering ---------------------------------------------------------------------------

def _imports(path: pathlib.Path) -> set[str]:
  """Every scone_jax module `path` imports (module level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith('scone_jax'))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.startswith('scone_jax'):
        out.add(node.module)
        # `from scone_jax import run` imports the module scone_jax.run.
        out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


def _module_file(name: str) -> pathlib.Path | None:
  base = REPO.joinpath(*name.split('.'))
  for candidate in (base.with_suffix('.py'), base / '__init__.py'):
    if candidate.exists():
      return candidate
  return None


def _closure(start: str) -> dict[str, str]:
  """{module reached: the module that imported it} from `start`, transitively."""
  seen, todo = {start: ''}, [start]
  while todo:
    name = todo.pop()
    path = _module_file(name)
    if path is None:
      continue
    parts = name.split('.')
    parents = ['.'.join(parts[:i]) for i in range(2, len(parts))]  # Package __init__s.
    for dep in _imports(path) | set(parents):
      if _module_file(dep) is not None and dep not in seen:
        seen[dep] = name
        todo.append(dep)
  return seen


def _readers() -> list[str]:
  mods = ['scone_jax.evaluate', 'scone_jax.generate', 'scone_jax.restore', 'scone_jax.run']
  for pkg in ('serve', 'export'):
    for f in sorted((REPO / 'scone_jax' / pkg).glob('*.py')):
      mods.append(f'scone_jax.{pkg}' + ('' if f.stem == '__init__' else f'.{f.stem}'))
  return mods


@pytest.mark.parametrize('module', _readers())
def test_readers_of_a_run_never_import_train(module):
  reached = _closure(module)
  bad = sorted(m for m in reached if m == 'scone_jax.train' or
               m.startswith('scone_jax.train.'))
  chains = []
  for m in bad[:1]:
    chain = [m]
    while reached[chain[-1]]:
      chain.append(reached[chain[-1]])
    chains.append(' <- '.join(chain))
  assert not bad, f'{module} imports the train package: {chains}'


def test_the_layering_check_sees_an_import_of_train():
  """The check itself: the train loop does reach scone_jax.train modules."""
  assert 'scone_jax.train.step' in _closure('scone_jax.train.loop')
  assert 'scone_jax.train' in _closure('scone_jax.train.__main__')


def test_nothing_inserts_into_sys_path():
  """Modules are imported as the package (pip install -e . or PYTHONPATH), never by
  editing sys.path."""
  offenders = []
  for folder in ('scone_jax', 'launch', 'experiments', 'tests', 'benchmarks'):
    for path in sorted((REPO / folder).rglob('*.py')):
      for node in ast.walk(ast.parse(path.read_text())):
        target = node.func.value if (isinstance(node, ast.Call) and
                                     isinstance(node.func, ast.Attribute)) else None
        if (isinstance(target, ast.Attribute) and target.attr == 'path' and
            isinstance(target.value, ast.Name) and target.value.id == 'sys'):
          offenders.append(f'{path.relative_to(REPO)}:{node.lineno}')
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            'sys.path.insert' in node.value or 'sys.path.append' in node.value):
          offenders.append(f'{path.relative_to(REPO)}:{node.lineno} (in a string)')
  # This file names the calls in its own strings above.
  offenders = [o for o in offenders if not o.startswith('tests/test_rundir.py')]
  assert not offenders, offenders
