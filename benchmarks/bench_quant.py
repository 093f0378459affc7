"""Quantised stores: held-out perplexity through the SERVING path and host bytes per row.

  python -m scone_jax.train --config=experiments/tiny.py --workdir=runs/tiny
  python benchmarks/bench_quant.py --workdir=runs/tiny [--max_windows=256]

Exports the trained run's f-gram embeddings once per store format (float32, bfloat16, int8
and fp8 with a float32 scale per row; under W/bench_quant/, W/export is left alone), then
scores the held-out test corpora through `Decoder.teacher_forced_logits`: the serving
path, where every matched position's input embedding is the row the store returns
(matcher + gather + transfer, dequantised on the device), not A_f's output. Documents are
cut into windows of model.max_seq_len - 1 tokens (each scored after a BOS; every window
token is a prediction target once). The same windows also go through the training
forward (A_f on the fly, float32 rows) as the reference row.

Prints per format: loss and perplexity per corpus, the perplexity ratio to the bfloat16
store, host bytes per row (scale included) and the store's bytes relative to bfloat16.
"""

from __future__ import annotations

import math
import os
import shutil

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from scone_jax import config as config_lib
from scone_jax import restore
from scone_jax.batches.tagging import tag_fgrams
from scone_jax.config import ExportConfig
from scone_jax.export import export_embeddings, store_meta
from scone_jax.serve import EmbeddingStore
from scone_jax.serve.decode import Decoder

flags.DEFINE_string('workdir', None, 'A trained SCONE run (python -m scone_jax.train).',
                    required=True)
flags.DEFINE_integer('max_windows', 256, 'Windows per eval corpus (0 = all).')
flags.DEFINE_integer('batch_size', 16, 'Windows per teacher-forced call.')
FLAGS = flags.FLAGS

FORMATS = [('float32', 'none'), ('bfloat16', 'none'), ('bfloat16', 'int8'),
           ('bfloat16', 'fp8')]


def _name(dtype: str, quant: str) -> str:
  return quant if quant != 'none' else dtype


def windows(shards, length: int, limit: int) -> list[np.ndarray]:
  """Each document cut into consecutive windows of <= `length` tokens (>= 2 tokens)."""
  out = []
  for i in range(shards.num_docs):
    doc = np.asarray(shards.doc(i), np.int32)
    for lo in range(0, doc.size, length):
      w = doc[lo:lo + length]
      if w.size >= 2:
        out.append(w)
      if limit and len(out) >= limit:
        return out
  return out


def nll_serving(decoder: Decoder, wins: list[np.ndarray], batch: int) -> tuple[float, int]:
  """Summed NLL (nats) and targets of `wins` through prefill with the store's rows."""
  total, count = 0.0, 0
  for lo in range(0, len(wins), batch):
    group = wins[lo:lo + batch]
    # Prompt = all but the last token; the last is a 1-token continuation, so the logits
    # cover BOS + every window token but the last: one target per window token.
    logits = decoder.teacher_forced_logits([w[:-1] for w in group], [w[-1:] for w in group])
    for w, lg in zip(group, logits):
      lp = jax.nn.log_softmax(lg.astype(np.float32), axis=-1)
      total -= float(np.take_along_axis(np.asarray(lp), w[:, None], axis=1).sum())
      count += w.size
  return total, count


def nll_training(lm, table, wins: list[np.ndarray], bos: int, length: int,
                 batch: int) -> tuple[float, int]:
  """The same windows through the training forward (A_f computes every f-gram row)."""
  graphdef, state = nnx.split(lm)
  forward = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
  total, count = 0.0, 0
  for lo in range(0, len(wins), batch):
    group = wins[lo:lo + batch]
    inputs = np.zeros((batch, length), np.int32)
    segments = np.zeros_like(inputs)
    for b, w in enumerate(group):
      inputs[b, :w.size] = np.concatenate([[bos], w[:-1]])
      segments[b, :w.size] = 1
    data = {'inputs_BxT': inputs, 'segment_ids_BxT': segments,
            'positions_BxT': np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape)}
    data = tag_fgrams(data, table, capacity=inputs.size)
    data = {k: v for k, v in data.items() if not k.startswith('stats/')}
    lp = np.asarray(jax.nn.log_softmax(forward(state, data).astype(np.float32), axis=-1))
    for b, w in enumerate(group):
      total -= float(lp[b, np.arange(w.size), w].sum())
      count += w.size
  return total, count


def main(argv):
  del argv
  cfg = restore.read_config(FLAGS.workdir)
  if not cfg.has_fgram_side:
    raise app.UsageError(f'{FLAGS.workdir} is a baseline run: it has no f-gram store')
  run = restore.load_run(cfg, FLAGS.workdir)
  from scone_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  eval_shards = {k: v for k, v in run_lib.RunDir(FLAGS.workdir).eval_shards().items()
                 if not config_lib.is_validation_corpus(k)}
  length = cfg.model.max_seq_len
  bos = run.tokenizer.bos_id
  # BOS + window <= max_seq_len, and the decoder reserves a slot for the continuation.
  wins = {k: windows(s, length - 1, FLAGS.max_windows) for k, s in sorted(eval_shards.items())}
  out_root = os.path.join(FLAGS.workdir, 'bench_quant')
  meta = store_meta(run.step, run.table.fingerprint, run.tokenizer.fingerprint,
                    run.weights_fingerprint)
  results = {}
  for dtype, quant in FORMATS:
    name = _name(dtype, quant)
    path = export_embeddings(run.lm, run.table, os.path.join(out_root, name),
                             ExportConfig(dtype=dtype, quant=quant,
                                          batch_size=cfg.export.batch_size,
                                          chunk_rows=cfg.export.chunk_rows),
                             meta, run.mesh, progress=False)
    store = EmbeddingStore.open(path, 'ram')
    decoder = Decoder(run.lm, store, run.table, batch_size=FLAGS.batch_size, bos_id=bos,
                      cache_len=length, loop='host')
    per = {k: nll_serving(decoder, w, FLAGS.batch_size) for k, w in wins.items()}
    results[name] = (per, store.nbytes / store.num_rows, store.nbytes)
  per = {k: nll_training(run.lm, run.table, w, bos, length, FLAGS.batch_size)
         for k, w in wins.items()}
  results['training forward (A_f)'] = (per, float('nan'), 0)
  shutil.rmtree(out_root, ignore_errors=True)

  ref = results['bfloat16']
  print(f'run {FLAGS.workdir} step {run.step}: {len(run.table):,} f-gram rows, d_model '
        f'{cfg.model.d_model}; windows of {length - 1} tokens after a BOS')
  header = '| rows | corpus | tokens | loss | ppl | ppl / bf16 | bytes/row | store / bf16 |'
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for name, (per, row_bytes, nbytes) in results.items():
    for corpus, (nll, n) in per.items():
      loss = nll / n
      ref_loss = ref[0][corpus][0] / ref[0][corpus][1]
      ratio = math.exp(loss - ref_loss)
      size = f'{nbytes / ref[2]:.3f}' if nbytes else '-'
      bpr = f'{row_bytes:.0f}' if nbytes else '-'
      print(f'| {name} | {corpus} | {n} | {loss:.4f} | {math.exp(loss):.3f} | {ratio:.4f} | '
            f'{bpr} | {size} |')


if __name__ == '__main__':
  app.run(main)
