"""Batch pipeline vs plain-Python references: packing, order, resume, tagging, eval."""

import dataclasses

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scone_jax import batches
from scone_jax import config as config_lib
from scone_jax.batches import order as order_lib
from scone_jax.batches import packing
import train_helpers as th

BOS = 1
SEQ_LEN = 16


class FakeShards:
  """The TokenShards attributes the pipeline uses."""

  def __init__(self, docs):
    self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    self.tokens = (np.concatenate(docs) if docs else np.zeros(0)).astype(np.uint16)
    self.num_docs = len(docs)
    self.num_tokens = int(self.offsets[-1])
    self.num_bytes = 4 * self.num_tokens

  def doc(self, i):
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]


class FakeTable:
  """FgramTable stand-in whose match is the plain-Python reference matcher."""

  def __init__(self, grams):
    self._grams = [tuple(g) for g in grams]
    self._index = {g: i for i, g in enumerate(self._grams)}
    self.max_len = max(len(g) for g in self._grams)
    self.lengths = np.array([len(g) for g in self._grams], np.int32)
    self.tokens_SxK = np.zeros((len(self._grams), self.max_len), np.int32)
    for i, g in enumerate(self._grams):
      self.tokens_SxK[i, :len(g)] = g

  def __len__(self):
    return len(self._grams)

  def tokens_of(self, rows):
    return self.tokens_SxK[rows]

  def slice(self, size):
    return FakeTable(self._grams[:size])

  def reference_gram(self, tokens, segments, t):
    """Longest f-gram ending at t within t's segment (None if none or padding)."""
    if segments[t] == 0:
      return None
    best = None
    for n in range(2, self.max_len + 1):
      j = t - n + 1
      if j < 0 or any(segments[k] != segments[t] for k in range(j, t + 1)):
        break
      gram = tuple(int(x) for x in tokens[j:t + 1])
      if gram in self._index:
        best = gram
    return best

  def match(self, tokens_BxT, segment_ids_BxT=None):
    if segment_ids_BxT is None:
      segment_ids_BxT = np.ones_like(tokens_BxT)
    ids = np.full(tokens_BxT.shape, -1, np.int32)
    lens = np.ones(tokens_BxT.shape, np.int32)
    for b in range(tokens_BxT.shape[0]):
      for t in range(tokens_BxT.shape[1]):
        gram = self.reference_gram(tokens_BxT[b], segment_ids_BxT[b], t)
        if gram is not None:
          ids[b, t], lens[b, t] = self._index[gram], len(gram)
    return ids, lens


def make_docs(seed=0, num_docs=60, vocab=(4, 12)):
  rng = np.random.default_rng(seed)
  lengths = rng.choice([0, 1, 3, 7, 12, 15, 16, 17, 33, 40], size=num_docs)
  return [rng.integers(*vocab, size=n) for n in lengths]


def make_cfg(**overrides):
  values = {'train.seq_len': SEQ_LEN, 'train.batch_size': 4, 'model.max_seq_len': SEQ_LEN,
            'train.data_prefetch': 0}
  values.update(overrides)
  return config_lib.replace(config_lib.from_configdict(config_lib.base_config()), **values)


def frequent_grams(docs, per_length=8):
  """The most frequent bi- and trigrams, ranked like the miner (count desc, len, ids)."""
  counts = {}
  for d in docs:
    for n in (2, 3):
      for i in range(len(d) - n + 1):
        g = tuple(int(x) for x in d[i:i + n])
        counts[g] = counts.get(g, 0) + 1
  key = lambda g: (-counts[g], len(g), g)
  grams = [g for n in (2, 3)
           for g in sorted((g for g in counts if len(g) == n), key=key)[:per_length]]
  return sorted(grams, key=key)


def reference_rows(docs, doc_order, seq_len, open_rows=packing.OPEN_ROWS):
  """Plain-Python packing: examples per document, first-fit rows, token lists."""
  examples = []
  for d in doc_order:
    with_bos = [BOS] + [int(x) for x in docs[d]]
    for s in range(0, len(docs[d]), seq_len):
      n = min(seq_len, len(docs[d]) - s)
      examples.append((with_bos[s:s + n], with_bos[s + 1:s + n + 1]))
  size = lambda row: sum(len(x) for x, _ in row)
  rows, waiting = [], []
  for ex in examples:
    fits = [row for row in waiting if size(row) + len(ex[0]) <= seq_len]
    if fits:
      fits[0].append(ex)
      if size(fits[0]) == seq_len:
        rows.append(fits[0])
        waiting = [row for row in waiting if row is not fits[0]]
    elif len(ex[0]) == seq_len:
      rows.append([ex])
    else:
      if len(waiting) == open_rows:
        rows.append(waiting.pop(0))
      waiting.append([ex])
  rows += waiting
  out = []
  for row in rows:
    inputs, targets, segs, pos = [], [], [], []
    for k, (x, y) in enumerate(row):
      inputs += x
      targets += y
      segs += [k + 1] * len(x)
      pos += list(range(len(x)))
    pad = seq_len - len(inputs)
    out.append((inputs + [0] * pad, targets + [0] * pad, segs + [0] * pad, pos + [0] * pad))
  return out


def test_first_fit_by_hand():
  lengths = np.array([10, 10, 6, 4, 16, 3])
  perm, starts = packing.first_fit_rows(lengths, 16, open_rows=2)
  rows = [perm[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
  assert rows == [[0, 2], [4], [1, 3], [5]]
  perm, starts = packing.first_fit_rows(lengths, 16, open_rows=1)  # Next-fit.
  rows = [perm[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
  assert rows == [[0], [1, 2], [4], [3, 5]]


def test_packing_matches_reference_and_covers_every_token_once(tmp_path):
  docs = make_docs()
  shards = FakeShards(docs)
  # Read through a memmap, as TokenShards does.
  shards.tokens.tofile(tmp_path / 'tokens.bin')
  shards.tokens = np.memmap(tmp_path / 'tokens.bin', dtype=np.uint16, mode='r')
  examples = packing.make_examples(shards.offsets, SEQ_LEN)
  rows = order_lib.RowOrder(examples, SEQ_LEN, seed=3)
  doc_order = rows.doc_order(0)
  ref = reference_rows(docs, doc_order, SEQ_LEN)
  assert rows.rows_per_first_epoch == len(ref)
  got = packing.build_rows(examples, rows.rows(0, len(ref)), shards.tokens, shards.offsets,
                           BOS, SEQ_LEN)
  for r, (inputs, targets, segs, pos) in enumerate(ref):
    np.testing.assert_array_equal(got['inputs_BxT'][r], inputs)
    np.testing.assert_array_equal(got['targets_BxT'][r], targets)
    np.testing.assert_array_equal(got['segment_ids_BxT'][r], segs)
    np.testing.assert_array_equal(got['positions_BxT'][r], pos)
    np.testing.assert_array_equal(got['weights_BxT'][r], np.array(segs) > 0)
  # Every non-empty document appears once per epoch; weighted targets = the corpus.
  assert sorted(doc_order.tolist()) == [i for i, d in enumerate(docs) if len(d)]
  assert got['weights_BxT'].sum() == shards.num_tokens
  real_targets = np.sort(got['targets_BxT'][got['weights_BxT'] > 0])
  np.testing.assert_array_equal(real_targets, np.sort(shards.tokens.astype(np.int32)))


def test_order_is_deterministic_and_seed_dependent_across_epochs():
  examples = packing.make_examples(FakeShards(make_docs()).offsets, SEQ_LEN)
  a = order_lib.RowOrder(examples, SEQ_LEN, seed=7)
  b = order_lib.RowOrder(examples, SEQ_LEN, seed=7)
  c = order_lib.RowOrder(examples, SEQ_LEN, seed=8)
  np.testing.assert_array_equal(a.doc_order(1), b.doc_order(1))
  assert not np.array_equal(a.doc_order(0), a.doc_order(1))
  assert not np.array_equal(a.doc_order(0), c.doc_order(0))
  # Random access into a later epoch equals sequential access.
  total = 3 * a.rows_per_first_epoch
  late = b.rows(total, 5)
  a.rows(0, total)
  for x, y in zip(a.rows(total, 5), late):
    np.testing.assert_array_equal(x, y)
  blocked = order_lib.RowOrder(examples, SEQ_LEN, seed=7, block_docs=10).doc_order(0)
  assert sorted(blocked.tolist()) == sorted(a.doc_order(0).tolist())


def _assert_batches_equal(x, y):
  assert sorted(x) == sorted(y)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches_seeded_and_process_slices_concatenate():
  shards = FakeShards(make_docs())
  cfg = make_cfg()
  one = batches.make_train_dataset(cfg, shards)
  again = batches.make_train_dataset(cfg, shards)
  other = batches.make_train_dataset(make_cfg(**{'train.seed': 1}), shards)
  halves = [batches.make_train_dataset(cfg, shards, None, p, 2) for p in range(2)]
  for step in (0, 5, 40):  # 40 is past the first epoch.
    _assert_batches_equal(one[step], again[step])
    for key in ('inputs_BxT', 'targets_BxT', 'segment_ids_BxT', 'positions_BxT',
                'weights_BxT'):
      np.testing.assert_array_equal(
          one[step][key], np.concatenate([h[step][key] for h in halves]), err_msg=key)
  assert not np.array_equal(one[0]['inputs_BxT'], other[0]['inputs_BxT'])
  with pytest.raises(ValueError, match='not divisible'):
    batches.make_train_dataset(cfg, shards, None, 0, 3)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_from_state_and_orbax_is_bit_exact(tmp_path, prefetch):
  shards = FakeShards(make_docs())
  docs = make_docs()
  cfg = make_cfg(**{'fgram_model.num_layers': 1, 'train.data_prefetch': prefetch})
  table = FakeTable(frequent_grams(docs))
  it = batches.make_train_iterator(cfg, shards, table)
  for _ in range(4):
    next(it)
  state = it.get_state()
  mngr = ocp.CheckpointManager(tmp_path / 'ckpt')
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]

  resumed = batches.make_train_iterator(cfg, shards, table)
  resumed.set_state(state)
  restored = batches.make_train_iterator(cfg, shards, table)
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  mngr.close()
  for want in expected:
    _assert_batches_equal(next(resumed), want)
    _assert_batches_equal(next(restored), want)


def _reconstructed_grams(batch):
  """Per position: the f-gram tokens its slot points at (None for -1), read off the packed
  rows: the slot is the flat index of the f-gram's last token; its segment's tokens in
  position order are the f-gram."""
  tokens, positions = batch['fgram_tokens_RxW'], batch['fgram_positions_RxW']
  segments = batch['fgram_segment_ids_RxW']
  width = tokens.shape[1]
  out = []
  for b, t in np.ndindex(batch['fgram_slot_BxT'].shape):
    s = batch['fgram_slot_BxT'][b, t]
    if s < 0:
      out.append(None)
      continue
    row, col = divmod(int(s), width)
    seg = segments[row, col]
    assert seg > 0
    cols = np.flatnonzero(segments[row] == seg)
    assert cols[-1] == col and positions[row, cols].tolist() == list(range(len(cols)))
    out.append(tuple(tokens[row, cols].tolist()))
  return out


def test_tagging_matches_reference_matcher():
  docs = make_docs(1)
  shards, table = FakeShards(docs), FakeTable(frequent_grams(docs))
  cfg = make_cfg(**{'fgram_model.num_layers': 1})
  batch = batches.make_train_dataset(cfg, shards, table)[2]
  inputs, segs = batch['inputs_BxT'], batch['segment_ids_BxT']
  ref = [table.reference_gram(inputs[b], segs[b], t) for b, t in np.ndindex(inputs.shape)]
  assert _reconstructed_grams(batch) == ref
  matched = sum(g is not None for g in ref)
  assert matched > 0
  distinct = {g for g in ref if g is not None}
  # A_f rows hold each distinct f-gram once (packed, width 2K), in the smallest bucket.
  assert batch['fgram_tokens_RxW'].shape[1] == 2 * 3
  assert (batch['fgram_segment_ids_RxW'] > 0).sum() == sum(len(g) for g in distinct)
  used_rows = int((batch['fgram_segment_ids_RxW'] > 0).any(1).sum())
  assert batch['fgram_tokens_RxW'].shape[0] == batches.tagging.row_bucket(
      used_rows, 0, cfg.fgram_model.bucket_growth)
  assert batch['stats/fgram_unique'] == len(distinct)
  assert batch['stats/fgram_tokens'] == sum(len(g) for g in distinct)
  assert batch['stats/fgram_af_tokens'] == batch['fgram_tokens_RxW'].size
  assert batch['stats/fgram_matched_frac'] == pytest.approx(matched / (segs > 0).sum())
  assert batch['stats/fgram_above_capacity'] == 0
  model_inputs, stats = batches.split_stats(batch)
  assert 'fgram_slot_BxT' in model_inputs and 'fgram_unique' in stats
  assert not any(k.startswith('stats/') for k in model_inputs)


def test_pack_lengths_is_a_valid_tight_packing():
  rng = np.random.default_rng(0)
  for _ in range(100):
    k = int(rng.integers(2, 9))
    lens = rng.integers(2, k + 1, int(rng.integers(0, 300)))
    row, col, num_rows = batches.tagging.pack_lengths(lens, 2 * k)
    used = np.zeros((max(num_rows, 1), 2 * k), np.int32)
    for r, c, n in zip(row, col, lens):
      used[r, c:c + n] += 1
    assert used.max(initial=0) <= 1 and (used.sum(1) > 0).all() == bool(lens.size)
    # Best-fit decreasing on these sizes: at most one row more than 1.25x the bound.
    assert num_rows <= 1.25 * (-(-lens.sum() // (2 * k))) + 1


def test_row_buckets_are_a_geometric_ladder():
  ladder = sorted({batches.tagging.row_bucket(n, 0, 1.25) for n in range(1, 5000)})
  assert ladder[:3] == [8, 16, 24] and all(b % 8 == 0 for b in ladder)
  assert all(b / a <= 1.25 + 8 / a for a, b in zip(ladder, ladder[1:]))
  assert len(ladder) < 30
  assert batches.tagging.row_bucket(5, 100, 1.25) == 104  # capacity = the smallest bucket
  with pytest.raises(ValueError, match='bucket_growth'):
    batches.tagging.row_bucket(5, 0, 1.0)


def test_batch_above_capacity_gets_a_larger_bucket_never_a_fallback():
  docs = make_docs(2)
  shards, table = FakeShards(docs), FakeTable(frequent_grams(docs, per_length=100))
  cfg = make_cfg(**{'fgram_model.num_layers': 1, 'fgram_model.capacity': 8,
                    'train.batch_size': 8})
  batch = batches.make_train_dataset(cfg, shards, table)[0]
  inputs, segs = batch['inputs_BxT'], batch['segment_ids_BxT']
  ref = [table.reference_gram(inputs[b], segs[b], t) for b, t in np.ndindex(inputs.shape)]
  assert _reconstructed_grams(batch) == ref  # Every matched position keeps its f-gram.
  assert batch['fgram_tokens_RxW'].shape[0] > 8
  assert batch['stats/fgram_above_capacity'] == 1
  big = batches.make_train_dataset(
      make_cfg(**{'fgram_model.num_layers': 1, 'fgram_model.capacity': 512,
                  'train.batch_size': 8}), shards, table)[0]
  assert big['fgram_tokens_RxW'].shape[0] == 512 and big['stats/fgram_above_capacity'] == 0
  np.testing.assert_array_equal(big['fgram_slot_BxT'], batch['fgram_slot_BxT'])
  padded = batches.tagging.pad_fgram_rows(batch, 512)
  for key in batches.tagging.FGRAM_KEYS:
    np.testing.assert_array_equal(padded[key], big[key])


def test_use_size_slices_table_and_baseline_ignores_it():
  docs = make_docs()
  shards, table = FakeShards(docs), FakeTable(frequent_grams(docs))
  cfg = make_cfg(**{'fgram_model.num_layers': 1, 'fgram.use_size': 2, 'fgram.size': 10})
  batch = batches.make_train_dataset(cfg, shards, table)[0]
  assert {len(g) for g in _reconstructed_grams(batch) if g} <= {2}
  baseline = batches.make_train_dataset(make_cfg(), shards, table)[0]
  assert 'fgram_slot_BxT' not in baseline
  with pytest.raises(ValueError, match='needs an FgramTable'):
    batches.make_train_dataset(make_cfg(**{'fgram_model.num_layers': 1}), shards, None)


def test_eval_covers_every_document_once_in_order():
  docs = make_docs(3)
  shards = FakeShards(docs)
  cfg = make_cfg()
  dataset = batches.make_eval_dataset(cfg, shards, batch_size=4)
  ref = reference_rows(docs, [i for i, d in enumerate(docs) if len(d)], SEQ_LEN)
  assert len(dataset) == -(-len(ref) // 4)
  got = list(batches.make_eval_iterator(cfg, shards, batch_size=4))
  inputs = np.concatenate([b['inputs_BxT'] for b in got])
  weights = np.concatenate([b['weights_BxT'] for b in got])
  for r, row in enumerate(ref):
    np.testing.assert_array_equal(inputs[r], row[0])
  assert not weights[len(ref):].any()  # Padded final batch.
  assert sum(b['stats/num_tokens'] for b in got) == shards.num_tokens
  halves = [list(batches.make_eval_iterator(cfg, shards, None, p, 2, batch_size=4))
            for p in range(2)]
  for step, batch in enumerate(got):
    np.testing.assert_array_equal(
        batch['targets_BxT'], np.concatenate([h[step]['targets_BxT'] for h in halves]))
  assert len(batches.make_eval_dataset(cfg, shards, batch_size=4, max_batches=2)) == 2


def test_to_global_arrays_single_process():
  docs = make_docs()
  shards, table = FakeShards(docs), FakeTable(frequent_grams(docs))
  cfg = make_cfg(**{'fgram_model.num_layers': 1, 'train.batch_size': 8})
  batch = batches.make_train_dataset(cfg, shards, table)[1]
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  out = batches.to_global_arrays(batch, mesh)
  assert not any(k.startswith('stats/') for k in out)
  for key, value in out.items():
    np.testing.assert_array_equal(np.asarray(value), batch[key], err_msg=key)
  slots = np.array([[-1, 0, 2]], np.int32)
  np.testing.assert_array_equal(batches.offset_slots(slots, 3, 10), [[-1, 30, 32]])


def test_real_fgram_table_if_present():
  fgrams = pytest.importorskip('scone_jax.fgrams')
  if not hasattr(fgrams, 'mine_fgrams'):
    pytest.skip('scone_jax.fgrams.mine_fgrams has not landed yet')
  docs = make_docs(4)
  table = fgrams.mine_fgrams(docs, max_len=3, size=12, min_count=2)
  shards = FakeShards(docs)
  cfg = make_cfg(**{'fgram_model.num_layers': 1})
  batch = batches.make_train_dataset(cfg, shards, table)[0]
  inputs, segs = batch['inputs_BxT'], batch['segment_ids_BxT']
  reference = FakeTable(table.grams())
  ref = [reference.reference_gram(inputs[b], segs[b], t)
         for b, t in np.ndindex(inputs.shape)]
  assert _reconstructed_grams(batch) == ref


_WORKER = '''
import os, sys
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = sys.argv[4]
import jax
import numpy as np
import test_batches as tb  # tests/ is on PYTHONPATH (see the launcher below).
from scone_jax import batches
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{{port}}', num_processes=2,
                           process_id=process_id)
docs = tb.make_docs()
cfg = tb.make_cfg(**{{'fgram_model.num_layers': 1, 'train.batch_size': 4}})
local = batches.make_train_dataset(cfg, tb.FakeShards(docs), tb.FakeTable(tb.frequent_grams(docs)),
                                   jax.process_index(), jax.process_count())[3]
mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
arrays = batches.to_global_arrays(local, mesh)
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
full = jax.jit(lambda x: x, out_shardings=replicated)(arrays)
if process_id == 0:
  np.savez(out, **{{k: np.asarray(v) for k, v in full.items()}})
'''


@pytest.mark.slow
def test_two_processes_build_the_one_process_batch(tmp_path):
  """A real 2-process run (gloo): global arrays equal the 1-process batch."""
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER.format())
  out = tmp_path / 'global.npz'
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir]))
  procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), str(out),
                             th.xla_flags(2)], env=env) for p in range(2)]
  assert [p.wait(timeout=240) for p in procs] == [0, 0]
  got = dict(np.load(out))
  docs = make_docs()
  cfg = make_cfg(**{'fgram_model.num_layers': 1, 'train.batch_size': 4})
  want = batches.make_train_dataset(cfg, FakeShards(docs), FakeTable(frequent_grams(docs)))[3]
  for key in ('inputs_BxT', 'targets_BxT', 'segment_ids_BxT', 'positions_BxT',
              'weights_BxT'):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got['fgram_tokens_RxW'].shape[0] % 2 == 0  # P * R: both processes pad to one R.
  assert _reconstructed_grams(got) == _reconstructed_grams(want)
