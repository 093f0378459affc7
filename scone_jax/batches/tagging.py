"""F-gram tagging of a packed batch: per-position slots into the batch's distinct f-grams.

Dimension letters: B rows, T sequence length, G distinct f-grams matched in the batch,
U static capacity (rows of the f-gram list fed to A_f), K longest f-gram.

SCONE trains A_f once per DISTINCT f-gram of the batch: the matcher gives each position the
id of the longest f-gram ending there (within its segment), we keep the unique ids as a
static-size list `fgram_tokens_UxK`, and each position points into it (`fgram_slot_BxT`,
-1 = use the token embedding).

Capacity overflow (G > U): we keep the U f-grams matched at the most positions of the
batch (ties: lower table row first, i.e. the more frequent f-gram in the corpus), so
the fallback touches as few positions as possible; positions of the dropped f-grams fall
back to their token embedding, exactly as if they had no match, and are counted in
`stats/fgram_overflow_positions`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

STATS_PREFIX = 'stats/'


class Matcher(Protocol):
  """What tagging needs from `scone_jax.fgrams.FgramTable`."""
  tokens_SxK: np.ndarray
  lengths: np.ndarray

  def match(self, tokens_BxT: np.ndarray,
            segment_ids_BxT: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    ...


def tag_fgrams(batch: dict[str, np.ndarray], table: Matcher,
               capacity: int) -> dict[str, Any]:
  """Adds fgram_slot_BxT, fgram_tokens_UxK, fgram_lens_U and f-gram stats to `batch`.

  Args:
    batch: a packed batch (inputs_BxT, segment_ids_BxT, ...); not modified.
    table: the f-gram table (its `match`, `tokens_SxK`, `lengths`).
    capacity: U, the static number of f-gram rows (> 0).

  Returns:
    A new dict: `batch`'s entries plus the three f-gram arrays and float32 scalars
    stats/fgram_matched_frac (matched / real positions), stats/fgram_unique (G),
    stats/fgram_unique_per_matched, stats/fgram_overflow_grams (G - kept) and
    stats/fgram_overflow_positions (positions that fell back because of capacity).
  """
  if capacity < 1:
    raise ValueError(f'f-gram capacity must be >= 1, got {capacity}')
  segment_ids_BxT = batch['segment_ids_BxT']
  ids_BxT, _ = table.match(batch['inputs_BxT'], segment_ids_BxT)
  ids_BxT = np.asarray(ids_BxT, dtype=np.int64)
  if ids_BxT.shape != segment_ids_BxT.shape:
    raise ValueError(f'table.match returned ids of shape {ids_BxT.shape}, expected '
                     f'{segment_ids_BxT.shape}')
  matched_BxT = (ids_BxT >= 0) & (segment_ids_BxT > 0)  # Padding never uses A_f.
  ids_G, inverse, counts_G = np.unique(ids_BxT[matched_BxT], return_inverse=True,
                                       return_counts=True)
  num_unique = ids_G.shape[0]
  if num_unique > capacity:
    by_count = np.lexsort((ids_G, -counts_G))  # Most positions first, then table rank.
    kept = np.sort(by_count[:capacity])
  else:
    kept = np.arange(num_unique)
  slot_of_G = np.full(num_unique, -1, np.int64)
  slot_of_G[kept] = np.arange(kept.shape[0])

  slot_BxT = np.full(ids_BxT.shape, -1, np.int32)
  slot_BxT[matched_BxT] = slot_of_G[inverse.reshape(-1)]
  tokens_SxK = table.tokens_SxK
  tokens_UxK = np.zeros((capacity, tokens_SxK.shape[1]), np.int32)
  lens_U = np.zeros(capacity, np.int32)
  rows = ids_G[kept]
  tokens_UxK[:rows.shape[0]] = tokens_SxK[rows]
  lens_U[:rows.shape[0]] = np.asarray(table.lengths)[rows]

  num_real = max(int((segment_ids_BxT > 0).sum()), 1)
  num_matched = int(matched_BxT.sum())
  out = dict(batch)
  out['fgram_slot_BxT'] = slot_BxT
  out['fgram_tokens_UxK'] = tokens_UxK
  out['fgram_lens_U'] = lens_U
  out[STATS_PREFIX + 'fgram_matched_frac'] = np.float32(num_matched / num_real)
  out[STATS_PREFIX + 'fgram_unique'] = np.float32(num_unique)
  out[STATS_PREFIX + 'fgram_unique_per_matched'] = np.float32(
      num_unique / max(num_matched, 1))
  out[STATS_PREFIX + 'fgram_overflow_grams'] = np.float32(num_unique - kept.shape[0])
  out[STATS_PREFIX + 'fgram_overflow_positions'] = np.float32(
      num_matched - int((slot_BxT >= 0).sum()))
  return out
