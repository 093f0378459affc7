"""What a corpus offers SCONE: how much of it the f-gram table covers, and how.

Statistics of one tokenized split under the first S rows of a mined table, meant to
explain why SCONE helps on one corpus and not on another (STUDY.md, the report's
"F-gram statistics" section):

  matched_fraction       share of positions where an f-gram (>= 2 tokens) ends: the
                         positions whose input embedding SCONE changes.
  mean_matched_len       mean length of the LONGEST f-gram ending at a matched position
                         (the one SCONE embeds, fgrams/match.py).
  tokens_per_occurrence  split tokens per occurrence of one of the S f-grams in the TRAIN
                         split (train tokens / sum of the S mined counts, overlapping
                         occurrences counted): how densely the table's f-grams occur.
  least_count            the S-th (least frequent) f-gram's count in the train split; the
                         report turns it into sightings during training.
  cross_word_fraction    share of positions whose longest match spans a word boundary (a
                         token after its first starts a word): phrases rather than pieces
                         of one word.
  cross_word_of_matched  the same share among matched positions only.

A token starts a word when its piece starts with a whitespace marker (sentencepiece's
U+2581, byte-level BPE's 'G-dot' U+0120 or newline U+010A, a literal space, tab or
newline, or their byte-fallback pieces <0x20>/<0x09>/<0x0A>).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

from scone_jax.fgrams.table import FgramTable

# Piece prefixes that mark a token starting a new word (module docstring).
_WORD_START_PREFIXES = ('\u2581', '\u0120', '\u010a', ' ', '\t', '\n', '<0x20>', '<0x09>',
                        '<0x0A>')


@dataclasses.dataclass(frozen=True)
class FgramStats:
  """Statistics of one split under S f-grams (module docstring)."""
  num_fgrams: int
  positions: int
  matched_fraction: float
  mean_matched_len: float
  tokens_per_occurrence: float
  least_count: int
  cross_word_fraction: float
  cross_word_of_matched: float


def word_starts(id_to_piece: Callable[[int], str], vocab_size: int) -> np.ndarray:
  """bool [V]: token v's piece starts a word (module docstring)."""
  return np.array([id_to_piece(v).startswith(_WORD_START_PREFIXES)
                   for v in range(vocab_size)], bool)


def split_stats(table: FgramTable, num_fgrams: int, docs: Iterable[np.ndarray],
                word_start_V: np.ndarray, train_tokens: int) -> FgramStats:
  """Statistics of the documents `docs` (1-D token arrays) under the table's first
  `num_fgrams` rows (matches never span two documents).

  Args:
    table: the mined table (rank order; its counts are train-split counts).
    num_fgrams: S, the rows in use (<= len(table)).
    docs: the split's documents.
    word_start_V: `word_starts` of the tokenizer.
    train_tokens: tokens of the train split (for tokens_per_occurrence).
  """
  if not 0 < num_fgrams <= len(table):
    raise ValueError(f'num_fgrams={num_fgrams} must be in [1, {len(table)}] (the table '
                     'rows)')
  sub = table.slice(num_fgrams)
  docs = [np.asarray(d) for d in docs if len(d)]
  positions = sum(len(d) for d in docs)
  lens_T = np.ones(0, np.int64)
  cross_T = np.zeros(0, bool)
  if docs:
    tokens_1xT = np.concatenate(docs)[None]
    seg_1xT = np.repeat(np.arange(1, len(docs) + 1), [len(d) for d in docs])[None]
    _, lens = sub.match(tokens_1xT, seg_1xT)
    lens_T = lens[0].astype(np.int64)
    cross_T = _crosses_word(word_start_V[tokens_1xT[0]], lens_T)
  matched_T = lens_T >= 2
  matched = int(matched_T.sum())
  counts = np.asarray(table.counts[:num_fgrams], np.int64)
  return FgramStats(
      num_fgrams=num_fgrams, positions=positions,
      matched_fraction=matched / positions if positions else float('nan'),
      mean_matched_len=float(lens_T[matched_T].mean()) if matched else float('nan'),
      tokens_per_occurrence=train_tokens / int(counts.sum()),
      least_count=int(counts[-1]),
      cross_word_fraction=float(cross_T.sum()) / positions if positions else float('nan'),
      cross_word_of_matched=float(cross_T.sum()) / matched if matched else float('nan'))


def _crosses_word(start_T: np.ndarray, lens_T: np.ndarray) -> np.ndarray:
  """bool [T]: the match of length lens_T[i] ending at i holds a word start after its
  first token, i.e. among positions i - len + 2 .. i."""
  # starts_before[j] = word starts among positions < j; the span i-len+2..i holds
  # starts_before[i+1] - starts_before[i-len+2] of them.
  starts_before = np.concatenate([[0], np.cumsum(start_T, dtype=np.int64)])
  idx = np.arange(len(lens_T))
  first_inner = np.maximum(idx - lens_T + 2, 0)
  inner = starts_before[idx + 1] - starts_before[np.minimum(first_inner, idx + 1)]
  return (lens_T >= 2) & (inner > 0)


def rows(stats: Sequence[tuple[str, str, FgramStats]]) -> list[dict[str, object]]:
  """Table rows (arm, split, every statistic) for the report."""
  return [{'arm': arm, 'split': split, 'S': s.num_fgrams,
           'matched positions': f'{s.matched_fraction:.1%}',
           'mean matched length': f'{s.mean_matched_len:.2f}',
           'train tokens per f-gram occurrence': f'{s.tokens_per_occurrence:.2f}',
           'count of the S-th f-gram': s.least_count,
           'longest match crosses a word': f'{s.cross_word_fraction:.1%}',
           '... of matched positions': f'{s.cross_word_of_matched:.1%}'}
          for arm, split, s in stats]
