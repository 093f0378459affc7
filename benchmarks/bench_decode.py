"""Decode benchmark: host f-gram lookup latency and SCONE vs baseline decode throughput.

  python benchmarks/bench_decode.py                     # CPU: tiny backbone, 1M-row store
  python benchmarks/bench_decode.py --preset=125m       # GPU: GPT-2 small backbone
  python benchmarks/bench_decode.py --rows=10000000 --store_dir=/nvme/bench_store

Prints two tables:
1. Per-step lookup latency (the decoder's IncrementalMatcher push + store gather into the
   [B, d+1] slab with its match flag, then its transfer, blocked until on the device) for tiers ram / disk(memmap) /
   disk(tensorstore) at batch 1, 16, 64, per step and per token (paper: 0.017 ms/token
   from RAM at batch 16 with 100M rows; 1.1 ms from NVMe at batch 1 with 10M rows).
2. Decode tokens/s of the same backbone as a baseline (no store) and as SCONE (store
   lookups every step) at batch 1 and 16, with the SCONE / baseline ratio (target >= 0.95).

The store and f-gram table are synthetic (random rows, every distinct 2..K-gram of a Zipf
token stream, so the table is prefix/suffix-closed like a mined one) and the weights are
random: latency and throughput do not depend on their values. Query tokens come from the
same stream, so nearly every token matches (the worst case for lookups).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from scone_jax import compat  # noqa: E402
from scone_jax import config as config_lib  # noqa: E402
from scone_jax.export.writer import write_store  # noqa: E402
from scone_jax.fgrams import FgramTable  # noqa: E402
from scone_jax.model import SconeLM  # noqa: E402
from scone_jax.serve import EmbeddingStore  # noqa: E402
from scone_jax.serve.decode import Decoder  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_enum('preset', 'tiny', ['tiny', '25m', '125m'],
                  'Backbone: experiments/tiny.py or experiments/gpt2.py:<preset>.')
flags.DEFINE_integer('rows', 1 << 20, 'f-gram rows in the synthetic store (>= 1M).')
flags.DEFINE_string('store_dir', '', 'Where to write (or reuse) the store; default a temp dir.')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'Store dtype.')
flags.DEFINE_integer('lookup_steps', 300, 'Timed steps per lookup measurement.')
flags.DEFINE_integer('new_tokens', 0, 'Decode steps timed (default 64 CPU / 256 GPU).')
flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per row.')
FLAGS = flags.FLAGS
K = 5


def load_preset(name: str) -> config_lib.Config:
  path, arg = ((os.path.join(_ROOT, 'experiments', 'tiny.py'), None) if name == 'tiny'
               else (os.path.join(_ROOT, 'experiments', 'gpt2.py'), name))
  spec = importlib.util.spec_from_file_location('preset', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config() if arg is None else module.get_config(arg)
  cd.fgram_model.num_layers = 0  # Serving uses the backbone only; A_f is in the store.
  cd.fgram.max_len = K
  return config_lib.from_configdict(cd)


def synthetic_table(rows: int, vocab: int, seed: int = 0) -> tuple[FgramTable, np.ndarray]:
  """All distinct 2..K-grams of a Zipf stream, ranked by count, cut to `rows`.

  Cutting the ranked list keeps the table closed: an n-gram's count never exceeds its
  prefix's or suffix's, and ties are broken toward shorter grams first.
  Returns the table and the stream (queries that match often).
  """
  rng = np.random.default_rng(seed)
  n_tok = rows // 2 + 1000
  while True:
    stream = np.minimum(rng.zipf(1.2, n_tok), vocab - 1).astype(np.int32)
    stream = np.maximum(stream, 4)  # Keep pad/bos/eos/unk out of the grams.
    grams, counts, lens = _all_grams(stream)
    if grams.shape[0] >= rows:
      break
    n_tok *= 2
  order = np.lexsort((lens, -counts))[:rows]
  return FgramTable(grams[order], counts[order], lens[order], K, 1), stream


def _all_grams(stream: np.ndarray):
  grams, counts, lens = [], [], []
  for n in range(2, K + 1):
    win = np.lib.stride_tricks.sliding_window_view(stream, n)
    uniq, cnt = np.unique(win, axis=0, return_counts=True)
    padded = np.zeros((uniq.shape[0], K), np.int32)
    padded[:, :n] = uniq
    grams.append(padded)
    counts.append(cnt)
    lens.append(np.full(uniq.shape[0], n, np.int32))
  return np.concatenate(grams), np.concatenate(counts), np.concatenate(lens)


def lookup_latency(decoder: Decoder, stream: np.ndarray, steps: int) -> float:
  """Seconds per decode step of the decoder's host lookup (match + gather into the slab,
  `Decoder.step_slab`) plus the slab's transfer, blocked until it is on the device."""
  b = decoder.batch_size
  starts = np.random.default_rng(b).integers(0, stream.size - steps - 1, b)
  cols = np.stack([stream[s:s + steps] for s in starts], axis=1)  # [steps, B]
  device = jax.devices()[0]
  for t in range(5):  # Warm up caches, the page cache and transfer paths.
    jax.device_put(decoder.step_slab(cols[t]), device).block_until_ready()
  start = time.perf_counter()
  for t in range(steps):
    jax.device_put(decoder.step_slab(cols[t]), device).block_until_ready()
  return (time.perf_counter() - start) / steps


def decode_rates(decoders: dict[str, Decoder], stream: np.ndarray, b: int,
                 new_tokens: int, repeats: int = 5) -> dict[str, float]:
  """Best tokens/s of each decoder; variants alternate so background load hits all alike."""
  prompts = [stream[i * 97:i * 97 + FLAGS.prompt_len] for i in range(b)]
  best = {name: 0.0 for name in decoders}
  for name, decoder in decoders.items():
    decoder.generate(prompts, new_tokens)  # Compile.
  for _ in range(repeats):
    for name, decoder in decoders.items():
      best[name] = max(best[name], decoder.generate(prompts, new_tokens).tokens_per_second)
  return best


def main(argv):
  del argv
  cfg = load_preset(FLAGS.preset)
  vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
  d = cfg.model.d_model
  print(f'backbone {FLAGS.preset}: d={d} layers={cfg.model.num_layers} vocab={vocab} '
        f'context={cfg.model.max_seq_len}; store {FLAGS.rows:,} rows x {d} {FLAGS.dtype}; '
        f'device {jax.devices()[0].device_kind}')
  t0 = time.perf_counter()
  table, stream = synthetic_table(FLAGS.rows, vocab)
  print(f'synthetic table: {len(table):,} f-grams ({time.perf_counter() - t0:.1f} s)')

  tmp = None
  store_dir = FLAGS.store_dir
  if not store_dir:
    tmp = tempfile.TemporaryDirectory(prefix='bench_decode_')
    store_dir = os.path.join(tmp.name, 'export')
  meta = {'bench': 'synthetic', 'rows': FLAGS.rows, 'd': d}
  t0 = time.perf_counter()
  rng = np.random.default_rng(1)
  write_store(store_dir, FLAGS.rows, d, FLAGS.dtype, 65536,
              lambda a, z: rng.standard_normal((z - a, d), np.float32), meta, progress=False)
  print(f'store written to {store_dir} ({time.perf_counter() - t0:.1f} s)')
  stores = {'ram': EmbeddingStore.open(store_dir, 'ram'),
            'disk(memmap)': EmbeddingStore.open(store_dir, 'disk', disk_reader='memmap'),
            'disk(tensorstore)': EmbeddingStore.open(store_dir, 'disk',
                                                     disk_reader='tensorstore')}

  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=vocab,
               rngs=nnx.Rngs(0))
  print('\nlookup = match + gather + transfer of the [B, d+1] slab, per decode step')
  print(f'{"tier":<18} {"B":>4} {"ms/step":>9} {"ms/token":>9}')
  for name, store in stores.items():
    for b in (1, 16, 64):
      steps = FLAGS.lookup_steps if 'tensorstore' not in name else FLAGS.lookup_steps // 3
      sec = lookup_latency(Decoder(lm, store, table, batch_size=b), stream, steps)
      print(f'{name:<18} {b:>4} {1e3 * sec:>9.4f} {1e3 * sec / b:>9.4f}')

  on_gpu = jax.devices()[0].platform != 'cpu'
  new_tokens = FLAGS.new_tokens or (256 if on_gpu else 64)
  new_tokens = min(new_tokens, cfg.model.max_seq_len - FLAGS.prompt_len - 1)
  for b in (1, 16):
    f_base = compat.cost_flops(Decoder(lm, batch_size=b).compiled_decode_step())
    f_scone = compat.cost_flops(
        Decoder(lm, stores['ram'], table, batch_size=b).compiled_decode_step())
    print(f'XLA decode-step FLOPs B={b}: baseline {f_base:.4g}, SCONE {f_scone:.4g}, '
          f'ratio {f_scone / f_base:.4f}')
  print(f'\ndecode tokens/s ({new_tokens} new tokens after {FLAGS.prompt_len}-token prompts)')
  print(f'{"B":>4} {"baseline":>10} {"scone ram":>10} {"ratio":>6} {"scone disk":>10} '
        f'{"ratio":>6}')
  for b in (1, 16):
    r = decode_rates({'base': Decoder(lm, batch_size=b),
                      'ram': Decoder(lm, stores['ram'], table, batch_size=b),
                      'disk': Decoder(lm, stores['disk(memmap)'], table, batch_size=b)},
                     stream, b, new_tokens)
    print(f'{b:>4} {r["base"]:>10.1f} {r["ram"]:>10.1f} {r["ram"] / r["base"]:>6.3f} '
          f'{r["disk"]:>10.1f} {r["disk"] / r["base"]:>6.3f}')
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  app.run(main)
