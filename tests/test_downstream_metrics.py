"""Downstream metrics on hand-computed log-probabilities: each normalisation, PMI, ties."""

import math

import numpy as np
import pytest

from scone_jax.downstream import metrics


def _doc(gold, ll, choices, tokens, uncond=None):
  chars, nbytes = metrics.choice_lengths(choices)
  return metrics.ChoiceScores(gold=gold, ll_C=np.array(ll), tokens_C=np.array(tokens),
                              chars_C=chars, bytes_C=nbytes,
                              ll_uncond_C=None if uncond is None else np.array(uncond))


# Choice 0 'a' (1 char, 1 byte, 1 token), ll -2; choice 1 'bbbb' (4 chars, 4 bytes,
# 2 tokens) ll -4; choice 2 'éé' (2 chars, 4 bytes, 4 tokens) ll -3.
#   raw       -2, -4, -3          -> 0
#   per token -2, -2, -0.75       -> 2
#   per char  -2, -1, -1.5        -> 1
#   per byte  -2, -1, -0.75       -> 2
#   pmi (uncond -5, -3.5, -3.2):  3, -0.5, 0.2 -> 0
DOC = _doc(1, [-2.0, -4.0, -3.0], ['a', 'bbbb', 'éé'], [1, 2, 4], [-5.0, -3.5, -3.2])


@pytest.mark.parametrize('variant,want_scores,want_pred', [
    ('acc_raw', [-2, -4, -3], 0), ('acc_per_token', [-2, -2, -0.75], 2),
    ('acc_per_char', [-2, -1, -1.5], 1), ('acc_per_byte', [-2, -1, -0.75], 2),
    ('acc_pmi', [3, -0.5, 0.2], 0)])
def test_each_variant_by_hand(variant, want_scores, want_pred):
  np.testing.assert_allclose(metrics.scores(DOC, variant), want_scores, rtol=1e-12)
  assert metrics.correct(DOC, variant) == (want_pred == DOC.gold)


def test_ties_go_to_the_lowest_index():
  tie = _doc(1, [-1.0, -1.0], ['x', 'y'], [1, 1])
  assert not metrics.correct(tie, 'acc_raw')
  assert metrics.correct(_doc(0, [-1.0, -1.0], ['x', 'y'], [1, 1]), 'acc_raw')


def test_summary_mean_stderr_and_chance():
  docs = [DOC, _doc(0, [-1.0, -2.0], ['x', 'y'], [1, 1], [-1.0, -1.0]),
          _doc(1, [-1.0, -2.0], ['x', 'y'], [1, 1], [-3.0, -1.0])]
  s = metrics.summarize(docs)
  # per char: DOC right, doc 2 right, doc 3 wrong -> 2/3; ddof=1 std of (1,1,0) / sqrt(3).
  assert s['acc_per_char']['value'] == pytest.approx(2 / 3)
  assert s['acc_per_char']['stderr'] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
  # pmi: DOC wrong (0), doc 2 right (0 vs -1), doc 3 wrong (2 vs -1) -> 1/3.
  assert s['acc_pmi']['value'] == pytest.approx(1 / 3)
  assert s['chance']['value'] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
  no_uncond = metrics.summarize([_doc(0, [-1.0, -2.0], ['x', 'y'], [1, 1])])
  assert 'acc_pmi' not in no_uncond and math.isnan(no_uncond['acc_raw']['stderr'])
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.scores(DOC, 'acc_norm')
