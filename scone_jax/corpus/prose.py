"""Natural-language study corpora from Debian packages (public domain), split for a study.

  python -m scone_jax.corpus.prose --out=data/prose      # `make prose-corpora`

writes, for each corpus, OUT/<name>/{train,valid,test}.txt with one document per line
(`data.format=lines`):
  kjv       the King James Bible (package bible-kjv; the `bible` command), one chapter per
            document (1,189 chapters, ~4.3 MB; verse numbers removed).
  fortunes  the fortune cookie collection (package fortunes; /usr/share/games/fortunes),
            one record per document (its line breaks become ' / '), ~2.4 MB of modern
            English.
Whole documents go to the validation and test splits (about `--heldout_bytes` each, 150 KB
by default), drawn by a seeded permutation, so the split is the same on every machine with
the same package versions; the rest is train. The packages are installed by
`.ci/install-prose.sh` (root + apt-get); without them this names the package to install.

The study on these corpora (`make study-prose`) runs experiments/sweeps/study.py unchanged
with `--set=data.*` pointing at the files (STUDY.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable

import numpy as np
from absl import flags

from scone_jax import cli
from scone_jax.corpus import CorpusError

FORTUNES_DIR = '/usr/share/games/fortunes'
_VERSE = re.compile(r'^([1-3]?[A-Z][A-Za-z]*\d+):\d+ (.*)$')


def kjv_documents() -> list[str]:
  """The Bible's chapters, in canonical order (verse references removed)."""
  if shutil.which('bible') is None:
    raise CorpusError('the King James Bible needs the `bible` command: apt-get install '
                      'bible-kjv (or run .ci/install-prose.sh as root)')
  out = subprocess.run(['bible', '-f', '-l100000', 'gen1:1-rev22:21'], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=True).stdout
  chapters: dict[str, list[str]] = {}
  for line in out.splitlines():
    m = _VERSE.match(line.strip())
    if m:
      chapters.setdefault(m.group(1), []).append(m.group(2).strip())
  if len(chapters) < 1000:
    raise CorpusError(f'`bible` printed {len(chapters)} chapters (expected 1,189): is '
                      'bible-kjv installed completely?')
  return [' '.join(verses) for verses in chapters.values()]


def fortunes_documents(directory: str = FORTUNES_DIR) -> list[str]:
  """Every record of every fortune file (no .dat/.u8 index files), sorted by file name."""
  if not os.path.isdir(directory):
    raise CorpusError(f'{directory} does not exist: apt-get install fortunes (or run '
                      '.ci/install-prose.sh as root)')
  docs = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.endswith(('.dat', '.u8')) or not os.path.isfile(path):
      continue
    with open(path, encoding='utf-8', errors='replace') as f:
      records = f.read().split('\n%\n')
    for r in records:
      lines = [ln.strip() for ln in r.strip('%\n').splitlines() if ln.strip()]
      if lines:
        docs.append(' / '.join(lines))
  if not docs:
    raise CorpusError(f'{directory} holds no fortune records: apt-get install fortunes')
  return docs


CORPORA: dict[str, Callable[[], list[str]]] = {'kjv': kjv_documents,
                                                'fortunes': fortunes_documents}


def split(docs: list[str], heldout_bytes: int, seed: int = 0) -> dict[str, list[str]]:
  """Whole documents into valid and test (each about heldout_bytes) and train (the rest),
  by a seeded permutation; each split keeps the documents' original order."""
  order = np.random.default_rng(seed).permutation(len(docs))
  chosen: dict[str, list[int]] = {'valid': [], 'test': []}
  size = {'valid': 0, 'test': 0}
  for i in order:
    name = 'test' if size['test'] <= size['valid'] else 'valid'
    if size[name] >= heldout_bytes:
      break
    chosen[name].append(int(i))
    size[name] += len(docs[i].encode()) + 1
  held = set(chosen['valid']) | set(chosen['test'])
  if len(held) >= len(docs):
    raise CorpusError(f'heldout_bytes={heldout_bytes} leaves no training documents '
                      f'({len(docs)} documents)')
  return {'train': [d for i, d in enumerate(docs) if i not in held],
          'valid': [docs[i] for i in sorted(chosen['valid'])],
          'test': [docs[i] for i in sorted(chosen['test'])]}


def write_corpus(out_dir: str, name: str, heldout_bytes: int) -> dict[str, int]:
  """Writes OUT/name/{train,valid,test}.txt (temp + rename); returns bytes per split."""
  parts = split(CORPORA[name](), heldout_bytes)
  directory = os.path.join(out_dir, name)
  os.makedirs(directory, exist_ok=True)
  sizes = {}
  for part, docs in parts.items():
    path = os.path.join(directory, f'{part}.txt')
    text = ''.join(d.replace('\n', ' ') + '\n' for d in docs)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
    sizes[part] = len(text.encode())
  return sizes


FLAGS = flags.FlagValues()
flags.DEFINE_string('out', 'data/prose', 'Output directory (one subdirectory per corpus).',
                    flag_values=FLAGS)
flags.DEFINE_list('corpora', list(CORPORA), f'Which of {list(CORPORA)}.', flag_values=FLAGS)
flags.DEFINE_integer('heldout_bytes', 150_000, 'Bytes of the valid and of the test split.',
                     flag_values=FLAGS)


def main(argv):
  del argv
  unknown = set(FLAGS.corpora) - set(CORPORA)
  if unknown:
    raise CorpusError(f'--corpora: unknown {sorted(unknown)}; choose from {list(CORPORA)}')
  for name in FLAGS.corpora:
    sizes = write_corpus(FLAGS.out, name, FLAGS.heldout_bytes)
    print(f'{os.path.join(FLAGS.out, name)}: ' + ', '.join(
        f'{part} {b / 1e6:.2f} MB' for part, b in sizes.items()))


if __name__ == '__main__':
  cli.run('prose', main, FLAGS)
