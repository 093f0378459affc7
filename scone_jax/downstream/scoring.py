"""Log-likelihood of continuations, packed into few compiled shapes, reduced on the device.

Dimension letters: B rows per batch, T row length, W a store row's width, N sequences.

A sequence is [BOS] + context tokens + continuation tokens; its log-likelihood is the sum
of log p(continuation token | everything before it). A call's sequences are sorted by
length and packed by best-fit decreasing (`batches.tagging.pack_lengths`) into rows of
one length T, the smallest of a doubling ladder (32, 64, ... up to the model's window)
that holds the longest; each sequence is its own segment (positions restart at 0,
attention stays within the segment), so a packed row scores what its sequences score
alone. Each batch has B rows; the last is padded with
empty rows. The jitted scorer returns, per row, the sum of the continuation's log-probs
and whether every continuation token is the argmax, for each segment: [B, T] floats and
booleans, never [B, T, V] logits.

Two paths give the input embeddings:
  train  the training forward (`SconeLM.__call__`): the batch is tagged with the f-gram
         table (`batches.tagging.tag_fgrams`, as evaluate.py's batches are) and A_f runs
         on the batch's distinct f-grams (kind='table': their trained rows).
  store  the served model: `FgramTable.match` on the host, the matched rows gathered from
         the exported `EmbeddingStore`, joined by the one combine rule with the store's
         rule (`cfg.fgram_model.stored_rule`), then `lm.backbone`: the device runs the
         baseline's computation plus the elementwise join (and a quantised store's
         dequantisation).
F-grams match within a segment, so they span the context/continuation boundary and
reach back into few-shot examples exactly as the training forward sees them.

With several processes (jax.process_count() > 1) process 0 drives: it alone plans, and it
broadcasts each step to the others (`Scorer.serve` on those): a fixed-shape header
(`Message`), then each packed batch (every process builds the same [B, T] arrays from
it, so the shapes are known from the header). Every process then tags or gathers the
f-gram rows of its own slice of rows and runs the same jitted scorer on the global
batch; the per-segment sums come back replicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from scone_jax import batches, compat
from scone_jax.batches import tagging
from scone_jax.downstream.tasks import TaskFileError
from scone_jax.errors import UserError
from scone_jax.export import quant
from scone_jax.model import combine as combine_lib

MIN_ROW_LEN = 32


@dataclasses.dataclass(frozen=True)
class Seq:
  """One scored sequence: tokens = [BOS] + context + continuation (int32)."""
  tokens: np.ndarray
  num_continuation: int


def make_seq(bos_id: int, ctx_enc: np.ndarray, cont_enc: np.ndarray, window: int,
             truncate: bool = True, where: str = '') -> tuple[Seq, bool]:
  """[BOS] + context + continuation, its context's oldest tokens cut (truncate=True) so
  its inputs (all but the last token) fit the window; returns (seq, whether cut).

  Raises:
    TaskFileError: an empty continuation, one that cannot fit the window even alone, or
      (truncate=False) a context that does not fit; `where` names the request.
  """
  ctx_enc = np.asarray(ctx_enc, np.int32)
  cont_enc = np.asarray(cont_enc, np.int32)
  if not cont_enc.size:
    raise TaskFileError(f'{where}: a choice encodes to no tokens; fix the choice text')
  room = window - cont_enc.size  # Context tokens that fit: inputs = BOS + ctx + cont - 1.
  if room < 0:
    raise TaskFileError(f'{where}: a continuation of {cont_enc.size} tokens does not fit '
                        f'the model\'s window of {window} (config.model.max_seq_len) with '
                        'BOS; shorten the choice or drop the document')
  cut = ctx_enc.size > room
  if cut:
    if not truncate:
      raise TaskFileError(f'{where}: context + continuation = '
                          f'{ctx_enc.size + cont_enc.size} tokens exceed the model\'s window '
                          f'of {window}; shorten it, or allow left truncation (drop '
                          '--notruncate)')
    ctx_enc = ctx_enc[ctx_enc.size - room:]
  tokens = np.concatenate([np.array([bos_id], np.int32), ctx_enc, cont_enc])
  return Seq(tokens, int(cont_enc.size)), bool(cut)


def rolling_seqs(tokens: np.ndarray, bos_id: int, seq_len: int) -> list[Seq]:
  """A document scored whole as evaluate.py scores it: [BOS] + tokens cut into chunks of
  seq_len targets (batches/packing.py's examples), each chunk its own sequence whose
  every target counts; the chunks' log-likelihoods sum to the document's."""
  with_bos = np.concatenate([np.array([bos_id], np.int32), np.asarray(tokens, np.int32)])
  return [Seq(with_bos[s:s + seq_len + 1], int(min(seq_len, with_bos.size - 1 - s)))
          for s in range(0, with_bos.size - 1, seq_len)]


def row_lengths(window: int) -> list[int]:
  """The compiled row lengths: 32, 64, ... doubling, capped at (and ending with) window."""
  out, t = [], MIN_ROW_LEN
  while t < window:
    out.append(t)
    t *= 2
  return out + [window]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sequences placed into batches: batch i has rows of length lengths[i], row r of it
  holding the sequences rows[i][r] (segment ids 1, 2, ... in that order)."""
  lengths: list[int]
  rows: list[list[list[int]]]  # batch -> row -> sequence indices in column order.


def plan(seqs: Sequence[Seq], window: int, rows_per_batch: int) -> Plan:
  """Packs every sequence (longest first, best-fit decreasing on their inputs = tokens -
  1) into rows of ONE length: the smallest ladder length that holds the longest, so short
  requests on a long-window model get short rows (attention is quadratic in the row) and a
  call compiles one row shape; rows_per_batch rows a batch."""
  inputs_N = np.array([len(s.tokens) - 1 for s in seqs], np.int64)
  if not inputs_N.size:
    return Plan([], [])
  if inputs_N.max() > window:
    raise ValueError(f'a sequence of {inputs_N.max()} inputs exceeds the window {window}')
  ladder = row_lengths(window)
  t = ladder[int(np.searchsorted(np.array(ladder), inputs_N.max()))]
  row_G, col_G, num_rows = tagging.pack_lengths(inputs_N, t)
  packed = [[] for _ in range(num_rows)]
  for g in np.lexsort((col_G, row_G)):
    packed[row_G[g]].append(int(g))
  starts = range(0, num_rows, rows_per_batch)
  return Plan([t] * len(starts), [packed[i:i + rows_per_batch] for i in starts])


def build_batch(seqs: Sequence[Seq], rows: list[list[int]], t: int,
                rows_per_batch: int) -> dict[str, np.ndarray]:
  """The packed arrays of one batch: inputs, targets, positions, segment ids (1.. per
  sequence in its row, 0 = padding) and weights (1 at the continuation's targets)."""
  shape = (rows_per_batch, t)
  out = {k: np.zeros(shape, np.int32) for k in
         ('inputs_BxT', 'targets_BxT', 'positions_BxT', 'segment_ids_BxT')}
  out['weights_BxT'] = np.zeros(shape, np.float32)
  for r, members in enumerate(rows):
    col = 0
    for seg, n in enumerate(members, start=1):
      tokens = seqs[n].tokens
      k = len(tokens) - 1
      sl = slice(col, col + k)
      out['inputs_BxT'][r, sl] = tokens[:-1]
      out['targets_BxT'][r, sl] = tokens[1:]
      out['positions_BxT'][r, sl] = np.arange(k)
      out['segment_ids_BxT'][r, sl] = seg
      out['weights_BxT'][r, col + k - seqs[n].num_continuation:col + k] = 1.0
      col += k
  return out


def segment_sums(logits_BxTxV: jax.Array, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
  """Per row and segment id s (index s - 1): the summed log-probs of the weighted targets
  and whether each of them has the largest logit (a tie with another token counts as
  greedy). Returns ([B, T] float32, [B, T] bool).

  log p = target logit - logsumexp (as model/loss.py): no [B, T, V] log-softmax is built.
  """
  b, t = batch['targets_BxT'].shape
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  targets_BxT = batch['targets_BxT']
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  logp_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  weights_BxT = batch['weights_BxT']
  greedy_BxT = (target_BxT >= jnp.max(logits_BxTxV, axis=-1)) | (weights_BxT == 0)
  index_BxT = (jnp.arange(b)[:, None] * t + jnp.maximum(batch['segment_ids_BxT'] - 1, 0))
  index_N = index_BxT.reshape(-1)
  sums = jax.ops.segment_sum((logp_BxT * weights_BxT).reshape(-1), index_N, b * t)
  greedy = jax.ops.segment_min(greedy_BxT.reshape(-1).astype(jnp.int32), index_N, b * t)
  return sums.reshape(b, t), greedy.reshape(b, t) > 0


class Message(enum.IntEnum):
  """What process 0 sends the others next: the header [kind, row length T, batches]."""
  DONE = 0  # Scoring is over.
  FAILED = 1  # Process 0 stopped on an error.
  SCORE = 2  # `batches` packed batches of rows of length T follow.
  COMPILE = 3  # Compile the scorer for rows of length T (`flops_per_token`).


class DriverFailed(UserError):
  """Raised on the other processes when process 0 stopped on an error."""

  def __init__(self):
    super().__init__('process 0 stopped on an error (its output names it); this process '
                     'wrote nothing')


Broadcast = Callable[[dict[str, np.ndarray] | np.ndarray], dict[str, np.ndarray] | np.ndarray]


def broadcast_from_0(tree):
  """Process 0's arrays on every process (the others pass arrays of the same shapes)."""
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


class Scorer:
  """Scores sequences with `lm` through the train path, or the store path if `store`.

  With several processes, process 0 calls the scorer (and `flops_per_token`) inside
  `driving()` while every other process runs `serve()`.
  """

  def __init__(self, lm, mesh: jax.sharding.Mesh, *, window: int, rows_per_batch: int = 8,
               table=None, store=None, stored_rule: str = 'replace', capacity: int = 0,
               bucket_growth: float = 1.2, broadcast: Broadcast | None = None):
    """
    Args:
      lm: the SconeLM (baseline or SCONE).
      mesh: where its parameters live; batches are split over its data axes.
      window: the longest row (inputs) the model takes (config.model.max_seq_len).
      rows_per_batch: B (a multiple of the mesh's data-parallel size).
      table: the f-gram table (sliced to the S in use) for SCONE; None for a baseline.
      store: the exported EmbeddingStore: selects the store path (SCONE only).
      stored_rule: the rule applied to store rows (cfg.fgram_model.stored_rule).
      capacity, bucket_growth: the f-gram row ladder of the train path
        (cfg.fgram_model.capacity / bucket_growth, as training tags its batches).
      broadcast: how process 0's headers and batches reach the other processes (default:
        `broadcast_from_0` with several processes; nothing is sent with one).
    """
    if lm.has_fgram_side and table is None:
      raise ValueError('a SCONE model needs its f-gram table to score')
    if store is not None and not lm.has_fgram_side:
      raise ValueError('path=store needs a SCONE model (a baseline has no store)')
    self.path = 'store' if store is not None else 'train'
    self._mesh, self.window, self.rows_per_batch = mesh, window, rows_per_batch
    self._table = table if lm.has_fgram_side else None
    self._store = store
    self._capacity, self._growth = capacity, bucket_growth
    self._broadcast = broadcast or (broadcast_from_0 if jax.process_count() > 1 else None)
    graphdef, self._state = nnx.split(lm)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    uses_store = store is not None

    def score(state, batch):
      model = nnx.merge(graphdef, state)
      if uses_store:
        x_BxTxD = model.backbone.embed(batch['inputs_BxT'])
        rows_BxTxD = quant.dequantize(batch['store_rows_BxTxW'], x_BxTxD.shape[-1])
        x_BxTxD = combine_lib.combine(x_BxTxD, rows_BxTxD, batch['store_mask_BxT'],
                                      stored_rule)
        logits = model.backbone(x_BxTxD, batch['positions_BxT'], batch['segment_ids_BxT'])
      else:
        logits = model(batch)
      return segment_sums(logits, batch)
    self._score = jax.jit(score, out_shardings=replicated)

  def model_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed batch plus what the path needs: the f-gram tagging (train) or the store's
    rows and match mask (store)."""
    if self._table is None:
      return batch
    if self._store is None:
      tagged = tagging.tag_fgrams(batch, self._table, self._capacity, self._growth)
      return batches.split_stats(tagged)[0]
    segments_BxT = batch['segment_ids_BxT']
    ids_BxT = np.asarray(self._table.match(batch['inputs_BxT'], segments_BxT)[0], np.int64)
    ids_BxT = np.where(segments_BxT > 0, ids_BxT, -1)
    rows_NxW = self._store.gather(np.ascontiguousarray(ids_BxT.reshape(-1)))
    out = dict(batch)
    out['store_rows_BxTxW'] = rows_NxW.reshape(ids_BxT.shape + (rows_NxW.shape[-1],))
    out['store_mask_BxT'] = ids_BxT >= 0
    return out

  def _global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Every process holds the same batch (process 0's); each contributes its contiguous
    slice of rows (and its own f-gram rows) to the global arrays."""
    p, n = jax.process_index(), jax.process_count()
    if n > 1:
      per = self.rows_per_batch // n
      batch = {k: v[p * per:(p + 1) * per] for k, v in batch.items()}
    return batches.to_global_arrays(self.model_inputs(batch), self._mesh)

  def _send(self, kind: Message, t: int = 0, num_batches: int = 0) -> None:
    if self._broadcast is not None:
      if jax.process_index() != 0:
        raise ValueError('only process 0 calls the scorer; the others run serve()')
      self._broadcast(np.array([kind, t, num_batches], np.int32))

  def _shared(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch if self._broadcast is None else self._broadcast(batch)

  def _compile(self, t: int):
    # On an empty batch: the f-gram bucket of the train path is its smallest.
    batch = build_batch([], [], t, self.rows_per_batch)
    with compat.set_mesh(self._mesh):
      return self._score.lower(self._state, self._global_batch(batch)).compile()

  def compiled(self, t: int):
    """The compiled scorer for rows of length t (process 0 of several: the others compile
    it too, as the train path agrees on its f-gram rows across processes)."""
    self._send(Message.COMPILE, t)
    return self._compile(t)

  @contextlib.contextmanager
  def driving(self):
    """Process 0's scoring session: on leaving it the other processes' `serve` returns,
    or raises `DriverFailed` if it is left by an exception."""
    try:
      yield self
    except BaseException:
      self._send(Message.FAILED)
      raise
    self._send(Message.DONE)

  def serve(self) -> None:
    """The other processes' side: compiles and scores what process 0 sends (the same
    batches, their own f-gram rows) until it leaves `driving()`."""
    if self._broadcast is None:
      raise ValueError('serve() is for the processes other than 0 of a multi-process run')
    while True:
      kind, t, num_batches = (int(v) for v in self._broadcast(np.zeros(3, np.int32)))
      if kind == Message.DONE:
        return
      if kind == Message.FAILED:
        raise DriverFailed()
      if kind == Message.COMPILE:
        self._compile(t)
        continue
      with compat.set_mesh(self._mesh):
        for _ in range(num_batches):
          batch = self._broadcast(build_batch([], [], t, self.rows_per_batch))
          self._score(self._state, self._global_batch(batch))

  def __call__(self, seqs: Sequence[Seq]) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood of each continuation in nats [N] float64, greedy [N] bool)."""
    if self.rows_per_batch % jax.process_count():
      raise ValueError(f'rows_per_batch={self.rows_per_batch} must divide over the '
                       f'{jax.process_count()} processes')
    pl = plan(seqs, self.window, self.rows_per_batch)
    pending = []
    with compat.set_mesh(self._mesh):
      if pl.rows:  # One row length a call (`plan`): one header, then its batches.
        self._send(Message.SCORE, pl.lengths[0], len(pl.rows))
      for t, rows in zip(pl.lengths, pl.rows):
        batch = self._shared(build_batch(seqs, rows, t, self.rows_per_batch))
        pending.append((rows, self._score(self._state, self._global_batch(batch))))
    ll_N = np.zeros(len(seqs), np.float64)
    greedy_N = np.zeros(len(seqs), bool)
    for rows, (sums, greedy) in pending:
      sums, greedy = np.asarray(sums), np.asarray(greedy)
      for r, members in enumerate(rows):
        for seg, n in enumerate(members):
          ll_N[n], greedy_N[n] = sums[r, seg], greedy[r, seg]
    return ll_N, greedy_N


def rolling_loglikelihoods(scorer: Scorer, docs: Sequence[np.ndarray], bos_id: int,
                           seq_len: int) -> list[float]:
  """Each document's summed log-likelihood (nats) with evaluate.py's chunking
  (`rolling_seqs`)."""
  seqs, owner = [], []
  for d, tokens in enumerate(docs):
    chunk = rolling_seqs(tokens, bos_id, seq_len)
    seqs += chunk
    owner += [d] * len(chunk)
  ll_N, _ = scorer(seqs)
  return np.bincount(np.array(owner, np.int64), weights=ll_N, minlength=len(docs)).tolist()


def flops_per_token(scorer: Scorer, t: int) -> float:
  """XLA's FLOP count of one compiled batch of rows of length t, per row token."""
  return compat.cost_flops(scorer.compiled(t)) / (scorer.rows_per_batch * t)

