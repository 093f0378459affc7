"""F-gram tagging of a packed batch: per-position slots into A_f's packed f-gram rows.

Dimension letters: B rows, T sequence length, G distinct f-grams matched in the batch,
K longest f-gram, R packed A_f rows (a bucket), W row width (`pack_width(K)` = 2K).

SCONE trains A_f once per DISTINCT f-gram of the batch, and A_f's work is the tokens of
those f-grams, not B*T rows padded to K:
* The matcher gives each position the id of the longest f-gram ending there (within its
  segment); the distinct ids G are the f-grams A_f runs on.
* They are PACKED into rows of W = 2K tokens (best-fit decreasing on their lengths), each
  f-gram its own segment with positions 0..len-1, so A_f (causal, segment-masked) sees
  exactly its tokens, as if it ran alone. Rows hold 2..2K/2 f-grams; packing waste is a
  few percent on real text, where padding every f-gram to K costs ~K/mean length.
* R is the smallest bucket of a geometric ladder (`row_bucket`: x`growth` per step) that
  holds the packed rows; a batch never falls back to token embeddings, whatever its size:
  a larger one just lands in a larger bucket (one more compiled shape, counted by the
  trainer). So training, eval and serving apply the same embedding rule at every position.
* `fgram_slot_BxT` is the flat index (row * W + column) of the f-gram's LAST token in the
  packed rows, where A_f's output is the f-gram's embedding; -1 = use the token embedding.
* `fgram_row_ids_RxW` holds, at that same column, the f-gram's row in the table (-1
  elsewhere): what fgram_model.kind='table' looks its embedding up by.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

STATS_PREFIX = 'stats/'
ROW_GRANULE = 8  # Buckets are multiples of 8 rows (shardable over up to 8 local devices).
FGRAM_KEYS = ('fgram_slot_BxT', 'fgram_tokens_RxW', 'fgram_positions_RxW',
              'fgram_segment_ids_RxW', 'fgram_row_ids_RxW')


class Matcher(Protocol):
  """What tagging needs from `scone_jax.fgrams.FgramTable`."""
  max_len: int
  lengths: np.ndarray

  def tokens_of(self, rows_R: np.ndarray) -> np.ndarray:
    ...

  def match(self, tokens_BxT: np.ndarray,
            segment_ids_BxT: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    ...


def pack_width(max_len: int) -> int:
  """Tokens per packed A_f row for f-grams of length <= max_len (K): 2K, so lengths pair
  up (K + K, 3 + 2 + ... ) with little waste while attention stays [2K, 2K] per row."""
  return 2 * max_len


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def row_bucket(needed: int, min_rows: int = 0, growth: float = 1.2) -> int:
  """The smallest ladder value >= needed. Ladder: round_up(max(min_rows, 8), 8), then each
  value x growth (at least +8), rounded up to a multiple of 8. Unbounded: every batch fits.
  """
  if growth <= 1.0:
    raise ValueError(f'f-gram bucket growth must be > 1, got {growth} '
                     '(config.fgram_model.bucket_growth)')
  rows = _round_up(max(min_rows, ROW_GRANULE), ROW_GRANULE)
  while rows < needed:
    rows = _round_up(max(math.ceil(rows * growth), rows + ROW_GRANULE), ROW_GRANULE)
  return rows


def pack_lengths(lens_G: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Best-fit-decreasing packing of items of lengths lens_G (each <= width) into rows.

  Longest items first; each goes to the open row with the LEAST remaining space that
  holds it, else to new rows. Items of one length are placed in blocks (numpy), so the
  Python loop runs over (length, remaining space) pairs, not items. Deterministic.

  Returns:
    (row_G, col_G, num_rows): item g occupies row row_G[g], columns col_G[g] ..
    col_G[g] + lens_G[g] - 1.
  """
  lens_G = np.asarray(lens_G, np.int64)
  if lens_G.size and (lens_G.min() < 1 or lens_G.max() > width):
    raise ValueError(f'item lengths must be in [1, {width}], got {lens_G.min()}..'
                     f'{lens_G.max()}')
  row_G = np.zeros(lens_G.shape, np.int64)
  col_G = np.zeros(lens_G.shape, np.int64)
  open_rows: dict[int, np.ndarray] = {}  # remaining space -> open row ids (FIFO).
  num_rows = 0

  def push(space: int, rows: np.ndarray) -> None:
    if space > 0 and rows.size:
      open_rows[space] = np.concatenate([open_rows.get(space, rows[:0]), rows])

  for length in np.unique(lens_G)[::-1]:
    length = int(length)
    items = np.flatnonzero(lens_G == length)
    pos = 0
    while pos < items.size:
      fits = [s for s, r in open_rows.items() if s >= length and r.size]
      if not fits:
        break
      space = min(fits)
      rows = open_rows[space]
      m = min(items.size - pos, rows.size)
      row_G[items[pos:pos + m]] = rows[:m]
      col_G[items[pos:pos + m]] = width - space
      open_rows[space] = rows[m:]
      push(space - length, rows[:m])
      pos += m
    rest = items.size - pos
    if rest:
      per_row = width // length
      new_rows = num_rows + np.arange(-(-rest // per_row))
      num_rows += new_rows.size
      k = np.arange(rest)
      row_G[items[pos:]] = new_rows[k // per_row]
      col_G[items[pos:]] = (k % per_row) * length
      push(width - per_row * length, new_rows[:rest // per_row])
      if rest % per_row:
        push(width - (rest % per_row) * length, new_rows[-1:])
  return row_G, col_G, num_rows


def tag_fgrams(batch: dict[str, np.ndarray], table: Matcher, capacity: int = 0,
               growth: float = 1.2) -> dict[str, Any]:
  """Adds the packed f-gram arrays (FGRAM_KEYS) and f-gram stats to `batch`.

  Args:
    batch: a packed batch (inputs_BxT, segment_ids_BxT, ...); not modified.
    table: the f-gram table (its `match`, `tokens_of`, `max_len`, `lengths`).
    capacity: the smallest row bucket (config.fgram_model.capacity; 0 = 8 rows). A batch
      needing more rows gets a larger bucket (stat fgram_above_capacity = 1), never a
      fallback to token embeddings.
    growth: the bucket ladder's ratio (config.fgram_model.bucket_growth).

  Returns:
    A new dict: `batch`'s entries plus FGRAM_KEYS and float32 scalars under stats/:
    fgram_matched_frac (matched / real positions), fgram_unique (G),
    fgram_unique_per_matched, fgram_tokens (sum of the G f-grams' lengths),
    fgram_rows (R), fgram_af_tokens (R * W: A_f's work), fgram_af_tokens_per_token
    (R * W / (B * T): "A_f tokens per main-model token"), fgram_above_capacity (0/1).
  """
  if capacity < 0:
    raise ValueError(f'f-gram capacity must be >= 0, got {capacity} '
                     '(config.fgram_model.capacity)')
  segment_ids_BxT = batch['segment_ids_BxT']
  ids_BxT, _ = table.match(batch['inputs_BxT'], segment_ids_BxT)
  ids_BxT = np.asarray(ids_BxT, dtype=np.int64)
  if ids_BxT.shape != segment_ids_BxT.shape:
    raise ValueError(f'table.match returned ids of shape {ids_BxT.shape}, expected '
                     f'{segment_ids_BxT.shape}')
  matched_BxT = (ids_BxT >= 0) & (segment_ids_BxT > 0)  # Padding never uses A_f.
  ids_G, inverse = np.unique(ids_BxT[matched_BxT], return_inverse=True)
  k = int(table.max_len)  # Only the G matched rows' tokens are read: S x K never is.
  width = pack_width(k)
  lens_G = np.asarray(table.lengths)[ids_G].astype(np.int64)
  row_G, col_G, needed = pack_lengths(lens_G, width)
  rows = row_bucket(needed, capacity, growth)

  # Scatter each f-gram's tokens into its row: flat index row * W + col + j for j < len.
  j_K = np.arange(k)
  flat_GxK = (row_G * width + col_G)[:, None] + j_K[None]
  valid_GxK = j_K[None] < lens_G[:, None]
  flat = flat_GxK[valid_GxK]
  tokens_N = np.zeros(rows * width, np.int32)
  positions_N = np.zeros(rows * width, np.int32)
  segments_N = np.zeros(rows * width, np.int32)
  tokens_N[flat] = table.tokens_of(ids_G)[valid_GxK]
  positions_N[flat] = np.broadcast_to(j_K, flat_GxK.shape)[valid_GxK]
  # Items in one row start at distinct columns, so col + 1 is a unique segment id.
  segments_N[flat] = np.broadcast_to((col_G + 1)[:, None], flat_GxK.shape)[valid_GxK]
  last_G = row_G * width + col_G + lens_G - 1
  row_ids_N = np.full(rows * width, -1, np.int32)
  row_ids_N[last_G] = ids_G

  slot_BxT = np.full(ids_BxT.shape, -1, np.int32)
  slot_BxT[matched_BxT] = last_G[inverse.reshape(-1)]
  num_real = max(int((segment_ids_BxT > 0).sum()), 1)
  num_matched = int(matched_BxT.sum())
  num_unique = int(ids_G.shape[0])
  out = dict(batch)
  out['fgram_slot_BxT'] = slot_BxT
  out['fgram_tokens_RxW'] = tokens_N.reshape(rows, width)
  out['fgram_positions_RxW'] = positions_N.reshape(rows, width)
  out['fgram_segment_ids_RxW'] = segments_N.reshape(rows, width)
  out['fgram_row_ids_RxW'] = row_ids_N.reshape(rows, width)
  stats = {
      'fgram_matched_frac': num_matched / num_real,
      'fgram_unique': num_unique,
      'fgram_unique_per_matched': num_unique / max(num_matched, 1),
      'fgram_tokens': int(lens_G.sum()),
      'fgram_rows': rows,
      'fgram_af_tokens': rows * width,
      'fgram_af_tokens_per_token': rows * width / segment_ids_BxT.size,
      'fgram_above_capacity': float(capacity > 0 and needed > capacity),
  }
  out.update({STATS_PREFIX + name: np.float32(v) for name, v in stats.items()})
  return out


def pad_fgram_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
  """`batch` with its packed f-gram rows padded (empty rows, segment 0) to `rows`.

  Slots are flat indices row * W + column, so appending rows leaves them valid.
  """
  have = batch['fgram_tokens_RxW'].shape[0]
  if rows < have:
    raise ValueError(f'cannot pad {have} f-gram rows down to {rows}')
  if rows == have:
    return batch
  out = dict(batch)
  for key in FGRAM_KEYS[1:]:
    value = batch[key]
    fill = -1 if key == 'fgram_row_ids_RxW' else 0  # No table row, like other padding.
    out[key] = np.concatenate([value, np.full((rows - have,) + value.shape[1:], fill,
                                              value.dtype)])
  return out
