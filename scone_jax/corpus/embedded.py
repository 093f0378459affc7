"""The embedded default corpus: docstrings of Python's standard library (no network, no root).

Built deterministically for a given Python version: the stdlib directory (from sysconfig)
is walked in sorted order, skipping test packages and site-packages; each .py file is
parsed with `ast` (unparsable files are skipped) and every module, class and function
docstring becomes one document, whitespace-normalised per paragraph (paragraphs joined by
a blank line). Modules are split into train / held-out (test) / validation by a hash of
the module name, so the split is stable and a module never straddles it: with u the hash
as a number in [0, 1), u < eval_fraction is held out for test, the next valid_fraction of
[0, 1) is the validation split (only when valid_fraction > 0), the rest is train.

The corpus is cached as an artifact directory (train.jsonl, eval.jsonl, manifest.json);
its fingerprint covers the Python version, the eval fraction and every file's size.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
import re
import sysconfig
import warnings
from typing import Iterator

from absl import logging

from scone_jax import artifacts, paths
from scone_jax.corpus import readers

KIND = 'embedded_corpus'
# Bump when the extraction rules change, so cached corpora are rebuilt.
EXTRACT_VERSION = 1
SPLITS = ('train', 'eval', 'valid')  # 'valid' exists only when valid_fraction > 0.
_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})
_PARAGRAPH_RE = re.compile(r'\n\s*\n')


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
  """The cached corpus: its directory, fingerprint and per-split sizes."""
  directory: str
  fingerprint: str
  sizes: dict[str, dict[str, int]]  # split -> {documents, modules, chars, bytes}

  def split(self, name: str) -> readers.FileCorpus:
    """The 'train', 'eval' or 'valid' split as a FileCorpus (sources point into the stdlib)."""
    if name not in self.sizes:
      raise ValueError(f'embedded corpus split {name!r} is not one of {sorted(self.sizes)}'
                       + (' (set data.embedded_valid_fraction > 0 for a validation split)'
                          if name == 'valid' else ''))
    return readers.FileCorpus([os.path.join(self.directory, f'{name}.jsonl')], 'jsonl',
                              name=name, source_field='source',
                              fingerprint=artifacts.fingerprint(self.fingerprint, name))


def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str | None = None, max_files: int = 0) -> list[tuple[str, int]]:
  """(relative path, size) of the stdlib's .py files in sorted walk order.

  Args:
    root: the stdlib directory (default: this interpreter's).
    max_files: keep only the first N files (0 = all); tests use a subset.
  """
  root = root or stdlib_dir()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        files.append((os.path.relpath(path, root), os.path.getsize(path)))
  return files[:max_files] if max_files else files


def module_name(relpath: str) -> str:
  """'json/decoder.py' -> 'json.decoder'; 'json/__init__.py' -> 'json'."""
  parts = relpath[:-len('.py')].split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _unit(module: str) -> float:
  """The module's sha256 as a number in [0, 1)."""
  return int(hashlib.sha256(module.encode()).hexdigest()[:12], 16) / float(1 << 48)


def is_eval_module(module: str, eval_fraction: float) -> bool:
  """Deterministic split: the module's sha256 as a number in [0, 1) vs the fraction."""
  return _unit(module) < eval_fraction


def split_of(module: str, eval_fraction: float, valid_fraction: float = 0.0) -> str:
  """'eval' (test), 'valid' or 'train': disjoint bands of the module's hash."""
  u = _unit(module)
  if u < eval_fraction:
    return 'eval'
  return 'valid' if u < eval_fraction + valid_fraction else 'train'


def normalise(doc: str) -> str:
  """Collapses whitespace inside each paragraph; paragraphs are joined by a blank line."""
  paragraphs = (' '.join(p.split()) for p in _PARAGRAPH_RE.split(doc))
  return '\n\n'.join(p for p in paragraphs if p)


def docstrings(source: bytes) -> Iterator[tuple[int, str]]:
  """(line, normalised docstring) of the module, classes and functions, in source order."""
  with warnings.catch_warnings():  # Invalid escape sequences in old stdlib code.
    warnings.simplefilter('ignore')
    tree = ast.parse(source)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      text = ast.get_docstring(node, clean=True)
      if text and (text := normalise(text)):
        found.append((getattr(node, 'lineno', 1), text))
  return iter(sorted(found, key=lambda t: t[0]))


def fingerprint_of(files: list[tuple[str, int]], eval_fraction: float,
                   valid_fraction: float = 0.0) -> str:
  # Without a validation split the fingerprint is what it was before the option existed,
  # so corpora built then are reused.
  extra = (('valid_fraction', valid_fraction),) if valid_fraction else ()
  return artifacts.fingerprint(KIND, EXTRACT_VERSION, platform.python_implementation(),
                               platform.python_version(), eval_fraction, files, *extra)


def build_embedded(directory: str, eval_fraction: float, root: str | None = None,
                   max_files: int = 0, valid_fraction: float = 0.0) -> EmbeddedCorpus:
  """Builds (or reuses, if its fingerprint matches) the embedded corpus in `directory`.

  Args:
    directory: artifact directory (A/corpus).
    eval_fraction: fraction of modules held out (config data.embedded_eval_fraction).
    root: the stdlib directory (default: this interpreter's).
    max_files: build from only the first N stdlib files (0 = all); for tests.
    valid_fraction: fraction of modules in the validation split
      (config data.embedded_valid_fraction; 0 = none).
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f'data.embedded_eval_fraction={eval_fraction} must be in (0, 1): the '
                     'embedded corpus always has a train and a held-out split')
  if not 0.0 <= valid_fraction < 1.0 - eval_fraction:
    raise ValueError(f'data.embedded_valid_fraction={valid_fraction} must be in [0, '
                     f'1 - data.embedded_eval_fraction={1.0 - eval_fraction:g}): train keeps '
                     'the rest of the modules')
  directory = paths.resolve(directory)
  root = root or stdlib_dir()
  files = stdlib_files(root, max_files)
  if not files:
    raise readers.CorpusError(f'no .py files under the stdlib directory {root}; use '
                              "--config.data.source=files with your own corpus")
  fp = fingerprint_of(files, eval_fraction, valid_fraction)
  splits = SPLITS if valid_fraction else SPLITS[:2]
  try:
    manifest = artifacts.read_manifest(directory, KIND, verify=True,
                                       expect={'fingerprint': fp})
    return EmbeddedCorpus(directory, fp, manifest['sizes'])
  except artifacts.ArtifactError as e:
    if paths.exists(directory):
      logging.info('rebuilding the embedded corpus: %s', e)
  sizes = {s: dict(documents=0, modules=0, chars=0, bytes=0) for s in splits}
  skipped = []
  with artifacts.atomic_dir(directory) as tmp:
    outs = {s: open(os.path.join(tmp, f'{s}.jsonl'), 'w', encoding='utf-8') for s in splits}
    try:
      for relpath, _ in files:
        with open(os.path.join(root, relpath), 'rb') as f:
          source = f.read()
        try:
          docs = list(docstrings(source))
        except (SyntaxError, ValueError, RecursionError):
          skipped.append(relpath)
          continue
        module = module_name(relpath)
        split = split_of(module, eval_fraction, valid_fraction)
        size = sizes[split]
        size['modules'] += 1
        for lineno, text in docs:
          outs[split].write(json.dumps({'text': text, 'source': f'{relpath}:{lineno}'},
                                       ensure_ascii=False) + '\n')
          size['documents'] += 1
          size['chars'] += len(text)
          size['bytes'] += len(text.encode('utf-8'))
    finally:
      for out in outs.values():
        out.close()
    for split, size in sizes.items():
      if not size['documents']:
        raise readers.CorpusError(
            f'the embedded corpus has no {split} documents ({len(files)} stdlib files, '
            f'data.embedded_eval_fraction={eval_fraction}, data.embedded_valid_fraction='
            f'{valid_fraction}); choose fractions that leave modules in every split')
    artifacts.write_manifest(tmp, KIND, {
        'fingerprint': fp, 'sizes': sizes, 'python': platform.python_version(),
        'stdlib_dir': root, 'num_files': len(files), 'unparsable_files': skipped,
        'eval_fraction': eval_fraction, 'valid_fraction': valid_fraction})
  logging.info('embedded corpus built in %s: %s (%d unparsable files skipped)', directory,
               sizes, len(skipped))
  return EmbeddedCorpus(directory, fp, sizes)


def open_embedded(directory: str, eval_fraction: float, root: str | None = None,
                  max_files: int = 0, valid_fraction: float = 0.0) -> EmbeddedCorpus:
  """Opens a built embedded corpus; ArtifactError if missing or built for other inputs."""
  fp = fingerprint_of(stdlib_files(root, max_files), eval_fraction, valid_fraction)
  manifest = artifacts.read_manifest(directory, KIND, verify=False, expect={'fingerprint': fp})
  return EmbeddedCorpus(paths.resolve(directory), fp, manifest['sizes'])
