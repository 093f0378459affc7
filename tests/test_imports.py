"""The package's import graph has no cycles, function-level imports included.

A cycle hidden behind a deferred import still couples the two modules: neither can be
understood, tested or moved without the other. Every import statement anywhere in a
module (top level, function, TYPE_CHECKING block) is an edge; each strongly connected
component of the graph must be a single module.
"""

import ast
import re
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'scone_jax'


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for f in PACKAGE.rglob('*.py'):
    parts = f.relative_to(PACKAGE.parent).with_suffix('').parts
    name = '.'.join(parts)
    mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = f
  return mods


def _edges(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  graph = {}
  for name, f in mods.items():
    pkg = name if f.name == '__init__.py' else name.rsplit('.', 1)[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          up = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
          base = '.'.join(up + ([base] if base else []))
        # `from pkg import mod` imports pkg.mod when it is a module, else a name of pkg.
        candidates = [base] + [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      for c in candidates:
        while c and c not in mods:
          c = c.rsplit('.', 1)[0] if '.' in c else ''
        # A module importing its own package (or its parent's __init__) is not an edge
        # back to itself.
        if c and c != name and not name.startswith(c + '.'):
          out.add(c)
    graph[name] = out
  return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's strongly connected components (iterative)."""
  index, low, on_stack, stack, comps = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      v, it = work[-1]
      w = next(it, None)
      if w is None:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
          comp = []
          while True:
            x = stack.pop()
            on_stack.discard(x)
            comp.append(x)
            if x == v:
              break
          comps.append(sorted(comp))
      elif w not in index:
        index[w] = low[w] = counter
        counter += 1
        stack.append(w)
        on_stack.add(w)
        work.append((w, iter(sorted(graph[w]))))
      elif w in on_stack:
        low[v] = min(low[v], index[w])
  return comps


def test_components_of_a_known_graph():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert sorted(_components(graph)) == [['a', 'b', 'c'], ['d'], ['e']]


def test_the_graph_sees_function_level_imports(tmp_path):
  mods = {'p.x': tmp_path / 'x.py', 'p.y': tmp_path / 'y.py'}
  mods['p.x'].write_text('def f():\n  from p import y\n')
  mods['p.y'].write_text('from p.x import f\n')
  assert _edges(mods) == {'p.x': {'p.y'}, 'p.y': {'p.x'}}


def test_no_import_cycles_in_the_package():
  graph = _edges(_modules())
  assert len(graph) > 50  # The whole package was read.
  cycles = [c for c in _components(graph) if len(c) > 1]
  assert not cycles, 'import cycles (move the shared piece down a layer): ' + '; '.join(
      ' <-> '.join(c) for c in cycles)


def _layers() -> list[list[str]]:
  """ARCHITECTURE.md's layer table: one list of entries per layer, lowest first. An entry
  is a module (`run`), a package (`train/`, every module under it) or a module path
  (`export/format`); parentheses are comments."""
  text = (PACKAGE.parent / 'ARCHITECTURE.md').read_text()
  block = text.split('\nLayers (', 1)[1].split('```\n', 1)[1].split('```', 1)[0]
  layers = []
  for line in block.strip().splitlines():
    number, rest = line.split(None, 1)
    assert int(number) == len(layers), line
    rest = re.sub(r'\([^)]*\)', '', rest)
    layers.append([e.strip() for e in rest.split(',') if e.strip()])
  return layers


def _layer_of(module: str, layers: list[list[str]]) -> int:
  """The layer of the most specific entry naming `module` (scone_jax.a.b)."""
  rel = module.split('.', 1)[1].replace('.', '/') if '.' in module else ''
  best, best_len = None, -1
  for i, entries in enumerate(layers):
    for e in entries:
      key = e.rstrip('/')
      hit = rel == key or rel.startswith(key + '/')
      if hit and len(key) > best_len:
        best, best_len = i, len(key)
  assert best is not None, f'{module} is in no layer of ARCHITECTURE.md'
  return best


def test_architecture_layers_match_the_imports():
  layers = _layers()
  assert len(layers) >= 5
  graph = _edges(_modules())
  upward = sorted(f'{a} (layer {_layer_of(a, layers)}) imports {b} '
                  f'(layer {_layer_of(b, layers)})'
                  for a, deps in graph.items() if a != 'scone_jax'
                  for b in deps if b != 'scone_jax'
                  and _layer_of(b, layers) > _layer_of(a, layers))
  assert not upward, 'imports against ARCHITECTURE.md\'s layers:\n' + '\n'.join(upward)
