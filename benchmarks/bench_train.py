"""Training throughput, baseline vs SCONE (A_f at 1x depth), and the CPU-tiny quality check.

  python benchmarks/bench_train.py                                  # CPU: tiny and 25m
  python benchmarks/bench_train.py --device=gpu --preset=125m       # bf16 MFU on a GPU
  python benchmarks/bench_train.py --mode=quality --steps=300       # held-out loss, tiny

Speed mode builds a synthetic corpus (Zipf tokens with recurring multi-token motifs, so
f-grams exist), mines its f-gram table, and for each preset and variant reports: the train
step time and tokens/s (batches pre-built on the device, so only the step is timed), the
analytical FLOPs per step from `scone_jax.model.flops` (A_f counted on its static capacity
U, the rows it really runs) and the measured time ratio next to the analytical ratio
(target: measured <= 1.15 x analytical), A_f's work saved by running it once per distinct
f-gram instead of per matched position, and the batch pipeline's tokens/s alone (one
thread, no prefetch; target >= 5x the trainer's). SCONE's capacity U is set to the most
distinct f-grams seen in the measured batches, rounded up (none overflow).

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

_MODE = flags.DEFINE_enum('mode', 'speed', ['speed', 'quality'], 'What to measure.')
_DEVICE = flags.DEFINE_enum('device', 'cpu', ['cpu', 'gpu'], 'Where to run.')
_PRESET = flags.DEFINE_list('preset', None, 'Presets: tiny, 25m, 125m (default: tiny,25m '
                            'on cpu, 125m on gpu).')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps (speed; default 10 cpu, 30 gpu) '
                              'or training steps (quality; default 300).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch override (0 = preset; 125m '
                              'defaults to 32 instead of the paper\'s 512).')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Sequence length override (0 = preset).')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'Extra config overrides key=value, '
                                       'e.g. --override=model.attention=cudnn.')
_TOKENS = flags.DEFINE_integer('corpus_tokens', 2_000_000, 'Synthetic corpus size.')
_VARIANTS = flags.DEFINE_list('variants', ['baseline', 'scone'], 'Quality mode: which runs.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/bench_train_quality', 'Quality-mode runs.')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_preset(name: str) -> config_lib.Config:
  """tiny -> experiments/tiny.py; 25m / 125m -> experiments/gpt2.py:<name>."""
  file, arg = ('tiny.py', None) if name == 'tiny' else ('gpt2.py', name)
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
  variant: str
  step_ms: float
  tokens_per_s: float
  flops_per_step: float
  mfu: float | None
  dedup_saved: float | None  # 1 - distinct / matched positions.
  pipeline_tokens_per_s: float


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


def measure(name: str, cfg: config_lib.Config, variant: str, shards, table, steps: int,
            peak: float | None) -> Row:
  """One preset x variant: pipeline alone, then the compiled step on pre-built batches."""
  local, pipeline_tps = _pipeline(cfg, shards, table, steps + 2)
  split = [batches.split_stats(b) for b in local]
  stats = [s for _, s in split]
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
  graphdef, state, tx = step_lib.create_train_state(cfg, mesh, vocab, cfg.fgram.max_len)
  step_fn = step_lib.make_train_step(graphdef, tx,
                                     optimizer_lib.learning_rate_schedule(cfg.train), 1)
  device_batches = [batches.to_global_arrays(b, mesh) for b, _ in split]
  compiled = step_lib.jit_train_step(step_fn, state, device_batches[0], mesh)
  with jax.set_mesh(mesh):
    for b in device_batches[:2]:  # Warm-up.
      state, metrics = compiled(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in device_batches[2:]:
      state, metrics = compiled(state, b)
    jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  tokens = cfg.train.batch_size * cfg.train.seq_len
  per_token = flops_lib.flops_per_token(cfg, vocab)
  static_flops = per_token.train_total * tokens
  useful = metrics_lib.StepFlops(cfg, vocab).useful(
      {'fgram_unique': float(np.mean([s.get('fgram_unique', 0) for s in stats]))})
  dedup = None
  if cfg.is_scone:
    matched = sum(s['fgram_matched_frac'] * s['num_tokens'] for s in stats)
    dedup = 1.0 - sum(s['fgram_unique'] for s in stats) / max(matched, 1.0)
  return Row(name, variant, seconds * 1e3, tokens / seconds, static_flops,
             metrics_lib.mfu(useful, seconds, jax.device_count(), peak), dedup, pipeline_tps)


def _parse_overrides() -> dict:
  overrides = {}
  for item in _OVERRIDES.value:
    key, _, value = item.partition('=')
    overrides[key] = json.loads(value) if value[:1] in '0123456789-[{tf' else value
  return overrides


def speed(presets, steps, device):
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} (peak '
        f'{peak / 1e12 if peak else float("nan"):.0f} TFLOP/s bf16 dense); {steps} timed steps')
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
    cfg = _variant_config(cfg, 'baseline', overrides)
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    start = time.perf_counter()
    shards = SyntheticShards(_TOKENS.value, vocab)
    table = mine_fgrams(shards.docs(), max_len=cfg.fgram.max_len,
                        size=min(cfg.fgram.size, 200_000), min_count=cfg.fgram.min_count,
                        progress=False)
    print(f'{name}: synthetic corpus {_TOKENS.value} tokens, {len(table)} f-grams mined in '
          f'{time.perf_counter() - start:.1f} s')
    base = measure(name, cfg, 'baseline', shards, None, steps, peak)
    scone_cfg = _variant_config(cfg, 'scone', overrides)
    # U = the most distinct f-grams in the measured batches (+10%, rounded up to 64).
    local, _ = _pipeline(scone_cfg, shards, table, steps + 2)
    max_distinct = max(batches.split_stats(b)[1]['fgram_unique'] for b in local)
    capacity = int(np.ceil(max_distinct * 1.1 / 64) * 64)
    scone_cfg = config_lib.replace(scone_cfg, **{'fgram_model.capacity': capacity})
    scone = measure(name, scone_cfg, 'scone', shards, table, steps, peak)
    table_rows.append((base, scone, capacity))
  print()
  header = (f'{"preset":<7}{"variant":<9}{"step ms":>9}{"tok/s":>10}{"GFLOP/step":>12}'
            f'{"MFU":>7}{"dedup":>7}{"pipe tok/s":>12}{"pipe/train":>11}')
  print(header)
  print('-' * len(header))
  for base, scone, _ in table_rows:
    for r in (base, scone):
      mfu = f'{100 * r.mfu:6.1f}%' if r.mfu is not None else '     - '
      dedup = f'{100 * r.dedup_saved:6.1f}%' if r.dedup_saved is not None else '     - '
      print(f'{r.preset:<7}{r.variant:<9}{r.step_ms:9.1f}{r.tokens_per_s:10.0f}'
            f'{r.flops_per_step / 1e9:12.1f}{mfu}{dedup}{r.pipeline_tokens_per_s:12.0f}'
            f'{r.pipeline_tokens_per_s / r.tokens_per_s:10.1f}x')
  print()
  for base, scone, capacity in table_rows:
    analytic = scone.flops_per_step / base.flops_per_step
    measured = scone.step_ms / base.step_ms
    print(f'{base.preset}: SCONE/baseline time {measured:.2f}x vs FLOPs {analytic:.2f}x '
          f'-> measured/analytical {measured / analytic:.2f} (target <= 1.15); capacity U='
          f'{capacity}; A_f work saved by dedup {100 * scone.dedup_saved:.0f}%')


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
  if _DEVICE.value == 'gpu' and jax.devices()[0].platform != 'gpu':
    sys.exit(f'--device=gpu but jax sees {jax.devices()[0].platform}')
  presets = _PRESET.value or (['125m'] if _DEVICE.value == 'gpu' else ['tiny', '25m'])
  speed(presets, _STEPS.value or (30 if _DEVICE.value == 'gpu' else 10), _DEVICE.value)


if __name__ == '__main__':
  app.run(main)
