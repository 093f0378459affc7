"""Batch pipeline throughput: packing alone, packing + f-gram tagging, through grain.

  python benchmarks/bench_pipeline.py                       # synthetic Zipf corpus
  python benchmarks/bench_pipeline.py --config=experiments/tiny.py \\
      --shards_dir=runs/tiny/prepare/tokens/train --fgram_dir=runs/tiny/prepare/fgrams

Prints tokens/s (batch slots B*T per second) and the padding fraction for each mode; the
training benchmark compares these with the trainer's tokens/s (target: pipeline >= 5x).
Without --fgram_dir the f-gram table is mined from the synthetic corpus with
`scone_jax.fgrams.mine_fgrams`; tagging rows are skipped if that package is missing.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from scone_jax import batches
from scone_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/tiny.py', lock_config=True)
_SHARDS = flags.DEFINE_string('shards_dir', '', 'token shards directory ("" = synthetic)')
_FGRAMS = flags.DEFINE_string('fgram_dir', '', 'FgramTable directory ("" = mine one)')
_TOKENS = flags.DEFINE_integer('tokens', 2_000_000, 'synthetic corpus size')
_SECONDS = flags.DEFINE_float('seconds', 3.0, 'time per measurement')


class _SyntheticShards:
  """A Zipf-distributed corpus with log-normal document lengths (TokenShards' fields)."""

  def __init__(self, num_tokens: int, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(4.5, 1.0, size=num_tokens // 40).astype(np.int64))
    lengths = lengths[np.cumsum(lengths) <= num_tokens]
    self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ranks = rng.zipf(1.2, size=int(self.offsets[-1]))
    self.tokens = (4 + (ranks - 1) % (vocab_size - 4)).astype(np.uint16)
    self.num_docs = lengths.shape[0]
    self.num_tokens = int(self.offsets[-1])

  def __iter__(self):
    for i in range(self.num_docs):
      yield self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _load_table(cfg: config_lib.Config, shards):
  try:
    from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if _FGRAMS.value:
    return fgrams.FgramTable.load(_FGRAMS.value)
  if not hasattr(fgrams, 'mine_fgrams'):
    return None
  return fgrams.mine_fgrams(iter(shards), max_len=cfg.fgram.max_len, size=cfg.fgram.size,
                            min_count=cfg.fgram.min_count)


def _measure(next_batch) -> tuple[float, float, float]:
  """(slots/s, real tokens/s, padding fraction) over about --seconds."""
  next_batch()  # Warm up (first epoch plan, page cache).
  slots = real = 0
  start = time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    batch = next_batch()
    slots += batch['weights_BxT'].size
    real += float(batch['weights_BxT'].sum())
  elapsed = time.perf_counter() - start
  return slots / elapsed, real / elapsed, 1.0 - real / slots


def main(argv):
  del argv
  cfg = config_lib.from_configdict(_CONFIG.value)
  if _SHARDS.value:
    from scone_jax.tokenizer import TokenShards  # pylint: disable=g-import-not-at-top
    shards = TokenShards.open(_SHARDS.value, verify=False)
    source = _SHARDS.value
  else:
    shards = _SyntheticShards(_TOKENS.value, cfg.tokenizer.vocab_size)
    source = f'synthetic Zipf, {shards.num_tokens:,} tokens'
  baseline_cfg = config_lib.replace(cfg, **{'fgram_model.num_layers': 0})
  scone_cfg = config_lib.replace(cfg, **{'fgram_model.num_layers': max(
      cfg.fgram_model.num_layers, 1)})
  table = _load_table(cfg, shards)

  rows = []
  packed = batches.make_train_dataset(baseline_cfg, shards)
  step = iter(range(1 << 62))
  rows.append(('pack (random access)', _measure(lambda: packed[next(step)])))
  it = batches.make_train_iterator(baseline_cfg, shards)
  rows.append((f'pack, grain iterator (prefetch {cfg.train.data_prefetch})',
               _measure(lambda: next(it))))
  if table is not None:
    tagged = batches.make_train_dataset(scone_cfg, shards, table)
    step = iter(range(1 << 62))
    rows.append(('pack + f-gram tagging', _measure(lambda: tagged[next(step)])))
    it = batches.make_train_iterator(scone_cfg, shards, table)
    rows.append(('pack + tagging, grain iterator', _measure(lambda: next(it))))
    stats = batches.split_stats(tagged[0])[1]
  print(f'corpus: {source}; batch {cfg.train.batch_size} x seq {cfg.train.seq_len}; '
        f'f-grams: {len(table) if table is not None else "n/a (scone_jax.fgrams missing)"}')
  print(f'{"mode":<40} {"slots/s":>12} {"real tok/s":>12} {"padding":>8}')
  for name, (slots, real, pad) in rows:
    print(f'{name:<40} {slots:>12,.0f} {real:>12,.0f} {pad:>8.1%}')
  if table is not None:
    print('f-gram stats of batch 0: ' +
          ', '.join(f'{k}={v:.3g}' for k, v in sorted(stats.items())))


if __name__ == '__main__':
  app.run(main)
