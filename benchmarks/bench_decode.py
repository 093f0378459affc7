"""Decode benchmark: on-device loops, SCONE vs baseline, host lookup latency, prefill.

  python benchmarks/bench_decode.py                       # CPU: tiny and 25m, 1M-row stores
  python benchmarks/bench_decode.py --presets=125m        # GPU: GPT-2 small backbone
  python benchmarks/bench_decode.py --rows=10000000 --store_dir=/nvme/bench_store

For each preset, prints:
1. Per-step lookup latency (the decoder's IncrementalMatcher push + store gather into the
   [B, d+1] slab with its match flag, then its transfer, blocked until on the device) for
   tiers ram / disk(memmap) at batch 1, 16, 64 (`--lookup_table`; paper: 0.017 ms/token
   from RAM at batch 16 with 100M rows; 1.1 ms from NVMe at batch 1 with 10M rows).
2. XLA FLOPs of the compiled device-loop chunk, SCONE / baseline.
3. Decode tokens/s at batch 1, 16, 64 of: the hand-written minimal loop (a plain
   `fori_loop` greedy decode with a KV cache, nothing else), the project's baseline
   (`Decoder`, on-device loop), SCONE ram and disk with each lookup, the device cache
   (lookup='cache': match on the device, the `--cache_rows` most frequent f-grams' rows
   there, the host only for misses; 'cache:all' caches every row, so it never calls the
   host), and the host loops (one jitted step per token, the decoder before the device
   loop). Ratios: baseline /
   minimal, and each SCONE variant / the on-device baseline, all measured in one run,
   variants interleaved so background load hits all alike.
4. Prefill tokens/s (prompt tokens incl. BOS per second: host match + gather + transfer +
   one prefill step, blocked) for the baseline and SCONE ram.
5. The device cache's hit rates: per matched position (row < C) and per decode step of B
   rows (no row misses: no host call), on the synthetic stream and on real text
   (`--hit_corpus`: a table mined from the corpus's train split, positions of its eval
   split), for several C.

The store and f-gram table are synthetic (random rows, every distinct 2..K-gram of a Zipf
token stream, so the table is prefix/suffix-closed like a mined one) and the weights are
random: latency and throughput do not depend on their values. Prompts come from the same
stream, so nearly every prompt token matches (the worst case for lookups).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from scone_jax import compat  # noqa: E402
from scone_jax import config as config_lib  # noqa: E402
from scone_jax.export.writer import write_store  # noqa: E402
from scone_jax.fgrams import FgramTable  # noqa: E402
from scone_jax.model import SconeLM  # noqa: E402
from scone_jax.serve import EmbeddingStore  # noqa: E402
from scone_jax.serve.decode import Decoder, Sampling  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_list('presets', ['tiny', '25m'],
                  'Backbones: tiny (experiments/tiny.py), 25m / 125m (experiments/gpt2.py).')
flags.DEFINE_list('batches', ['1', '16', '64'], 'Batch sizes.')
flags.DEFINE_integer('rows', 1 << 20, 'f-gram rows in the synthetic store.')
flags.DEFINE_string('store_dir', '', 'Where to write the stores; default a temp dir.')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'Store dtype.')
flags.DEFINE_bool('lookup_table', True, 'Print the lookup-latency table.')
flags.DEFINE_integer('lookup_steps', 300, 'Timed steps per lookup measurement.')
flags.DEFINE_integer('new_tokens', 0, 'Tokens generated per row (default 64 CPU / 256 GPU).')
flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per row.')
flags.DEFINE_integer('repeats', 5, 'Timed runs per variant (the best counts).')
flags.DEFINE_bool('host_loops', True, 'Also time the host loops (one jitted step per token).')
flags.DEFINE_bool('callback', True, "Also time lookup='callback' (ram:callback).")
flags.DEFINE_integer('cache_rows', 65536, "C of the lookup='cache' variants.")
flags.DEFINE_bool('disk_cache', True, "Also time lookup='cache' on the disk tier.")
flags.DEFINE_list('hit_corpus', [], 'Real text for the cache hit rates: embedded (the '
                  'stdlib-docstring corpus) or NAME=PATH (blank-line separated text).')
flags.DEFINE_string('hit_workdir', '/tmp/bench_decode_hits', 'Prepared artifacts of '
                    '--hit_corpus (tokenizer, shards, table of the tiny preset).')
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
  `decoder.lookup.step_slab`) plus the slab's transfer, blocked until it is on the device."""
  b = decoder.batch_size
  starts = np.random.default_rng(b).integers(0, stream.size - steps - 1, b)
  cols = np.stack([stream[s:s + steps] for s in starts], axis=1)  # [steps, B]
  device = jax.devices()[0]
  for t in range(5):  # Warm up caches, the page cache and transfer paths.
    jax.device_put(decoder.lookup.step_slab(cols[t]), device).block_until_ready()
  start = time.perf_counter()
  for t in range(steps):
    jax.device_put(decoder.lookup.step_slab(cols[t]), device).block_until_ready()
  return (time.perf_counter() - start) / steps


def minimal_loop(lm: SconeLM, b: int, prompt_len: int, steps: int):
  """The reference: a plain greedy fori_loop decode with a KV cache, nothing else.

  Returns a function timing one call (seconds for `steps` steps of batch `b`, tokens read
  back to the host).
  """
  graphdef, state = nnx.split(lm.backbone)
  cache_len = lm.backbone.cfg.max_seq_len

  @jax.jit
  def run(state, token_B, cache):
    backbone = nnx.merge(graphdef, state)

    def body(i, carry):
      tok_B, cache, out_BxN = carry
      logits_Bx1xV, cache = backbone.decode(backbone.embed(tok_B[:, None]), cache)
      nxt_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32)
      return nxt_B, cache, out_BxN.at[:, i].set(nxt_B)

    return jax.lax.fori_loop(0, steps, body,
                             (token_B, cache, jnp.zeros((b, steps), jnp.int32)))[2]

  def fresh_cache():
    cache = lm.backbone.init_cache(b, cache_len)
    return cache.replace(lengths=jnp.full((b,), prompt_len + 1, jnp.int32))

  token_B = jnp.full((b,), 5, jnp.int32)
  np.asarray(run(state, token_B, fresh_cache()))  # Compile.

  def timed() -> tuple[float, float]:
    cache = jax.block_until_ready(fresh_cache())
    start, cpu_start = time.perf_counter(), time.process_time()
    np.asarray(run(state, token_B, cache))
    return time.perf_counter() - start, time.process_time() - cpu_start
  return timed


def rates(variants: dict, b: int, new_tokens: int, stream: np.ndarray, repeats: int):
  """Best decode tokens per wall second and per CPU second of this process, and best
  prefill tokens/s, of each variant; variants interleaved per repeat."""
  prompts = [stream[i * 97:i * 97 + FLAGS.prompt_len] for i in range(b)]
  decode = {name: 0.0 for name in variants}
  decode_cpu = {name: 0.0 for name in variants}
  prefill = {name: 0.0 for name in variants}
  prompt_host = {name: np.inf for name in variants}
  calls = {name: [0, 0, 0] for name in variants}  # host calls, host rows, steps
  for name, v in variants.items():
    if isinstance(v, Decoder):
      v.generate(prompts, new_tokens)  # Compile.
  for _ in range(repeats):
    for name, v in variants.items():
      if isinstance(v, Decoder):
        g = v.generate(prompts, new_tokens)
        tokens, wall, cpu = g.decode_steps * b, g.decode_seconds, g.decode_cpu_seconds
        prefill[name] = max(prefill[name], b * (FLAGS.prompt_len + 1) / g.prefill_seconds)
        prompt_host[name] = min(prompt_host[name], g.prompt_lookup_seconds)
        calls[name] = [x + y for x, y in zip(calls[name], (g.host_calls, g.host_rows,
                                                           g.decode_steps))]
      else:
        tokens, (wall, cpu) = (new_tokens - 1) * b, v()
      decode[name] = max(decode[name], tokens / wall)
      decode_cpu[name] = max(decode_cpu[name], tokens / max(cpu, 1e-9))
  calls = {n: (c / max(s, 1), r / max(s * b, 1)) for n, (c, r, s) in calls.items()}
  return decode, decode_cpu, prefill, prompt_host, calls


def _row(b: int, names: list[str], rate: dict[str, float]) -> str:
  cells = []
  for n in names:
    ref = rate['minimal'] if n == 'baseline' else rate['baseline']
    cells.append(f'{rate[n]:>9.0f}' + ('' if n == 'minimal' else f' ({rate[n] / ref:.3f})'))
  return f'{b:>4} ' + ' '.join(f'{c:>16}' for c in cells)


def hit_rates(table, docs, sizes, batches, steps: int = 4000, seed: int = 0):
  """lookup='cache' hit rates for the cache sizes: (matched share of positions, then per
  size: share of matched positions served by the cache, and per B the share of decode
  steps of B independent rows with no miss). Positions are matched per document."""
  ids = np.concatenate([table.match(np.asarray(doc, np.int64)[None])[0][0] for doc in docs])
  matched = ids >= 0
  rng = np.random.default_rng(seed)
  out = []
  for c in sizes:
    miss = ids >= c
    row_hit = 1 - miss.sum() / max(matched.sum(), 1)
    step_hit = [1 - miss[rng.integers(0, ids.size, (steps, b))].any(axis=1).mean()
                for b in batches]
    out.append((c, row_hit, step_hit))
  return matched.mean(), ids.size, out


def print_hit_rates(what: str, table, docs, batches) -> None:
  sizes = sorted({min(s, len(table)) for s in (1024, 8192, 65536, FLAGS.cache_rows)})
  share, n, rows = hit_rates(table, docs, sizes, batches)
  print(f'\nlookup=cache hit rates on {what} ({n:,} positions, {share:.3f} matched; '
        f'table {len(table):,} rows): C, matched positions from the cache, decode steps '
        'with no host call at B = ' + ', '.join(map(str, batches)))
  for c, row_hit, step_hit in rows:
    print(f'{c:>9,} ({100 * c / len(table):5.1f}% of rows)  {row_hit:.3f}  ' +
          '  '.join(f'{h:.3f}' for h in step_hit))


def real_hit_rates() -> None:
  """Hit rates on real text: the tiny preset's tokenizer and table (vocab 1024, S 50K,
  K 5) prepared from each corpus's train split, positions of its eval split."""
  from scone_jax import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  cfg = load_preset('tiny')
  batches = [int(b) for b in FLAGS.batches]
  for corpus in FLAGS.hit_corpus:
    name, _, spec = corpus.partition('=')
    data = {'data.source': 'embedded'} if not spec else {
        'data.source': 'files', 'data.train_files': spec, 'data.format': 'blank_lines'}
    pcfg = config_lib.replace(cfg, **data, **{
        'fgram_model.num_layers': 1,
        'data.artifacts_dir': os.path.join(FLAGS.hit_workdir, f'prepare_{name}')})
    prepared = prepare_lib.prepare(pcfg, os.path.join(FLAGS.hit_workdir, 'unused'))
    shards = next(iter(prepared.eval_shards.values()), prepared.train_shards)
    docs = [np.concatenate([[prepared.tokenizer.bos_id], shards.doc(i)])
            for i in range(min(len(shards), 2000))]
    print_hit_rates(f'{name} ({"eval" if prepared.eval_shards else "train"} split)',
                    prepared.table, docs, batches)


def write_synthetic_store(store_dir: str, rows: int, d: int) -> None:
  rng = np.random.default_rng(1)
  write_store(store_dir, rows, d, FLAGS.dtype, 65536,
              lambda a, z: rng.standard_normal((z - a, d), np.float32),
              {'bench': 'synthetic', 'rows': rows, 'd': d}, progress=False)


def bench_preset(preset: str, root: str) -> None:
  cfg = load_preset(preset)
  vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
  d = cfg.model.d_model
  print(f'\n=== backbone {preset}: d={d} layers={cfg.model.num_layers} vocab={vocab} '
        f'context={cfg.model.max_seq_len}; store {FLAGS.rows:,} rows x {d} {FLAGS.dtype}; '
        f'device {jax.devices()[0].device_kind}')
  t0 = time.perf_counter()
  table, stream = synthetic_table(FLAGS.rows, vocab)
  store_dir = os.path.join(root, f'{preset}_{FLAGS.rows}')
  if not os.path.exists(store_dir):
    write_synthetic_store(store_dir, FLAGS.rows, d)
  print(f'synthetic table {len(table):,} f-grams + store ({time.perf_counter() - t0:.1f} s)')
  ram = EmbeddingStore.open(store_dir, 'ram')
  disk = EmbeddingStore.open(store_dir, 'disk', disk_reader='memmap')
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=vocab,
               rngs=nnx.Rngs(0))
  batches = [int(b) for b in FLAGS.batches]

  if FLAGS.lookup_table:
    print('\nlookup = match + gather + transfer of the [B, d+1] slab, per decode step')
    print(f'{"tier":<14} {"B":>4} {"ms/step":>9} {"ms/token":>9}')
    for name, store in (('ram', ram), ('disk(memmap)', disk)):
      for b in batches:
        sec = lookup_latency(Decoder(lm, store, table, batch_size=b, loop='host'), stream,
                             FLAGS.lookup_steps)
        print(f'{name:<14} {b:>4} {1e3 * sec:>9.4f} {1e3 * sec / b:>9.4f}')

  print_hit_rates('synthetic Zipf stream', table, [stream], batches)

  on_gpu = jax.devices()[0].platform != 'cpu'
  new_tokens = FLAGS.new_tokens or (256 if on_gpu else 64)
  new_tokens = min(new_tokens, cfg.model.max_seq_len - FLAGS.prompt_len - 1)
  for b in batches[:2]:
    base = compat.cost_flops(Decoder(lm, batch_size=b).compiled_loop_chunk(Sampling()))
    scone = compat.cost_flops(
        Decoder(lm, ram, table, batch_size=b).compiled_loop_chunk(Sampling()))
    cached = compat.cost_flops(Decoder(lm, ram, table, batch_size=b, lookup='cache',
                                       cache_rows=FLAGS.cache_rows).compiled_loop_chunk(
                                           Sampling()))
    print(f'XLA FLOPs of the device-loop chunk B={b}: baseline {base:.4g}, SCONE {scone:.4g}, '
          f'ratio {scone / base:.4f}; lookup=cache {cached:.4g}, ratio {cached / base:.4f}')

  print(f'\ndecode tokens/s ({new_tokens} new tokens after {FLAGS.prompt_len}-token prompts; '
        f'ratios: baseline / minimal, SCONE / baseline)')
  c = FLAGS.cache_rows
  names = ['minimal', 'baseline', 'ram'] + (['ram:callback'] if FLAGS.callback else []) + [
      'disk', 'cache'] + (['disk:cache'] if FLAGS.disk_cache else []) + ['cache:all']
  if FLAGS.host_loops:
    names += ['baseline:host', 'ram:host', 'disk:host']
  header = f'{"B":>4} ' + ' '.join(f'{n:>16}' for n in names)
  print(header)
  prefill_rows, cpu_rows, cache_notes = [], [], []
  for b in batches:
    variants = {
        'minimal': minimal_loop(lm, b, FLAGS.prompt_len, new_tokens - 1),
        'baseline': Decoder(lm, batch_size=b),
        'ram': Decoder(lm, ram, table, batch_size=b),
        'ram:callback': Decoder(lm, ram, table, batch_size=b, lookup='callback'),
        'disk': Decoder(lm, disk, table, batch_size=b),
        'cache': Decoder(lm, ram, table, batch_size=b, lookup='cache', cache_rows=c),
        'disk:cache': Decoder(lm, disk, table, batch_size=b, lookup='cache', cache_rows=c),
        'cache:all': Decoder(lm, ram, table, batch_size=b, lookup='cache',
                             cache_rows=len(table))}
    for name in set(variants) - set(names):
      del variants[name]
    if FLAGS.host_loops:
      variants.update({'baseline:host': Decoder(lm, batch_size=b, loop='host'),
                       'ram:host': Decoder(lm, ram, table, batch_size=b, loop='host'),
                       'disk:host': Decoder(lm, disk, table, batch_size=b, loop='host')})
    dec, dec_cpu, pre, host, calls = rates(variants, b, new_tokens, stream, FLAGS.repeats)
    print(_row(b, names, dec), flush=True)
    cache_notes.append(f'{b:>4} ' + '  '.join(
        f'{n}: {calls[n][0]:.3f} host calls/step, {calls[n][1]:.3f} host rows/token'
        for n in names if 'cache' in n))
    cpu_rows.append(_row(b, names, dec_cpu))
    prefill_rows.append((b, pre['baseline'], pre['ram'], pre['disk'], host['ram'],
                         host['disk']))
  print(f'\nlookup=cache (C = {c:,} rows: {c * d * ram.dtype.itemsize / 2**20:.0f} MiB of '
        f'rows + {12 * len(table) / 2**20:.0f} MiB match index on the device), the timed '
        'generations\' host share:')
  print('\n'.join(cache_notes))
  print('\ndecode tokens per CPU second of this process (the same runs; robust to other '
        'jobs on a shared machine)')
  print(header)
  print('\n'.join(cpu_rows))
  print(f'\nprefill tokens/s ({FLAGS.prompt_len + 1} tokens per row; SCONE / baseline) '
        'and the host match + gather of all prompts (ms)')
  for b, base, r, dk, hr, hd in prefill_rows:
    print(f'{b:>4} baseline {base:>10.0f}  ram {r:>10.0f} ({r / base:.3f})  '
          f'disk {dk:>10.0f} ({dk / base:.3f})  host ram {1e3 * hr:.3f} disk {1e3 * hd:.3f}')


def main(argv):
  del argv
  os.system('uptime')
  tmp = None
  root = FLAGS.store_dir
  if not root:
    tmp = tempfile.TemporaryDirectory(prefix='bench_decode_')
    root = tmp.name
  for preset in FLAGS.presets:
    bench_preset(preset, root)
  if FLAGS.hit_corpus:
    real_hit_rates()
  os.system('uptime')
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  app.run(main)
