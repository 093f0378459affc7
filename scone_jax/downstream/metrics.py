"""Accuracy from per-choice log-likelihoods: raw, per token, per character, per byte, PMI.

For a document with choices c_j (as the task states them; the scored continuation is
" " + c_j) and ll_j = log p(" " + c_j | context) in nats:
  acc_raw        argmax_j ll_j                                    (lm-eval `acc`)
  acc_per_token  argmax_j ll_j / tokens(" " + c_j)
  acc_per_char   argmax_j ll_j / len(c_j)     characters, WITHOUT the leading space
                                              (lm-eval `acc_norm`, OLMo's len_norm)
  acc_per_byte   argmax_j ll_j / len(utf8(c_j))  bytes, without the leading space
  acc_pmi        argmax_j ll_j - log p(" " + c_j | unconditional context)
Ties go to the lowest index (numpy's argmax, as lm-eval). A variant's value is the mean of
per-document 0/1 correctness; its standard error is the sample standard deviation
(ddof=1) over sqrt(n), lm-eval's `mean_stderr`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

VARIANTS = ('acc_raw', 'acc_per_token', 'acc_per_char', 'acc_per_byte', 'acc_pmi')


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
  """One document's scored choices."""
  gold: int
  ll_C: np.ndarray  # log p(continuation | context), nats.
  tokens_C: np.ndarray  # Continuation tokens scored.
  chars_C: np.ndarray  # Characters of the choice (no leading space).
  bytes_C: np.ndarray  # UTF-8 bytes of the choice (no leading space).
  ll_uncond_C: np.ndarray | None = None  # log p(continuation | unconditional context).


def choice_lengths(choices) -> tuple[np.ndarray, np.ndarray]:
  """(characters, UTF-8 bytes) of each choice, the per-char / per-byte denominators."""
  return (np.array([len(c) for c in choices], np.float64),
          np.array([len(c.encode('utf-8')) for c in choices], np.float64))


def scores(s: ChoiceScores, variant: str) -> np.ndarray:
  """The per-choice score `variant` takes the argmax of."""
  ll = np.asarray(s.ll_C, np.float64)
  if variant == 'acc_raw':
    return ll
  if variant == 'acc_per_token':
    return ll / np.asarray(s.tokens_C, np.float64)
  if variant == 'acc_per_char':
    return ll / np.asarray(s.chars_C, np.float64)
  if variant == 'acc_per_byte':
    return ll / np.asarray(s.bytes_C, np.float64)
  if variant == 'acc_pmi':
    if s.ll_uncond_C is None:
      raise ValueError('acc_pmi needs the unconditional log-likelihoods')
    return ll - np.asarray(s.ll_uncond_C, np.float64)
  raise ValueError(f'unknown metric {variant!r}; use one of {list(VARIANTS)}')


def correct(s: ChoiceScores, variant: str) -> bool:
  return int(np.argmax(scores(s, variant))) == s.gold


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
  """(mean, standard error of the mean with ddof=1; nan for fewer than 2 values)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError('no documents were scored')
  if values.size < 2:
    return float(values.mean()), math.nan
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def summarize(docs: list[ChoiceScores]) -> dict[str, dict[str, float]]:
  """{variant: {'value', 'stderr'}} over documents (PMI only where scored), plus
  'chance': the mean over documents of 1 / number of choices."""
  out = {}
  for variant in VARIANTS:
    if variant == 'acc_pmi' and any(d.ll_uncond_C is None for d in docs):
      continue
    value, stderr = mean_stderr(np.array([correct(d, variant) for d in docs], np.float64))
    out[variant] = {'value': value, 'stderr': stderr}
  out['chance'] = {'value': float(np.mean([1.0 / len(d.ll_C) for d in docs])),
                   'stderr': 0.0}
  return out
