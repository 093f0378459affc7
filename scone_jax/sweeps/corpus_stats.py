"""The report's per-corpus f-gram statistics: for every SCONE arm that uses the mined
table, `fgrams/stats.py` on the train split and each test corpus of its prepared
artifacts (one computation per artifacts dir and S, shared by the arm's seeds).

They describe the corpus, not a run: they let a reader compare what two corpora offer
SCONE (matched share of positions, match length, f-gram density, exposure of the rarest
f-gram, phrases vs pieces of words) next to the verdicts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from scone_jax import artifacts
from scone_jax.fgrams import stats as stats_lib
from scone_jax.fgrams.table import FgramTable
from scone_jax.tokenizer.shards import TokenShards
from scone_jax.tokenizer.spm import open_tokenizer


def rows(arms: Sequence[Any], test_corpora: Sequence[str]) -> list[dict[str, Any]]:
  """Report rows (arm, split, statistics) for the arms whose artifacts are readable here
  (`analysis.Arm`s: name, cfg, has_fgram_side); the others are left out."""
  found: list[tuple[str, str, stats_lib.FgramStats]] = []
  cache: dict[tuple[str, int], list[tuple[str, stats_lib.FgramStats]]] = {}
  for a in arms:
    if not a.has_fgram_side or not a.cfg.fgram_model.uses_fgram_table:
      continue
    adir = a.cfg.data.artifacts_dir
    try:
      table = FgramTable.load(os.path.join(adir, 'fgrams'))
      s = a.cfg.fgram.rows_used(len(table))
      if (adir, s) not in cache:
        cache[adir, s] = _artifact_stats(adir, table, s, test_corpora)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, artifacts.ArtifactError):
      continue
    found += [(a.name, split, st) for split, st in cache[adir, s]]
  return stats_lib.rows(found)


def _artifact_stats(adir: str, table: FgramTable, s: int, test_corpora: Sequence[str]
                    ) -> list[tuple[str, stats_lib.FgramStats]]:
  tok = open_tokenizer(os.path.join(adir, 'tokenizer'))
  word_start_V = stats_lib.word_starts(tok.id_to_piece, tok.vocab_size)
  train = TokenShards.open(os.path.join(adir, 'tokens', 'train'), verify=False)
  out = [('train', stats_lib.split_stats(table, s, train, word_start_V, train.num_tokens))]
  for corpus in test_corpora:
    split_dir = os.path.join(adir, 'tokens', f'eval-{corpus}')
    if os.path.isdir(split_dir):
      shards = TokenShards.open(split_dir, verify=False)
      out.append((f'test `{corpus}`', stats_lib.split_stats(
          table, s, shards, word_start_V, train.num_tokens)))
  return out
