"""The small phrase corpus and its mined f-gram table that the serving-side tests share
(test_decode, test_combine_table, test_quant, test_accounting_arms, test_downstream_scoring).

Documents are built from a few repeated phrases, so the table holds 2..K-grams. Import the
constants and the `table` fixture from here (pytest finds a fixture by the name a test
module holds).
"""

import numpy as np
import pytest

from scone_jax.fgrams import mine_fgrams

V, K, BOS = 48, 4, 1
PHRASES = [[5, 6, 7, 8], [9, 10, 11], [12, 13], [20, 21, 22, 23], [30, 31]]


@pytest.fixture(scope='module')
def table():
  rng = np.random.default_rng(0)
  docs = []
  for _ in range(60):
    parts = [PHRASES[i] + [int(rng.integers(40, V))] for i in rng.integers(0, 5, 6)]
    docs.append(np.array(sum(parts, []), np.int32))
  t = mine_fgrams(docs, max_len=K, size=40, min_count=3, progress=False)
  assert len(t) > 10 and t.lengths.max() == K
  return t
