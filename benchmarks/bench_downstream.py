"""Downstream scoring throughput: both paths vs evaluate.py's forward, on one model.

  python benchmarks/bench_downstream.py [--d_model=256 --layers=4 --window=256 --requests=512]
  python benchmarks/bench_downstream.py --quick

Builds one random-weight SCONE model (A_f with one layer) and its f-gram table (mined from
a Zipf token stream, so requests match often, the worst case for the host work), exports
its rows, and times in one run, interleaved (the best of --repeats counts):
  eval forward   evaluate.py's jitted step: the training forward + summed cross-entropy
                 on full [B, window] rows tagged with the table (tokens = B x window)
  score train    `downstream.scoring.Scorer` path=train on multiple-choice-shaped
                 requests (contexts of 20..window/2 tokens, continuations of 2..12),
                 host packing + tagging included (tokens = the requests' inputs)
  score store    the same requests through path=store (host match + gather included)
and prints tokens/s and each scoring path / eval forward (target >= 0.8x), plus the
scorer's XLA FLOPs per row token for both paths and the baseline backbone. Weights are
random: throughput does not depend on their values.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from scone_jax import batches, compat
from scone_jax import config as config_lib
from scone_jax.batches import tagging
from scone_jax.config import ExportConfig
from scone_jax.downstream import scoring
from scone_jax.export import export_embeddings
from scone_jax.fgrams import mine_fgrams
from scone_jax.model import SconeLM
from scone_jax.model.loss import cross_entropy_sums
from scone_jax.serve import EmbeddingStore

flags.DEFINE_integer('d_model', 256, 'Backbone width.')
flags.DEFINE_integer('layers', 4, 'Backbone layers.')
flags.DEFINE_integer('vocab', 8192, 'Vocabulary size.')
flags.DEFINE_integer('window', 256, 'model.max_seq_len = the eval row length.')
flags.DEFINE_integer('rows', 8, 'Rows per batch (B) for every path.')
flags.DEFINE_integer('requests', 512, 'Scored sequences (choices) per timing.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per variant (the best counts).')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Export store dtype.')
flags.DEFINE_bool('quick', False, 'A small model and few requests (a smoke run).')
FLAGS = flags.FLAGS
K = 4


def build(d_model: int, layers: int, vocab: int, window: int):
  cfg = config_lib.replace(config_lib.from_configdict(config_lib.base_config()), **{
      'model.num_layers': layers, 'model.d_model': d_model,
      'model.num_heads': max(d_model // 64, 2), 'model.max_seq_len': window,
      'train.seq_len': window, 'fgram_model.num_layers': 1, 'fgram.max_len': K})
  rng = np.random.default_rng(0)
  stream = np.clip(rng.zipf(1.3, 400_000), 4, vocab - 1).astype(np.int32)
  docs = np.array_split(stream, 400)
  table = mine_fgrams(docs, max_len=K, size=200_000, min_count=2, progress=False)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=K, vocab_size=vocab,
               rngs=nnx.Rngs(0))
  return cfg, lm, table, stream


def requests(stream: np.ndarray, n: int, window: int) -> list[scoring.Seq]:
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    ctx, cont = int(rng.integers(20, window // 2)), int(rng.integers(2, 13))
    start = int(rng.integers(0, stream.size - ctx - cont))
    out.append(scoring.make_seq(1, stream[start:start + ctx],
                                stream[start + ctx:start + ctx + cont], window)[0])
  return out


def eval_forward(cfg, lm, table, stream, mesh, rows: int, window: int):
  """evaluate.Evaluator's step on tagged [rows, window] batches: (run, tokens a call)."""
  graphdef, state = nnx.split(lm)

  def loss_sums(state, batch):
    logits = nnx.merge(graphdef, state)(batch)
    return cross_entropy_sums(logits, batch['targets_BxT'], batch['weights_BxT'])
  step = jax.jit(loss_sums)
  rng = np.random.default_rng(2)
  batch_list = []
  for _ in range(4):
    starts = rng.integers(0, stream.size - window - 1, rows)
    inputs = np.stack([stream[s:s + window] for s in starts]).astype(np.int32)
    batch = {'inputs_BxT': inputs, 'targets_BxT': np.stack(
        [stream[s + 1:s + window + 1] for s in starts]).astype(np.int32),
             'segment_ids_BxT': np.ones_like(inputs),
             'positions_BxT': np.broadcast_to(np.arange(window, dtype=np.int32),
                                              inputs.shape).copy(),
             'weights_BxT': np.ones(inputs.shape, np.float32)}
    batch_list.append(batch)

  def run():
    out = None
    with compat.set_mesh(mesh):
      for b in batch_list:  # Tagging is host work evaluate's pipeline does too.
        tagged = tagging.tag_fgrams(b, table, cfg.fgram_model.capacity,
                                    cfg.fgram_model.bucket_growth)
        out = step(state, batches.to_global_arrays(tagged, mesh))
    jax.block_until_ready(out)
  return run, len(batch_list) * rows * window


def best_seconds(fn, repeats: int) -> float:
  fn()  # Compile.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  f = FLAGS
  d, layers, window, n = ((64, 2, 128, 96) if f.quick else
                          (f.d_model, f.layers, f.window, f.requests))
  cfg, lm, table, stream = build(d, layers, f.vocab, window)
  mesh = compat.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with tempfile.TemporaryDirectory() as tmp:
    path = export_embeddings(lm, table, f'{tmp}/export', ExportConfig(dtype=f.dtype),
                             {'checkpoint_step': 0}, mesh=mesh, progress=False)
    store = EmbeddingStore.open(path, 'ram')
    seqs = requests(stream, n, window)
    scored_tokens = sum(len(s.tokens) - 1 for s in seqs)
    kw = dict(window=window, rows_per_batch=f.rows, table=table,
              capacity=cfg.fgram_model.capacity, bucket_growth=cfg.fgram_model.bucket_growth)
    train = scoring.Scorer(lm, mesh, **kw)
    served = scoring.Scorer(lm, mesh, store=store, stored_rule=cfg.fgram_model.stored_rule,
                            **kw)
    fwd, fwd_tokens = eval_forward(cfg, lm, table, stream, mesh, f.rows, window)
    variants = {'eval forward': (fwd, fwd_tokens),
                'score train': (lambda: train(seqs), scored_tokens),
                'score store': (lambda: served(seqs), scored_tokens)}
    rate = {name: tokens / best_seconds(fn, f.repeats)
            for name, (fn, tokens) in variants.items()}
    base_cfg = config_lib.replace(cfg, **{'fgram_model.num_layers': 0})
    base = SconeLM(base_cfg.model, base_cfg.fgram_model, fgram_max_len=K,
                   vocab_size=f.vocab, rngs=nnx.Rngs(0))
    t = scoring.row_lengths(window)[0]
    flops = {'baseline': scoring.flops_per_token(
        scoring.Scorer(base, mesh, window=window, rows_per_batch=f.rows), t),
             'train': scoring.flops_per_token(train, t),
             'store': scoring.flops_per_token(served, t)}
  print(f'downstream scoring, d={d} L={layers} V={f.vocab} window={window} B={f.rows} '
        f'{n} requests, store {f.dtype}, {len(table)} f-grams, {jax.devices()[0].platform}')
  print(f'{"variant":<14}{"tokens/s":>12}{"/ eval forward":>16}')
  for name, r in rate.items():
    print(f'{name:<14}{r:>12.0f}{r / rate["eval forward"]:>15.2f}x')
  print(f'XLA FLOPs per row token at T={t}: baseline {flops["baseline"]:.4g}, train path '
        f'{flops["train"]:.4g}, store path {flops["store"]:.4g} (store / baseline '
        f'{flops["store"] / flops["baseline"]:.4f})')


if __name__ == '__main__':
  app.run(main)
