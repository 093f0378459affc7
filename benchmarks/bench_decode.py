"""Decode benchmark: on-device loops, SCONE vs baseline, host lookup latency, prefill.

  python benchmarks/bench_decode.py                       # CPU: tiny and 25m, 1M-row stores
  python benchmarks/bench_decode.py --presets=125m        # GPU: GPT-2 small backbone
  python benchmarks/bench_decode.py --rows=10000000 --store_dir=/nvme/bench_store
  python benchmarks/bench_decode.py --presets=tiny --cache_lens=256,1024 \
      --decode_variants=minimal,baseline,ram --nolookup_table  # vs minimal, S 256/1024

For each preset, prints:
1. Per-step lookup latency (the decoder's IncrementalMatcher push + store gather into the
   [B, d+1] slab with its match flag, then its transfer, blocked until on the device) for
   tiers ram / disk(memmap) at batch 1, 16, 64 (`--lookup_table`; paper: 0.017 ms/token
   from RAM at batch 16 with 100M rows; 1.1 ms from NVMe at batch 1 with 10M rows).
2. XLA FLOPs of the compiled device-loop chunk, SCONE / baseline.
3. Decode tokens/s at batch 1, 16, 64 (and each KV cache length S of `--cache_lens`) of:
   the independent minimal loop (`MinimalLoop`: plain jnp, its own weight layout, cache
   and greedy loop, no project model or serving code; its tokens are checked equal to
   the baseline's), the project's baseline (`Decoder`, on-device loop), SCONE ram and
   disk with each lookup, the device cache (lookup='cache': match on the device, the
   `--cache_rows` most frequent f-grams' rows there, the host only for misses;
   'cache:all' caches every row, so it never calls the host), and the host loops (one
   jitted step per token, the decoder before the device loop). Ratios: baseline /
   minimal, and each SCONE variant / the on-device baseline; medians of `--repeats`
   runs, all in one run, variants interleaved so background load hits all alike.
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
flags.DEFINE_integer('repeats', 5, 'Timed runs per variant (the median counts).')
flags.DEFINE_list('cache_lens', [], 'KV cache lengths S to decode with (default: the '
                  "preset's context; a longer S raises its position table to S).")
flags.DEFINE_list('decode_variants', [], 'Decode variants to time (default all): minimal, '
                  'baseline, ram, ram:callback, disk, cache, disk:cache, cache:all, '
                  'baseline:host, ram:host, disk:host.')
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
  # A longer cache needs a longer learned position table (per-token compute unchanged).
  cd.model.max_seq_len = max([cd.model.max_seq_len] + [int(s) for s in FLAGS.cache_lens])
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


class MinimalLoop:
  """The independent reference: a plain-jnp greedy decode of the same GPT-2 weights.

  Nothing of the project's model or serving code runs in it: the weights are read from
  the backbone's parameters once into this loop's own layout (separate arrays per layer,
  so no step slices weights; q, k and v fused into one [D, 3 * H * E] matrix per layer;
  layers unrolled in Python), the cache is its own
  (one [B, S, H, E] buffer per layer for k and v, written at the step's position with a
  dynamic_update_slice and donated between calls, so XLA updates it in place) and
  attention reads keys in `chunk`-position blocks only up to the step's position
  (online softmax). Prompts are fed one token at a time through the same step (all rows
  the same length, as the benchmark's prompts are); only the decode is timed.
  """

  def __init__(self, lm: SconeLM, b: int, cache_len: int, chunk: int = 128):
    bb = lm.backbone
    cfg = bb.cfg
    if (cfg.family, cfg.norm, cfg.mlp_activation, cfg.position) != (
        'gpt2', 'layernorm', 'gelu', 'learned'):
      raise ValueError(f'the minimal loop is written for the GPT-2 family, not '
                       f'{cfg.family}: bench a GPT-2 preset (--presets)')
    self.b, self.s = b, cache_len
    self.c = chunk if cache_len % chunk == 0 else cache_len
    self.h, self.e = cfg.num_heads, cfg.d_model // cfg.num_heads
    dt = jnp.dtype(cfg.dtype)
    blk = {n: np.asarray(getattr(bb.blocks, n)[...], np.float32)
           for n in bb.blocks.param_names}
    n_layers, d = blk['wq'].shape[:2]
    table = np.asarray(bb.token_embed.table[...], np.float32)
    head = table.T if bb.head is None else np.asarray(bb.head[...], np.float32)
    layers = [{
        'qkv': np.concatenate([blk[f'w{x}'][l].reshape(d, -1) for x in 'qkv'], -1),
        'qkv_b': np.concatenate([blk[f'b{x}'][l].reshape(-1) for x in 'qkv'], -1),
        'o': blk['wo'][l].reshape(-1, d), 'o_b': blk['bo'][l],
        'ln1': (blk['attn_norm_scale'][l], blk['attn_norm_bias'][l]),
        'ln2': (blk['mlp_norm_scale'][l], blk['mlp_norm_bias'][l]),
        'fc': (blk['w_in'][l], blk['b_in'][l]), 'proj': (blk['w_out'][l], blk['b_out'][l])}
        for l in range(n_layers)]
    self.w = jax.device_put({
        'embed': table, 'pos': np.asarray(bb.pos_table[...], np.float32), 'head': head,
        'layers': layers,
        'lnf': (np.asarray(bb.final_norm.scale[...]), np.asarray(bb.final_norm.bias[...]))})
    self.w = jax.tree.map(lambda x: x.astype(dt), self.w)
    self.n_layers, self.dtype = n_layers, dt
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, static_argnums=4, donate_argnums=(1,))

  @staticmethod
  def _ln(x, gb):
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(jnp.square(x32 - mu).mean(-1, keepdims=True) + 1e-5)
    return (y * gb[0] + gb[1]).astype(x.dtype)

  def _attend(self, q, k, v, t):
    """q [B, H, E]; k, v [B, S, H, E] hold positions 0..t."""
    c = self.c
    q32 = q.astype(jnp.float32) / np.sqrt(self.e)

    def body(i, carry):
      m, den, acc = carry
      kb = jax.lax.dynamic_slice_in_dim(k, i * c, c, axis=1).astype(jnp.float32)
      vb = jax.lax.dynamic_slice_in_dim(v, i * c, c, axis=1).astype(jnp.float32)
      sc = jnp.einsum('bhe,bche->bch', q32, kb)
      sc = jnp.where((i * c + jnp.arange(c) <= t)[None, :, None], sc, -jnp.inf)
      m2 = jnp.maximum(m, sc.max(1))
      p = jnp.exp(sc - m2[:, None])
      corr = jnp.exp(m - m2)
      return m2, den * corr + p.sum(1), acc * corr[..., None] + jnp.einsum('bch,bche->bhe',
                                                                            p, vb)

    b, h, e = q.shape
    init = (jnp.full((b, h), -jnp.inf), jnp.zeros((b, h)), jnp.zeros((b, h, e)))
    _, den, acc = jax.lax.fori_loop(0, t // c + 1, body, init)
    return (acc / den[..., None]).astype(q.dtype)

  def _step(self, w, tok_B, t, kv):
    """One token per row at position t: (logits [B, V], the updated per-layer caches)."""
    x = w['embed'][tok_B] + w['pos'][t]
    out = []
    for l, lw in enumerate(w['layers']):
      k_cache, v_cache = kv[l]
      qkv = self._ln(x, lw['ln1']) @ lw['qkv'] + lw['qkv_b']
      q, k, v = (y.reshape(self.b, self.h, self.e) for y in jnp.split(qkv, 3, -1))
      k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, None], (0, t, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, None], (0, t, 0, 0))
      out.append((k_cache, v_cache))
      a = self._attend(q, k_cache, v_cache, t).reshape(self.b, -1)
      x = x + a @ lw['o'] + lw['o_b']
      u = self._ln(x, lw['ln2']) @ lw['fc'][0] + lw['fc'][1]
      x = x + jax.nn.gelu(u, approximate=True) @ lw['proj'][0] + lw['proj'][1]
    logits = jnp.dot(self._ln(x, w['lnf']), w['head'], preferred_element_type=jnp.float32)
    return logits, out

  def _prefill_fn(self, w, prompt_BxT):
    zeros = jnp.zeros((self.b, self.s, self.h, self.e), self.dtype)
    kv = [(zeros, zeros)] * self.n_layers

    def body(t, carry):
      kv, _ = carry
      logits, kv = self._step(w, prompt_BxT[:, t], t, kv)
      return kv, jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, prompt_BxT.shape[1], body,
                             (kv, jnp.zeros((self.b,), jnp.int32)))

  def _decode_fn(self, w, kv, tok_B, t0, steps):
    def body(i, carry):
      tok, kv, out = carry
      logits, kv = self._step(w, tok, t0 + i, kv)
      nxt = jnp.argmax(logits, -1).astype(jnp.int32)
      return nxt, kv, out.at[:, i].set(nxt)

    _, kv, out = jax.lax.fori_loop(0, steps, body,
                                   (tok_B, kv, jnp.zeros((self.b, steps), jnp.int32)))
    return out, kv  # The cache returned, so its donated buffers are updated in place.

  def generate(self, prompt_BxT: np.ndarray, new_tokens: int):
    """Greedy: (tokens [B, new_tokens] (the prefill's first), decode wall s, CPU s)."""
    kv, first_B = jax.block_until_ready(self._prefill(self.w, jnp.asarray(prompt_BxT)))
    start, cpu_start = time.perf_counter(), time.process_time()
    rest = np.asarray(self._decode(self.w, kv, first_B, np.int32(prompt_BxT.shape[1]),
                                   new_tokens - 1)[0])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return np.concatenate([np.asarray(first_B)[:, None], rest], 1), wall, cpu


def rates(variants: dict, b: int, new_tokens: int, stream: np.ndarray, repeats: int):
  """Median decode tokens per wall second and per CPU second of this process, and best
  prefill tokens/s, of each variant; variants interleaved per repeat. The minimal loop's
  greedy tokens are checked equal to the baseline decoder's."""
  prompts = [stream[i * 97:i * 97 + FLAGS.prompt_len] for i in range(b)]
  decode = {name: [] for name in variants}
  decode_cpu = {name: [] for name in variants}
  prefill = {name: 0.0 for name in variants}
  prompt_host = {name: np.inf for name in variants}
  calls = {name: [0, 0, 0] for name in variants}  # host calls, host rows, steps
  with_bos = np.concatenate([np.ones((b, 1), np.int32), np.stack(prompts)], 1)
  reference = {}
  for name, v in variants.items():  # Compile, and keep the greedy tokens.
    g = v.generate(prompts, new_tokens) if isinstance(v, Decoder) else v.generate(
        with_bos, new_tokens)
    reference[name] = np.stack(g.tokens) if isinstance(v, Decoder) else g[0]
  if 'minimal' in variants and 'baseline' in variants:
    same = reference['minimal'] == reference['baseline']
    if not same.all():
      raise AssertionError(f'B={b}: the minimal loop\'s greedy tokens differ from the '
                           f'baseline decoder\'s at {np.argwhere(~same)[:5].tolist()}...')
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
        _, wall, cpu = v.generate(with_bos, new_tokens)
        tokens = (new_tokens - 1) * b
      decode[name].append(tokens / wall)
      decode_cpu[name].append(tokens / max(cpu, 1e-9))
  calls = {n: (c / max(s, 1), r / max(s * b, 1)) for n, (c, r, s) in calls.items()}
  median = lambda d: {n: float(np.median(r)) for n, r in d.items()}
  return median(decode), median(decode_cpu), prefill, prompt_host, calls


def _row(label: str, names: list[str], rate: dict[str, float]) -> str:
  cells = []
  for n in names:
    ref = rate['minimal'] if n == 'baseline' else rate['baseline']
    cells.append(f'{rate[n]:>9.0f}' + ('' if n == 'minimal' else f' ({rate[n] / ref:.3f})'))
  return f'{label:>9} ' + ' '.join(f'{c:>16}' for c in cells)


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
  for b in batches[:2]:
    base = compat.cost_flops(Decoder(lm, batch_size=b).compiled_loop_chunk(Sampling()))
    scone = compat.cost_flops(
        Decoder(lm, ram, table, batch_size=b).compiled_loop_chunk(Sampling()))
    cached = compat.cost_flops(Decoder(lm, ram, table, batch_size=b, lookup='cache',
                                       cache_rows=FLAGS.cache_rows).compiled_loop_chunk(
                                           Sampling()))
    print(f'XLA FLOPs of the device-loop chunk B={b}: baseline {base:.4g}, SCONE {scone:.4g}, '
          f'ratio {scone / base:.4f}; lookup=cache {cached:.4g}, ratio {cached / base:.4f}')

  lens = [int(x) for x in FLAGS.cache_lens] or [cfg.model.max_seq_len]
  new_tokens = min(new_tokens, min(lens) - FLAGS.prompt_len - 1)
  print(f'\ndecode tokens/s, medians of {FLAGS.repeats} interleaved runs ({new_tokens} new '
        f'tokens after {FLAGS.prompt_len}-token prompts, KV cache of S tokens; ratios: '
        'baseline / minimal, SCONE / baseline)')
  c = FLAGS.cache_rows
  names = ['minimal', 'baseline', 'ram'] + (['ram:callback'] if FLAGS.callback else []) + [
      'disk', 'cache'] + (['disk:cache'] if FLAGS.disk_cache else []) + ['cache:all']
  if FLAGS.host_loops:
    names += ['baseline:host', 'ram:host', 'disk:host']
  if FLAGS.decode_variants:
    names = [n for n in names if n in FLAGS.decode_variants]
  header = f'{"B S":>9} ' + ' '.join(f'{n:>16}' for n in names)
  print(header)
  prefill_rows, cpu_rows, cache_notes = [], [], []
  for b in batches:
    for s in lens:
      label = f'{b} {s}'
      variants = {
          'minimal': MinimalLoop(lm, b, s),
          'baseline': Decoder(lm, batch_size=b, cache_len=s),
          'ram': Decoder(lm, ram, table, batch_size=b, cache_len=s),
          'ram:callback': Decoder(lm, ram, table, batch_size=b, cache_len=s,
                                  lookup='callback'),
          'disk': Decoder(lm, disk, table, batch_size=b, cache_len=s),
          'cache': Decoder(lm, ram, table, batch_size=b, cache_len=s, lookup='cache',
                           cache_rows=c),
          'disk:cache': Decoder(lm, disk, table, batch_size=b, cache_len=s, lookup='cache',
                                cache_rows=c),
          'cache:all': Decoder(lm, ram, table, batch_size=b, cache_len=s, lookup='cache',
                               cache_rows=len(table)),
          'baseline:host': Decoder(lm, batch_size=b, cache_len=s, loop='host'),
          'ram:host': Decoder(lm, ram, table, batch_size=b, cache_len=s, loop='host'),
          'disk:host': Decoder(lm, disk, table, batch_size=b, cache_len=s, loop='host')}
      variants = {n: variants[n] for n in names}
      dec, dec_cpu, pre, host, calls = rates(variants, b, new_tokens, stream, FLAGS.repeats)
      print(_row(label, names, dec), flush=True)
      cache_notes.append(f'{label:>9} ' + '  '.join(
          f'{n}: {calls[n][0]:.3f} host calls/step, {calls[n][1]:.3f} host rows/token'
          for n in names if 'cache' in n))
      cpu_rows.append(_row(label, names, dec_cpu))
      prefill_rows.append(f'{label:>9} ' + '  '.join(
          f'{n} {pre[n]:>10.0f}' + ('' if n == 'baseline' else
                                    f' ({pre[n] / pre["baseline"]:.3f}) host '
                                    f'{1e3 * host[n]:.3f}')
          for n in ('baseline', 'ram', 'disk') if n in names))
  if any('cache' in n for n in names):
    print(f'\nlookup=cache (C = {c:,} rows: {c * d * ram.dtype.itemsize / 2**20:.0f} MiB '
          f'of rows + {12 * len(table) / 2**20:.0f} MiB match index on the device), the timed '
          'generations\' host share:')
    print('\n'.join(cache_notes))
  print('\ndecode tokens per CPU second of this process (the same runs; robust to other '
        'jobs on a shared machine)')
  print(header)
  print('\n'.join(cpu_rows))
  print(f'\nprefill tokens/s ({FLAGS.prompt_len + 1} tokens per row; SCONE / baseline) '
        'and the host match + gather of all prompts (ms)')
  print('\n'.join(prefill_rows))


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
