"""Training throughput, baseline vs SCONE (A_f at 1x depth), and the CPU-tiny quality check.

  python benchmarks/bench_train.py                                  # CPU: tiny and 25m
  python benchmarks/bench_train.py --corpus=embedded,kjv=/tmp/kjv.txt   # real text
  python benchmarks/bench_train.py --device=gpu --preset=125m       # bf16 MFU on a GPU
  python benchmarks/bench_train.py --mode=quality --steps=300       # held-out loss, tiny
  python benchmarks/bench_train.py --mode=af_rate --preset=25m --batch_size=32 \
      --seq_len=1024 --corpus=embedded,kjv=/tmp/kjv.txt     # A_f tokens/token, SCONE-1B

Speed mode, per preset and corpus (`synthetic`: Zipf tokens with recurring motifs;
`embedded`: the stdlib-docstring corpus; `NAME=PATH`: a text file of blank-line separated
documents; real corpora are prepared (tokenizer, shards, f-gram table) under --workdir),
reports the train step time and tokens/s of the baseline and of SCONE (batches pre-built on
the device, every A_f row bucket compiled before timing, the two variants timed in
alternating rounds, best round kept), and A_f's work per step:
* distinct f-grams present and their tokens, A_f rows run (packed rows of 2K tokens, the
  bucket) and "A_f tokens per main-model token" now (measured) and before (K: B*T rows
  padded to K), and A_f work / distinct f-gram tokens (target <= 1.25);
* the SCONE/baseline step-time ratio next to the analytical FLOPs ratio at the measured A_f
  tokens (target: measured / analytical <= 1.15);
* the batch pipeline's tokens/s alone (one thread, no prefetch; target >= 5x the trainer's).

A_f-rate mode only tags batches (no model): distinct f-grams and A_f tokens per main-model
token at the given batch shape, and the SCONE-1B (experiments/olmo.py:1b,af=2) training
FLOPs per 2048-token sequence at that measured rate, next to the worst case and the
paper's 5.57e13.

Quality mode trains experiments/tiny.py twice (baseline, SCONE) through `train()` on the
embedded corpus and prints both held-out losses (SCONE's should be lower).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from scone_jax import batches
from scone_jax import config as config_lib
from scone_jax.fgrams import mine_fgrams
from scone_jax.model import flops as flops_lib
from scone_jax import mesh as mesh_lib
from scone_jax.train import metrics as metrics_lib
from scone_jax.train import optimizer as optimizer_lib
from scone_jax.train import step as step_lib

_MODE = flags.DEFINE_enum('mode', 'speed', ['speed', 'quality', 'af_rate'],
                          'What to measure.')
_DEVICE = flags.DEFINE_enum('device', 'cpu', ['cpu', 'gpu'], 'Where to run.')
_PRESET = flags.DEFINE_list('preset', None, 'Presets: tiny, 25m, 125m, 0.7b (default: '
                            'tiny,25m on cpu, 125m on gpu).')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps (speed; default 10 cpu, 30 gpu) '
                              'or training steps (quality; default 300).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch override (0 = preset; 125m '
                              'defaults to 32 instead of the paper\'s 512).')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Sequence length override (0 = preset).')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'Extra config overrides key=value, '
                                       'e.g. --override=model.attention=cudnn.')
_TOKENS = flags.DEFINE_integer('corpus_tokens', 2_000_000, 'Synthetic corpus size.')
_VARIANTS = flags.DEFINE_list('variants', ['baseline', 'scone'], 'Quality mode: which runs.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/bench_train_quality', 'Quality-mode runs; '
                                'speed mode prepares real corpora under it.')
_CORPUS = flags.DEFINE_list('corpus', ['synthetic'], 'Speed mode: synthetic, embedded, '
                            'and/or NAME=PATH (blank-line separated documents).')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Speed mode: alternating timing rounds.')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_preset(name: str) -> config_lib.Config:
  """tiny -> experiments/tiny.py; 25m / 125m -> experiments/gpt2.py:<name>; 0.7b / 1b /
  1.3b / 1.9b -> experiments/olmo.py:<name> (the paper's OLMo sizes)."""
  file, arg = (('tiny.py', None) if name == 'tiny' else
               ('olmo.py', name) if name.endswith('b') else ('gpt2.py', name))
  spec = importlib.util.spec_from_file_location(f'preset_{name}',
                                                os.path.join(_REPO, 'experiments', file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config() if arg is None else module.get_config(arg)
  return config_lib.from_configdict(cd)


class SyntheticShards:
  """TokenShards' .tokens/.offsets: documents mixing 200 recurring 2-5 token motifs with
  Zipf-distributed single tokens, so the mined table matches like real text."""

  def __init__(self, num_tokens: int, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    motifs = [4 + rng.zipf(1.3, size=rng.integers(2, 6)) % (vocab_size - 4)
              for _ in range(200)]
    pieces, total = [], 0
    while total < num_tokens:
      if rng.random() < 0.5:
        piece = motifs[min(int(rng.zipf(1.5)) - 1, len(motifs) - 1)]
      else:
        piece = 4 + rng.zipf(1.2, size=1) % (vocab_size - 4)
      pieces.append(piece)
      total += len(piece)
    self.tokens = np.concatenate(pieces)[:num_tokens].astype(
        np.uint16 if vocab_size < 2**16 else np.uint32)
    lengths = np.maximum(8, rng.lognormal(5.0, 0.8, size=num_tokens // 8).astype(np.int64))
    ends = np.cumsum(lengths)
    ends = ends[ends < num_tokens]
    self.offsets = np.concatenate([[0], ends, [num_tokens]]).astype(np.int64)

  def docs(self):
    for a, b in zip(self.offsets[:-1], self.offsets[1:]):
      yield self.tokens[a:b]


@dataclasses.dataclass
class Row:
  preset: str
  corpus: str
  variant: str
  step_ms: float
  tokens_per_s: float
  flops_per_step: float  # Analytical; SCONE: A_f at the measured A_f tokens per step.
  mfu: float | None
  pipeline_tokens_per_s: float
  af: dict[str, float] | None = None  # Means over the timed batches (SCONE only).


def _variant_config(cfg: config_lib.Config, variant: str, overrides: dict) -> config_lib.Config:
  af = cfg.model.num_layers if variant == 'scone' else 0
  return config_lib.replace(cfg, **{'fgram_model.num_layers': af, 'train.data_prefetch': 0,
                                    'mesh.data': -1, 'mesh.fsdp': 1, 'mesh.tensor': 1,
                                    **overrides})


def _pipeline(cfg, shards, table, num_batches):
  """(local batches, pipeline tokens/s) for num_batches steps, timed on the host."""
  it = batches.make_train_iterator(cfg, shards, table)
  next(it)  # Warm caches (the matcher's index).
  start = time.perf_counter()
  out = [next(it) for _ in range(num_batches)]
  seconds = time.perf_counter() - start
  return out, num_batches * cfg.train.batch_size * cfg.train.seq_len / seconds


class Variant:
  """One preset x corpus x variant: pre-built device batches and the compiled steps."""

  def __init__(self, cfg, shards, table, steps):
    self.cfg = cfg
    local, self.pipeline_tps = _pipeline(cfg, shards, table, steps)
    split = [batches.split_stats(b) for b in local]
    self.stats = [s for _, s in split]
    self.mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
    self.vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    graphdef, self.state, tx = step_lib.create_train_state(cfg, self.mesh, self.vocab,
                                                           cfg.fgram.max_len)
    step_fn = step_lib.make_train_step(
        graphdef, tx, optimizer_lib.learning_rate_schedule(cfg.train), 1)
    self.batches = [batches.to_global_arrays(b, self.mesh) for b, _ in split]
    self.step = step_lib.CompiledSteps(step_fn, self.mesh)
    self.run()  # Compiles every row bucket the batches need, and warms up.

  def run(self) -> float:
    """Seconds per step over all batches."""
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      for b in self.batches:
        self.state, metrics = self.step(self.state, b)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / len(self.batches)

  def af_work(self) -> dict[str, float] | None:
    if not self.cfg.has_fgram_side:
      return None
    mean = lambda k: float(np.mean([s[k] for s in self.stats]))
    tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
    return {'distinct': mean('fgram_unique'), 'distinct_tokens': mean('fgram_tokens'),
            'rows': mean('fgram_rows'), 'af_tokens': mean('fgram_af_tokens'),
            'af_per_token': mean('fgram_af_tokens') / tokens,
            'af_per_token_max': max(s['fgram_af_tokens'] for s in self.stats) / tokens,
            'distinct_per_token': mean('fgram_unique') / tokens,
            'matched_frac': mean('fgram_matched_frac'),
            'work_over_distinct': mean('fgram_af_tokens') / max(mean('fgram_tokens'), 1.0),
            'buckets': float(self.step.num_compiled),
            'before_af_per_token': float(self.cfg.fgram.max_len)}

  def row(self, name, corpus, seconds, peak) -> Row:
    tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
    af = self.af_work()
    per_token = flops_lib.flops_per_token(
        self.cfg, self.vocab, af['af_per_token'] if af else None)
    flops = per_token.train_total * tokens
    return Row(name, corpus, 'scone' if af else 'baseline', seconds * 1e3, tokens / seconds,
               flops, metrics_lib.mfu(flops, seconds, jax.device_count(), peak),
               self.pipeline_tps, af)


def _parse_overrides() -> dict:
  overrides = {}
  for item in _OVERRIDES.value:
    key, _, value = item.partition('=')
    overrides[key] = json.loads(value) if value[:1] in '0123456789-[{tf' else value
  return overrides


def corpus_data(name: str, spec: str, cfg: config_lib.Config):
  """(train shards, f-gram table) of a corpus for `cfg` (tokenizer vocab, K, S)."""
  if spec == 'synthetic':
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    shards = SyntheticShards(_TOKENS.value, vocab)
    table = mine_fgrams(shards.docs(), max_len=cfg.fgram.max_len,
                        size=min(cfg.fgram.size, 200_000), min_count=cfg.fgram.min_count,
                        progress=False)
    return shards, table
  from scone_jax import prepare as prepare_lib
  data = {'data.source': 'embedded'} if spec == 'embedded' else {
      'data.source': 'files', 'data.train_files': spec, 'data.format': 'blank_lines'}
  pcfg = config_lib.replace(cfg, **data, **{
      'fgram_model.num_layers': 1, 'data.artifacts_dir': os.path.join(
          _WORKDIR.value, f'prepare_{name}_v{cfg.tokenizer.vocab_size}')})
  prepared = prepare_lib.prepare(pcfg, os.path.join(_WORKDIR.value, 'unused'))
  return prepared.train_shards, prepared.table


def speed(presets, steps, device):
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} (peak '
        f'{peak / 1e12 if peak else float("nan"):.0f} TFLOP/s bf16 dense); {steps} timed '
        f'steps x {_ROUNDS.value} alternating rounds; load {os.getloadavg()}')
  table_rows = []
  for name in presets:
    cfg = load_preset(name)
    overrides = {}
    if _BATCH.value or (name == '125m' and not _BATCH.value):
      overrides['train.batch_size'] = _BATCH.value or 32
    if _SEQ.value:
      overrides['train.seq_len'] = _SEQ.value
    if device == 'cpu':
      overrides['model.dtype'] = 'float32'
    overrides.update(_parse_overrides())
    for corpus in _CORPUS.value:
      cname, _, spec = corpus.partition('=')
      spec = spec or cname
      start = time.perf_counter()
      shards, table = corpus_data(cname, spec, _variant_config(cfg, 'scone', overrides))
      print(f'{name}/{cname}: {int(shards.offsets[-1])} tokens, {len(table)} f-grams '
            f'({time.perf_counter() - start:.1f} s)')
      variants = [Variant(_variant_config(cfg, 'baseline', overrides), shards, None, steps),
                  Variant(_variant_config(cfg, 'scone', overrides), shards, table, steps)]
      best = [v.run() for v in variants]
      for _ in range(_ROUNDS.value - 1):  # Alternate, keep each variant's best round.
        best = [min(b, v.run()) for b, v in zip(best, variants)]
      table_rows.append(tuple(v.row(name, cname, s, peak)
                              for v, s in zip(variants, best)))
      if len(presets) * len(_CORPUS.value) > 1:
        _print_speed(table_rows[-1:])  # Partial results, in case a long run is cut short.
  _print_speed(table_rows)


def _print_speed(table_rows):
  print()
  header = (f'{"preset":<7}{"corpus":<10}{"variant":<9}{"step ms":>9}{"tok/s":>9}'
            f'{"GFLOP/step":>12}{"MFU":>7}{"pipe/train":>11}')
  print(header)
  print('-' * len(header))
  for pair in table_rows:
    for r in pair:
      mfu = f'{100 * r.mfu:6.1f}%' if r.mfu is not None else '     - '
      print(f'{r.preset:<7}{r.corpus:<10}{r.variant:<9}{r.step_ms:9.1f}{r.tokens_per_s:9.0f}'
            f'{r.flops_per_step / 1e9:12.2f}{mfu}'
            f'{r.pipeline_tokens_per_s / r.tokens_per_s:10.0f}x')
  print()
  print('A_f work per step (means over the timed batches; "A_f tok/tok" = A_f tokens per '
        'main-model token)')
  header = (f'{"preset":<7}{"corpus":<10}{"matched":>8}{"distinct":>9}{"dist tok":>9}'
            f'{"A_f rows":>9}{"A_f tok":>8}{"work/dist":>10}{"A_f tok/tok":>12}'
            f'{"(max)":>7}{"before":>7}{"buckets":>8}')
  print(header)
  print('-' * len(header))
  for _, scone in table_rows:
    a = scone.af
    print(f'{scone.preset:<7}{scone.corpus:<10}{a["matched_frac"]:8.2f}{a["distinct"]:9.0f}'
          f'{a["distinct_tokens"]:9.0f}{a["rows"]:9.0f}{a["af_tokens"]:8.0f}'
          f'{a["work_over_distinct"]:10.3f}{a["af_per_token"]:12.3f}'
          f'{a["af_per_token_max"]:7.3f}{a["before_af_per_token"]:7.1f}{a["buckets"]:8.0f}')
  print()
  for base, scone in table_rows:
    analytic = scone.flops_per_step / base.flops_per_step
    measured = scone.step_ms / base.step_ms
    print(f'{base.preset}/{base.corpus}: SCONE/baseline time {measured:.3f}x vs FLOPs '
          f'{analytic:.3f}x at measured A_f tokens -> measured/analytical '
          f'{measured / analytic:.3f} (target <= 1.15); A_f work / distinct f-gram tokens '
          f'{scone.af["work_over_distinct"]:.3f} (target <= 1.25)')


def af_rate(presets, steps):
  """Tags `steps` batches per corpus; prints A_f work rates and SCONE-1B's FLOPs/sequence."""
  olmo = importlib.util.spec_from_file_location('olmo', os.path.join(_REPO, 'experiments',
                                                                     'olmo.py'))
  module = importlib.util.module_from_spec(olmo)
  olmo.loader.exec_module(module)
  scone_1b = config_lib.from_configdict(module.get_config('1b,af=2'))
  paper = 5.57e13
  worst = flops_lib.flops_per_token(scone_1b).train_total * 2048
  print(f'SCONE-1B worst case (K={scone_1b.fgram.max_len} A_f tokens/token): {worst:.3e} '
        f'FLOPs/sequence = {worst / paper:.2f}x the paper\'s {paper:.3g}')
  for name in presets:
    overrides = {'fgram_model.num_layers': 1}
    if _BATCH.value:
      overrides['train.batch_size'] = _BATCH.value
    if _SEQ.value:
      overrides['train.seq_len'] = overrides['model.max_seq_len'] = _SEQ.value
    overrides.update(_parse_overrides())
    cfg = config_lib.replace(load_preset(name), **overrides)
    for corpus in _CORPUS.value:
      cname, _, spec = corpus.partition('=')
      shards, table = corpus_data(cname, spec or cname, cfg)
      table = table.slice(cfg.fgram.rows_used(len(table)))
      local, _ = _pipeline(cfg, shards, table, steps)
      stats = [batches.split_stats(b)[1] for b in local]
      tokens = cfg.train.batch_size * cfg.train.seq_len
      mean = lambda k: float(np.mean([st[k] for st in stats]))
      rate = mean('fgram_af_tokens') / tokens
      useful = mean('fgram_tokens') / tokens
      at_rate = flops_lib.flops_per_token(scone_1b, af_tokens_per_token=rate)
      at_useful = flops_lib.flops_per_token(scone_1b, af_tokens_per_token=useful)
      print(f'{name}/{cname}: S={len(table)} K={cfg.fgram.max_len} batch '
            f'{cfg.train.batch_size}x{cfg.train.seq_len}, {steps} batches: matched '
            f'{mean("fgram_matched_frac"):.3f}, distinct f-grams/token '
            f'{mean("fgram_unique") / tokens:.3f}, their tokens/token {useful:.3f}, A_f '
            f'tokens/token run {rate:.3f} (worst case {cfg.fgram.max_len}); SCONE-1B at '
            f'{rate:.3f}: {at_rate.train_total * 2048:.3e} FLOPs/seq '
            f'({at_rate.train_total * 2048 / paper:.3f}x paper), at {useful:.3f}: '
            f'{at_useful.train_total * 2048:.3e} ({at_useful.train_total * 2048 / paper:.3f}x)')


def quality(steps):
  from scone_jax.train import loop
  cfg = load_preset('tiny')
  artifacts = os.path.join(_WORKDIR.value, 'prepare')
  overrides = _parse_overrides()
  suffix = ''.join(f'_{k}={v}' for k, v in sorted(overrides.items()))
  losses = {}
  for variant in _VARIANTS.value:
    af = cfg.model.num_layers if variant == 'scone' else 0
    run_cfg = config_lib.replace(cfg, **{'fgram_model.num_layers': af, 'train.steps': steps,
                                         'data.artifacts_dir': artifacts,
                                         'train.eval_batches': 0, **overrides})
    start = time.perf_counter()
    result = loop.train(run_cfg,
                        os.path.join(_WORKDIR.value, f'{variant}_{steps}{suffix}'))
    losses[variant] = {k: v['loss'] for k, v in result.eval['corpora'].items()}
    print(f'{variant}: {steps} steps in {time.perf_counter() - start:.0f} s, held-out loss '
          f'{losses[variant]}, train loss {result.last_metrics.get("loss")}')
  if set(losses) != {'baseline', 'scone'}:
    return
  for corpus in losses['baseline']:
    b, s = losses['baseline'][corpus], losses['scone'][corpus]
    print(f'{corpus}: baseline {b:.4f} vs SCONE {s:.4f} ({"lower" if s < b else "NOT lower"})')


def main(argv):
  del argv
  if _MODE.value == 'quality':
    quality(_STEPS.value or 300)
    return
  if _MODE.value == 'af_rate':
    af_rate(_PRESET.value or ['25m'], _STEPS.value or 8)
    return
  if _DEVICE.value == 'gpu' and jax.devices()[0].platform != 'gpu':
    sys.exit(f'--device=gpu but jax sees {jax.devices()[0].platform}')
  presets = _PRESET.value or (['125m'] if _DEVICE.value == 'gpu' else ['tiny', '25m'])
  speed(presets, _STEPS.value or (30 if _DEVICE.value == 'gpu' else 10), _DEVICE.value)


if __name__ == '__main__':
  app.run(main)
