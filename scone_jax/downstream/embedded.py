"""A downstream task from the embedded corpus: the true next sentence of a held-out docstring.

Each document takes a docstring of a HELD-OUT module (the embedded corpus's eval split, so
no trained model has seen it) with at least two sentences: the context is its first
sentence, the right choice its second; the wrong choices are second-or-later sentences of
docstrings of OTHER modules of the same split, drawn at random. Chance is
1 / num_choices. Sentences are split after '.', '!' or '?' followed by whitespace and kept
when they have 3..40 words and at most 120 characters (so context and choice fit a small
model's window; `max_chars` lowers the bound for a smaller one).
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Mapping

import numpy as np

from scone_jax import paths
from scone_jax.downstream.tasks import Doc, TaskFileError

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')
MIN_WORDS, MAX_WORDS, MAX_CHARS = 3, 40, 120


def sentences(text: str, max_chars: int = MAX_CHARS) -> list[str]:
  """The docstring's sentences (first paragraph breaks end a sentence too) of
  MIN_WORDS..MAX_WORDS words and at most `max_chars` characters."""
  out = []
  for paragraph in text.split('\n\n'):
    for s in _SENTENCE_END.split(paragraph.strip()):
      s = s.strip()
      if MIN_WORDS <= len(s.split()) <= MAX_WORDS and len(s) <= max_chars:
        out.append(s)
  return out


def embedded_task(records: Iterable[Mapping[str, str]], num_docs: int = 200,
                  num_choices: int = 4, seed: int = 0,
                  max_chars: int = MAX_CHARS) -> list[Doc]:
  """Next-sentence documents from corpus records {'text', 'source': 'path.py:line'}.

  Deterministic for a seed. `max_chars` bounds every sentence (context and choices), for
  a model whose window is shorter than MAX_CHARS allows. Raises TaskFileError when the
  records hold too few usable docstrings or modules.
  """
  if num_choices < 2:
    raise TaskFileError(f'num_choices={num_choices}: a multiple-choice task needs >= 2')
  candidates, pool = [], {}  # (module, first, second); module -> later sentences.
  for r in records:
    module = r['source'].rsplit(':', 1)[0]
    sents = sentences(r['text'], max_chars)
    if len(sents) >= 2:
      candidates.append((module, r['source'], sents[0], sents[1]))
      pool.setdefault(module, []).extend(sents[1:])
  if len(pool) < num_choices or not candidates:
    raise TaskFileError(f'the corpus records hold {len(candidates)} docstrings with two '
                        f'sentences in {len(pool)} modules; the task needs >= '
                        f'{num_choices} modules (use a larger eval split)')
  rng = np.random.default_rng(seed)
  modules = sorted(pool)
  docs = []
  for i in rng.permutation(len(candidates))[:num_docs]:
    module, source, first, second = candidates[i]
    wrong = []
    for _ in range(100 * num_choices):  # Bounded: a degenerate pool cannot loop forever.
      other = modules[rng.integers(len(modules))]
      s = pool[other][rng.integers(len(pool[other]))]
      if other != module and s != second and s not in wrong:
        wrong.append(s)
        if len(wrong) == num_choices - 1:
          break
    else:
      raise TaskFileError(f'could not draw {num_choices - 1} distinct wrong sentences for '
                          f'{source}; the corpus split is too repetitive')
    gold = int(rng.integers(num_choices))
    docs.append(Doc(source, first, tuple(wrong[:gold] + [second] + wrong[gold:]), gold))
  return docs


def embedded_task_from_corpus(corpus_dir: str, split: str = 'eval', **kwargs) -> list[Doc]:
  """`embedded_task` over the built embedded corpus's split (<corpus_dir>/<split>.jsonl)."""
  path = paths.join(corpus_dir, f'{split}.jsonl')
  if not paths.isfile(path):
    raise TaskFileError(f'{path} does not exist; build the embedded corpus first '
                        '(python -m scone_jax.prepare with data.source=embedded)')
  records = [json.loads(line) for line in paths.read_text(path).splitlines() if line]
  return embedded_task(records, **kwargs)
