"""A store sharded by row across the P processes of a pod: each process holds only its
shards and answers, every decode step, the rows it owns for every process
(ARCHITECTURE.md, "Tables and stores beyond one host", has the design and the measured
latency beside its model).

Ownership: the export's shard i (rows [i C, (i + 1) C), C = the manifest's chunk_rows)
belongs to process i mod P, round robin, so the frequent low rows spread over every
process; process p keeps its shards in order (its k-th is shard k P + p), in RAM or
memory-mapped (`store.open_shards`, each checked against its crc32c).

`gather(rows_N)` is called by every process in lockstep, each with its own sequences'
ids (the same N everywhere, -1 = no f-gram, a zero row):
  1. requests: an all-gather of every process's ids -> ids_PxN (int32);
  2. `answer`: for each requester q, the rows of ids_PxN[q] this process owns, packed in
     order into send_PxCxW (C = the largest such count over all pairs of processes,
     rounded up to a power of two so that few shapes compile; every process computes
     the same C from ids_PxN);
  3. an all-to-all of the answers: recv_PxCxW[p] = what process p packed for this one;
  4. `assemble`: recv[p]'s rows go back to the positions of this process's request that
     p owns.
Steps 2 and 4 are pure numpy (tests run P processes' routing in one process); 1 and 3 go
through `Exchange`: jax collectives over a mesh of one device per process (gloo on CPU,
the accelerators' interconnect on TPU/GPU), rows sent as raw bytes so every store dtype
(bf16, int8/fp8 with scales) crosses unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scone_jax.export.format import STORE_DTYPES, row_width
from scone_jax.serve.store import GatherStats, Tier, open_shards

_AXIS = 'hosts'


@dataclasses.dataclass(frozen=True)
class Ownership:
  """Which process owns which rows of a store of `num_rows` rows in shards of
  `chunk_rows`, over `process_count` processes."""
  num_rows: int
  chunk_rows: int
  process_count: int

  @property
  def num_shards(self) -> int:
    return -(-self.num_rows // self.chunk_rows)

  def shards(self, process: int) -> range:
    """The export's shards that `process` holds, in the order it keeps them."""
    return range(process, self.num_shards, self.process_count)

  def owner(self, rows: np.ndarray) -> np.ndarray:
    """The owning process of each row id (-1 for id -1)."""
    return np.where(rows >= 0, rows // self.chunk_rows % self.process_count, -1)

  def local(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index among its owner's shards, row within the shard) of each valid row id."""
    shard = rows // self.chunk_rows
    return shard // self.process_count, rows - shard * self.chunk_rows

  def capacity(self, owner_PxN: np.ndarray) -> int:
    """C: the most rows any process owns in any process's request, rounded up to a power
    of two (at most N), at least 1."""
    p = self.process_count
    n = owner_PxN.shape[1]
    flat = (owner_PxN + p * np.arange(owner_PxN.shape[0])[:, None])[owner_PxN >= 0]
    most = int(np.bincount(flat, minlength=1).max()) if flat.size else 0
    return min(1 << max(most - 1, 0).bit_length(), max(n, 1))


class Exchange:
  """The two collectives of a step over one device of each of the P processes (the jax
  distributed runtime must be started: `mesh.maybe_initialize_distributed`)."""

  def __init__(self):
    first: dict[int, jax.Device] = {}
    for device in jax.devices():
      first.setdefault(device.process_index, device)
    self.process_count = jax.process_count()
    self.process_index = jax.process_index()
    self._device = first[self.process_index]
    mesh = jax.sharding.Mesh(np.array([first[p] for p in range(self.process_count)]),
                             (_AXIS,))
    self._split = NamedSharding(mesh, P(_AXIS))
    self._all_gather = jax.jit(jax.shard_map(
        lambda x: jax.lax.all_gather(x, _AXIS, tiled=True), mesh=mesh,
        in_specs=P(_AXIS), out_specs=P(), check_vma=False))
    self._all_to_all = jax.jit(jax.shard_map(
        lambda x: jax.lax.all_to_all(x, _AXIS, 0, 0, tiled=True), mesh=mesh,
        in_specs=P(_AXIS), out_specs=P(_AXIS)))

  def _global(self, local: np.ndarray) -> jax.Array:
    shape = (self.process_count * local.shape[0],) + local.shape[1:]
    return jax.make_array_from_single_device_arrays(
        shape, self._split, [jax.device_put(local, self._device)])

  def all_gather(self, ids_N: np.ndarray) -> np.ndarray:
    """Every process's ids_N (the same N everywhere): ids_PxN, row p from process p."""
    out = self._all_gather(self._global(ids_N[None]))
    return np.asarray(out.addressable_data(0))

  def all_to_all(self, send_PxCxB: np.ndarray) -> np.ndarray:
    """send[q] goes to process q; returns recv_PxCxB, recv[p] from process p."""
    out = self._all_to_all(self._global(send_PxCxB))
    return np.asarray(out.addressable_data(0))


class ShardedStore:
  """The rows of an exported store that process `process_index` of `process_count` owns
  (`Ownership`), and the per-step exchange that gives every process the rows it asks for.

  Use `ShardedStore.open(path, tier, expect)` inside a started multi-process runtime; the
  constructor with explicit `process_index` / `process_count` and no exchange serves the
  pure routing (`answer`, `assemble`) alone. `gather(rows_N)` returns what
  `EmbeddingStore.gather(rows_N)` returns on one host: [N, W] rows, zeros for -1.
  A `Decoder` serves it through the host lookup in the host loop, every process its own
  prompts, all in lockstep (`collective`; `agree`).
  Attributes: `seconds` (requests, local answer + assembly, rows exchange: the totals
  over `calls` gathers), `nbytes` (this process's rows), `stats` (as the store's), `path`
  and `tier` (as opened).
  """

  # Each gather is a collective: a decoder runs every process's steps in lockstep.
  collective = True
  raw_rows = None  # No whole matrix here: the host lookup takes its `gather` path.

  def __init__(self, path: str, process_index: int, process_count: int, tier: Tier = 'ram',
               expect: dict[str, Any] | None = None, exchange: Exchange | None = None):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, process_count='
                       f'{process_count})')
    # The manifest first (its sizes decide the ownership), then this process's shards.
    manifest = open_shards(path, [], tier, expect)[0]
    self.ownership = Ownership(int(manifest['num_rows']), int(manifest['chunk_rows']),
                               process_count)
    self.manifest, self._owned = open_shards(
        path, self.ownership.shards(process_index), tier, expect)
    self.process_index, self.process_count = process_index, process_count
    self.path, self.tier = path, tier
    self.num_rows, self.d_model = self.ownership.num_rows, int(manifest['d_model'])
    self.dtype = STORE_DTYPES[manifest['dtype']]
    self.row_width = row_width(manifest)
    self.nbytes = sum(s.nbytes for s in self._owned)
    self._exchange = exchange
    self.seconds = np.zeros(3)
    self.calls = 0
    self.stats = GatherStats()

  @classmethod
  def open(cls, path: str, tier: Tier = 'ram', expect: dict[str, Any] | None = None
           ) -> 'ShardedStore':
    """This process's part of the store at `path`, exchanging over the jax runtime."""
    exchange = Exchange()
    return cls(path, exchange.process_index, exchange.process_count, tier, expect, exchange)

  def _check(self, rows: np.ndarray) -> None:
    bad = np.flatnonzero((rows < -1) | (rows >= self.num_rows))
    if bad.size:
      raise IndexError(f'row ids must be in [-1, {self.num_rows}); got '
                       f'{rows.flat[bad[0]]}: the matcher and the store come from different '
                       'f-gram tables')

  def _local_rows(self, rows_R: np.ndarray) -> np.ndarray:
    """[R, W] rows of valid ids this process owns."""
    shard_R, offset_R = self.ownership.local(rows_R)
    out_RxW = np.empty((rows_R.size, self.row_width), self.dtype)
    for k in np.unique(shard_R):
      sel = shard_R == k
      out_RxW[sel] = np.take(self._owned[int(k)], offset_R[sel], axis=0)
    return out_RxW

  def answer(self, ids_PxN: np.ndarray) -> np.ndarray:
    """send_PxCxW: for each process q, the rows of ids_PxN[q] this process owns, in
    request order, zero-padded to C."""
    owner_PxN = self.ownership.owner(ids_PxN)
    send = np.zeros((self.process_count, self.ownership.capacity(owner_PxN),
                     self.row_width), self.dtype)
    for q in range(self.process_count):
      rows = ids_PxN[q][owner_PxN[q] == self.process_index]
      send[q, :rows.size] = self._local_rows(rows)
    return send

  def assemble(self, ids_PxN: np.ndarray, recv_PxCxW: np.ndarray) -> np.ndarray:
    """This process's [N, W] rows from every owner's answer (zeros for id -1)."""
    owner_N = self.ownership.owner(ids_PxN[self.process_index])
    out_NxW = np.zeros((owner_N.size, self.row_width), self.dtype)
    for p in range(self.process_count):
      sel = np.flatnonzero(owner_N == p)
      out_NxW[sel] = recv_PxCxW[p, :sel.size]
    return out_NxW

  def _exchanging(self) -> Exchange:
    if self._exchange is None:
      raise ValueError('this ShardedStore has no exchange (built for routing only); open '
                       'it with ShardedStore.open inside the multi-process runtime')
    return self._exchange

  def agree(self, length: int, batch_size: int, steps: int) -> int:
    """The longest padded prompt `length` over all processes, so that every gather of a
    generation has the same N everywhere; every process must decode the same batch size
    and number of steps (ValueError on all of them otherwise)."""
    got = self._exchanging().all_gather(np.array([length, batch_size, steps], np.int32))
    if (got[:, 1:] != got[0, 1:]).any():
      raise ValueError(f'the processes serving a sharded store decode (batch_size, steps) '
                       f'{[tuple(map(int, g)) for g in got[:, 1:]]}: give every process the '
                       'same serve.batch_size and max_new_tokens (they step in lockstep)')
    return int(got[:, 0].max())

  def gather(self, rows_N: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[N, W] rows for ids `rows_N` (-1 -> zeros), written into `out` if given (as
    `EmbeddingStore.gather`); every process calls it in lockstep with the same N."""
    exchange = self._exchanging()
    rows_N = np.asarray(rows_N).reshape(-1)
    self._check(rows_N)
    t0 = time.perf_counter()
    ids_PxN = exchange.all_gather(rows_N.astype(np.int32))
    t1 = time.perf_counter()
    send = self.answer(ids_PxN)
    t2 = time.perf_counter()
    recv = exchange.all_to_all(send.view(np.uint8)).view(self.dtype)
    t3 = time.perf_counter()
    rows_NxW = self.assemble(ids_PxN, recv)
    t4 = time.perf_counter()
    self.seconds += (t1 - t0, t2 - t1 + t4 - t3, t3 - t2)
    self.calls += 1
    self.stats.add(rows_N.size, int((rows_N >= 0).sum()), rows_NxW.nbytes, t4 - t0)
    if out is None:
      return rows_NxW
    out[...] = rows_NxW
    return out
