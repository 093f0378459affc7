"""The package's import graph has no cycles, function-level imports included.

A cycle hidden behind a deferred import still couples the two modules: neither can be
understood, tested or moved without the other. Every import statement anywhere in a
module (top level, function, TYPE_CHECKING block) is an edge; each strongly connected
component of the graph must be a single module.
"""

import ast
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
