"""Per-corpus f-gram statistics (fgrams/stats.py) against values worked out by hand."""

import numpy as np
import pytest

from scone_jax.fgrams import stats
from scone_jax.fgrams.table import FgramTable

# Pieces: 0 '<pad>', 1 '▁the', 2 '▁cat', 3 's', 4 '▁sat', 5 '.'  (word starts: 1, 2, 4).
PIECES = ['<pad>', '\u2581the', '\u2581cat', 's', '\u2581sat', '.']


def _table():
  # Rank order (counts non-increasing): 'cat s' (within a word), 'the cat' (across),
  # 'the cat s' (across; prefix 'the cat' and suffix 'cat s' present), 's sat'.
  grams = [(2, 3), (1, 2), (1, 2, 3), (3, 4)]
  counts = [9, 7, 5, 2]
  tokens = np.zeros((4, 3), np.int32)
  for i, g in enumerate(grams):
    tokens[i, :len(g)] = g
  return FgramTable(tokens, np.array(counts), np.array([len(g) for g in grams]), 3, 2)


def test_word_starts_from_pieces():
  ws = stats.word_starts(PIECES.__getitem__, len(PIECES))
  assert ws.tolist() == [False, True, True, False, True, False]
  byte_level = ['\u0120the', 'ing', '\u010a', '<0x0A>', ' x']
  assert stats.word_starts(byte_level.__getitem__, 5).tolist() == [
      True, False, True, True, True]


def test_split_stats_by_hand():
  table = _table()
  ws = stats.word_starts(PIECES.__getitem__, len(PIECES))
  # Doc 1: the cat s sat .  -> longest match ending at each position:
  #   the: none (1) | cat: 'the cat' (2, crosses) | s: 'the cat s' (3, crosses) |
  #   sat: 's sat' (2, crosses: 'sat' starts a word) | .: none
  # Doc 2: cat s -> cat: none | s: 'cat s' (2, inside one word)
  docs = [np.array([1, 2, 3, 4, 5]), np.array([2, 3])]
  s = stats.split_stats(table, 4, docs, ws, train_tokens=46)
  assert s.positions == 7
  assert s.matched_fraction == pytest.approx(4 / 7)
  assert s.mean_matched_len == pytest.approx((2 + 3 + 2 + 2) / 4)
  assert s.cross_word_fraction == pytest.approx(3 / 7)
  assert s.cross_word_of_matched == pytest.approx(3 / 4)
  assert s.tokens_per_occurrence == pytest.approx(46 / (9 + 7 + 5 + 2))
  assert s.least_count == 2


def test_fewer_rows_and_documents_never_joined():
  table = _table()
  ws = stats.word_starts(PIECES.__getitem__, len(PIECES))
  # S = 2: only 'cat s' and 'the cat'. Doc boundary between 'the' | 'cat': no match there.
  s = stats.split_stats(table, 2, [np.array([1]), np.array([2, 3])], ws, train_tokens=16)
  # the: none | cat: none (doc start) | s: 'cat s' (within a word)
  assert s.matched_fraction == pytest.approx(1 / 3)
  assert s.mean_matched_len == pytest.approx(2.0)
  assert s.cross_word_fraction == 0.0
  assert s.least_count == 7
  assert s.tokens_per_occurrence == pytest.approx(16 / 16)
  with pytest.raises(ValueError, match='num_fgrams'):
    stats.split_stats(table, 5, [np.array([1])], ws, 1)


def test_report_rows_name_every_statistic():
  table = _table()
  ws = stats.word_starts(PIECES.__getitem__, len(PIECES))
  s = stats.split_stats(table, 4, [np.array([1, 2, 3])], ws, 10)
  (row,) = stats.rows([('S=4', 'train', s)])
  assert row['arm'] == 'S=4' and row['split'] == 'train' and row['S'] == 4
  assert row['matched positions'] == '66.7%'
  assert row['longest match crosses a word'] == '66.7%'


def test_report_rows_from_prepared_artifacts_equal_a_brute_force_count(tmp_path_factory):
  """corpus_stats reads a prepared run's table, tokenizer and splits; the matched share
  and cross-word share equal a brute-force longest-match count over the table's grams."""
  import types

  import train_helpers as th
  from scone_jax import prepare
  from scone_jax.sweeps import corpus_stats
  from scone_jax.tokenizer.shards import TokenShards
  from scone_jax.tokenizer.spm import open_tokenizer

  corpus, artifacts = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, artifacts, **{'fgram.use_size': 300})
  prepare.prepare(cfg, str(tmp_path_factory.mktemp('w')))
  arm = types.SimpleNamespace(name='S=300', cfg=cfg, has_fgram_side=True)
  baseline = types.SimpleNamespace(name='baseline', cfg=cfg, has_fgram_side=False)
  got = corpus_stats.rows([baseline, arm], ['heldout'])
  assert [(r['arm'], r['split'], r['S']) for r in got] == [
      ('S=300', 'train', 300), ('S=300', 'test `heldout`', 300)]

  table = FgramTable.load(f'{artifacts}/fgrams').slice(300)
  grams = set(table.grams())
  tok = open_tokenizer(f'{artifacts}/tokenizer')
  ws = stats.word_starts(tok.id_to_piece, tok.vocab_size)
  matched = crossing = total = 0
  for doc in TokenShards.open(f'{artifacts}/tokens/eval-heldout'):
    doc = [int(x) for x in doc]
    total += len(doc)
    for i in range(len(doc)):
      n = max((n for n in range(2, table.max_len + 1)
               if i - n + 1 >= 0 and tuple(doc[i - n + 1:i + 1]) in grams), default=0)
      matched += n > 0
      crossing += n > 0 and any(ws[doc[j]] for j in range(i - n + 2, i + 1))
  assert got[1]['matched positions'] == f'{matched / total:.1%}'
  assert got[1]['longest match crosses a word'] == f'{crossing / total:.1%}'
  assert 0 < matched < total
