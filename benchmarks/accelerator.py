"""One command for a short accelerator slot: train MFU, SCONE's cost, decode throughput.

  make gpu-wheels                                          # here, with network: .whl/
  python benchmarks/accelerator.py --out=/tmp/accel.json   # on the GPU, <= 8 min fresh
  python benchmarks/accelerator.py --device=cpu --quick --out=/tmp/accel.json  # smoke
  python benchmarks/accelerator.py --device=cpu --budget_s=0 --decode_preset=tiny  # CPU
                                                           # decode only (lookups compared)

In order:
1. wheels: the packages the GPU image lacks (grain and its array-record/portpicker/
   cloudpickle, ml-collections, tensorboardX, google-crc32c, tqdm) are imported, or installed
   from `.whl/` (`make gpu-wheels`) with `pip install --no-index --no-deps --target
   .whl/site` and put on sys.path; what was done is printed.
2. setup: GPU XLA flag presets (`compat.gpu_xla_flags`, before the backend starts) and the
   persistent compilation cache (`compat.enable_compilation_cache`).
3. train: step time, tokens/s and MFU of baseline and SCONE (A_f at 1x depth) for GPT-2
   125M (B16 x T1024) and OLMo-0.7B (d 2048, 12 layers, MLP 8192, B8 x T2048), with
   attention 'einsum' and 'auto' (cuDNN on a GPU in bf16); batches pre-built on the device,
   every A_f row bucket compiled before timing (bench_train.Variant).
4. flops_ratio: SCONE / baseline step time next to the analytical FLOPs ratio at the
   measured A_f tokens (scone_jax/model/flops.py).
5. decode: tokens/s of the baseline and SCONE through the RAM store at B = 1, 16, 64
   (synthetic store and table, benchmarks/bench_decode.py's helpers), SCONE with each
   device-loop lookup: 'auto' (what a user gets: native on CPU, device on a CUDA GPU),
   'callback' (io_callback) and 'device' (device match + the compiled FFI gather,
   serve/ffi_gather.py); a lookup that cannot be built here is reported with its reason.
6. decode_flops: XLA's FLOPs of the compiled decode chunk, SCONE / baseline (equal: the
   store lookup adds no device FLOPs beyond the row select).
A section that cannot run (e.g. the decoder does not import) reports "skipped: <reason>".
Train cases past `--budget_s` are skipped likewise, so a slot always gets the JSON.
`--quick` runs every section at tiny sizes (decode at B = 1, 4): a smoke test.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO, os.path.dirname(os.path.abspath(__file__))]
# Only jax and jaxlib below: importing them does not start the backend (XLA_FLAGS and
# JAX_PLATFORMS are still read later). Modules that need the carried wheels (grain, ...)
# are imported after `ensure_wheels`, inside the sections.
from scone_jax import compat  # noqa: E402  pylint: disable=wrong-import-position

# module -> distribution, for what the GPU image (Python 3.12, jax CUDA, flax, optax, orbax,
# tensorstore, numba, sentencepiece, absl, chex) lacks; the Makefile's gpu-wheels target
# downloads the same list.
WHEELS = {'grain': 'grain', 'array_record': 'array-record', 'portpicker': 'portpicker',
          'cloudpickle': 'cloudpickle', 'ml_collections': 'ml-collections',
          'tensorboardX': 'tensorboardX', 'google_crc32c': 'google-crc32c', 'tqdm': 'tqdm'}
SECTIONS = ('environment', 'wheels', 'train', 'flops_ratio', 'decode', 'decode_flops')
# preset -> (batch, seq_len) for the timed train steps; --quick uses tiny at 2 x 32.
TRAIN_SHAPES = {'125m': (16, 1024), '0.7b': (8, 2048)}


def _dist(name: str) -> str:
  """A distribution's normalised name (PEP 503, with '_'), as wheel file names spell it."""
  return re.sub(r'[-_.]+', '_', name).lower()


def _run_with(site: str) -> None:
  """Re-runs this command with `site` on PYTHONPATH (once: then it is on sys.path), so the
  carried packages import like installed ones; nothing edits sys.path."""
  if os.path.abspath(site) in (os.path.abspath(p) for p in sys.path if p):
    return
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (os.path.abspath(site), os.environ.get('PYTHONPATH', '')) if p))
  print(f'rerunning with {site} on PYTHONPATH', flush=True)
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def ensure_wheels(whl_dir: str) -> dict[str, str]:
  """Each WHEELS module: 'present', 'installed' (from whl_dir), or 'missing: <why>'.

  Only the wheels of missing modules are installed (the image's own packages are never
  shadowed), into a temp dir moved entry by entry into whl_dir/site, so a killed install
  never leaves a half-written package there.
  """
  site = os.path.join(whl_dir, 'site')
  if os.path.isdir(site):
    _run_with(site)  # Wheels installed earlier: this process must import them.
  status = {m: 'present' for m in WHEELS if importlib.util.find_spec(m) is not None}
  missing = [m for m in WHEELS if m not in status]
  wanted = {_dist(WHEELS[m]) for m in missing}
  wheels = [w for w in sorted(glob.glob(os.path.join(whl_dir, '*.whl')))
            if _dist(os.path.basename(w).split('-')[0]) in wanted]
  if wheels:
    tmp = tempfile.mkdtemp(prefix='site.partial-', dir=whl_dir)
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-index', '--no-deps', '--target',
           tmp, *wheels]
    print('installing carried wheels:', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    os.makedirs(site, exist_ok=True)
    for entry in os.listdir(tmp):
      dest = os.path.join(site, entry)
      if os.path.isdir(dest):
        shutil.rmtree(dest)
      os.replace(os.path.join(tmp, entry), dest)
    os.rmdir(tmp)
    _run_with(site)
  for m in missing:
    status[m] = 'installed' if importlib.util.find_spec(m) is not None else (
        f'missing: no {WHEELS[m]} wheel in {whl_dir} (run `make gpu-wheels` where PyPI '
        'is reachable and carry .whl/)')
  for m, s in status.items():
    print(f'wheel {m}: {s}')
  return status


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--device', choices=['gpu', 'tpu', 'cpu'], default='gpu')
  p.add_argument('--quick', action='store_true', help='Tiny sizes (a smoke test).')
  p.add_argument('--out', default='', help='Write the results as JSON here.')
  p.add_argument('--presets', default='', help='Train presets (default 125m,0.7b).')
  p.add_argument('--attention', default='einsum,auto', help='Attention choices to time.')
  p.add_argument('--steps', type=int, default=0, help='Timed steps (default 8; quick 1).')
  p.add_argument('--remat', default='', help='Override model.remat (none|block|dots).')
  p.add_argument('--loss_chunk', type=int, default=-1, help='Override model.loss_chunk.')
  p.add_argument('--decode_preset', default='', help='Decode backbone (default 125m; quick '
                 'tiny).')
  p.add_argument('--decode_batches', default='', help='Decode batch sizes (default 1,16,64; '
                 'quick 1,4).')
  p.add_argument('--budget_s', type=float, default=420.0,
                 help='Skip train cases that would start after this many seconds.')
  p.add_argument('--whl_dir', default=os.path.join(_REPO, '.whl'))
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = _args(argv)
  start = time.perf_counter()
  results = {'wheels': ensure_wheels(args.whl_dir)}
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  if args.device == 'gpu':  # Before the backend starts (the jax.devices() below).
    os.environ['XLA_FLAGS'] = compat.gpu_xla_flags()
  flags.FLAGS.mark_as_parsed()  # bench_train/bench_decode define absl flags we never read.
  platform = jax.devices()[0].platform
  if platform != args.device:
    sys.exit(f'--device={args.device} but jax sees {platform}')
  results['environment'] = {
      'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compilation_cache': compat.enable_compilation_cache(), 'quick': args.quick,
      'load': os.getloadavg()}
  print(json.dumps(results['environment'], indent=1), flush=True)
  results['train'] = train_section(args, start)
  results['flops_ratio'] = flops_ratio_section(results['train'])
  print(f'train done at {time.perf_counter() - start:.0f} s', flush=True)
  results['decode'], results['decode_flops'] = decode_sections(args)
  results['seconds'] = time.perf_counter() - start
  if args.out:
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(tmp, args.out)
  print(f'done in {results["seconds"]:.0f} s' + (f'; wrote {args.out}' if args.out else ''))
  return results


def train_section(args, start: float) -> list[dict]:
  """One row per preset x attention x variant (baseline, scone)."""
  import bench_train  # pylint: disable=import-outside-toplevel
  from scone_jax.fgrams import mine_fgrams  # pylint: disable=import-outside-toplevel
  from scone_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  presets = args.presets.split(',') if args.presets else (
      ['tiny'] if args.quick else list(TRAIN_SHAPES))
  steps = args.steps or (1 if args.quick else 8)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  rows = []
  print(f'\n{"preset":<7}{"attention->kernel":<18}{"variant":<9}{"step ms":>9}{"tok/s":>10}'
        f'{"GFLOP/step":>12}{"MFU":>8}', flush=True)
  for name in presets:
    cfg = bench_train.load_preset(name)
    b, t = (2, 32) if args.quick else TRAIN_SHAPES.get(name, (cfg.train.batch_size,
                                                               cfg.train.seq_len))
    overrides = {'train.batch_size': b, 'train.seq_len': t,
                 'model.max_seq_len': max(t, cfg.model.max_seq_len)}
    if args.device == 'cpu':
      overrides['model.dtype'] = 'float32'
    if args.remat:
      overrides['model.remat'] = args.remat
    if args.loss_chunk >= 0:
      overrides['model.loss_chunk'] = args.loss_chunk
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    shards = bench_train.SyntheticShards(max(20 * b * t * steps, 50_000), vocab)
    table = mine_fgrams(shards.docs(), max_len=cfg.fgram.max_len,
                        size=min(cfg.fgram.size, 200_000), min_count=cfg.fgram.min_count,
                        progress=False)
    for attention in args.attention.split(','):
      case = f'{name}/{attention}'
      if time.perf_counter() - start > args.budget_s:
        rows.append({'preset': name, 'attention': attention,
                     'skipped': f'time budget {args.budget_s:.0f} s spent'})
        print(f'{case}: skipped (time budget)', flush=True)
        continue
      variants = [bench_train.Variant(bench_train._variant_config(  # pylint: disable=protected-access
          cfg, v, {**overrides, 'model.attention': attention}), shards,
          table if v == 'scone' else None, steps) for v in ('baseline', 'scone')]
      seconds = [v.run() for v in variants]
      if not args.quick:  # Best of two alternating rounds: background load hits both.
        seconds = [min(s, v.run()) for s, v in zip(seconds, variants)]
      for v, s in zip(variants, seconds):
        r = v.row(name, 'synthetic', s, peak)
        kernel = compat_kernel(v.cfg)
        rows.append({'preset': name, 'attention': attention, 'kernel': kernel,
                     'variant': r.variant, 'batch': b, 'seq_len': t, 'step_ms': r.step_ms,
                     'tokens_per_s': r.tokens_per_s, 'flops_per_step': r.flops_per_step,
                     'mfu': r.mfu, 'af_tokens_per_token':
                         r.af['af_per_token'] if r.af else None})
        mfu = f'{100 * r.mfu:7.1f}%' if r.mfu is not None else '      - '
        print(f'{name:<7}{attention + "->" + kernel:<18}{r.variant:<9}{r.step_ms:9.1f}'
              f'{r.tokens_per_s:10.0f}{r.flops_per_step / 1e9:12.1f}{mfu}', flush=True)
  return rows


def compat_kernel(cfg) -> str:
  """The attention kernel the backbone's training forward runs for `cfg`."""
  m = cfg.model
  return compat.attention_backend(m.attention, m.dtype, cfg.train.seq_len,
                                  m.d_model // m.num_heads)


def flops_ratio_section(train_rows: list[dict]) -> list[dict]:
  """SCONE / baseline measured time vs analytical FLOPs, per preset x attention."""
  out = []
  timed = [r for r in train_rows if 'skipped' not in r]
  for base in (r for r in timed if r['variant'] == 'baseline'):
    scone = next(r for r in timed if r['variant'] == 'scone' and
                 (r['preset'], r['attention']) == (base['preset'], base['attention']))
    measured = scone['step_ms'] / base['step_ms']
    analytic = scone['flops_per_step'] / base['flops_per_step']
    out.append({'preset': base['preset'], 'attention': base['attention'],
                'time_ratio': measured, 'flops_ratio': analytic,
                'measured_over_analytical': measured / analytic})
    print(f'{base["preset"]}/{base["attention"]}: SCONE/baseline time {measured:.3f}x vs '
          f'FLOPs {analytic:.3f}x -> measured/analytical {measured / analytic:.3f}')
  return out


def decode_sections(args) -> tuple[dict, dict]:
  """(decode tokens/s, decode-chunk XLA FLOPs), or both 'skipped: <reason>'."""
  try:
    import bench_decode  # pylint: disable=import-outside-toplevel
    from scone_jax.serve.decode import Decoder, Sampling  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    # The serving code is being restructured separately: report, never crash the slot.
    reason = {'skipped': f'decoder does not import: {type(e).__name__}: {e}'}
    print(f'decode: {reason["skipped"]}')
    return reason, reason
  try:
    return _decode(args, bench_decode, Decoder, Sampling)
  except Exception as e:  # pylint: disable=broad-except
    reason = {'skipped': f'decode failed: {type(e).__name__}: {e}'}
    print(f'decode: {reason["skipped"]}')
    return reason, reason


def _decode(args, bench_decode, decoder_cls, sampling_cls) -> tuple[dict, dict]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from scone_jax.export.writer import write_store  # pylint: disable=import-outside-toplevel
  from scone_jax.model import SconeLM  # pylint: disable=import-outside-toplevel
  from scone_jax.serve import EmbeddingStore  # pylint: disable=import-outside-toplevel

  preset = args.decode_preset or ('tiny' if args.quick else '125m')
  rows_n, prompt_len, new_tokens = (2_000, 8, 4) if args.quick else (200_000, 32, 128)
  batches = ([int(b) for b in args.decode_batches.split(',')] if args.decode_batches else
             (1, 4) if args.quick else (1, 16, 64))
  cfg = bench_decode.load_preset(preset)
  new_tokens = min(new_tokens, cfg.model.max_seq_len - prompt_len - 1)  # BOS + prompt fit.
  vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
  d = cfg.model.d_model
  table, stream = bench_decode.synthetic_table(rows_n, vocab)
  rng = np.random.default_rng(1)
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=bench_decode.K, vocab_size=vocab,
               rngs=nnx.Rngs(0))
  decode = {'preset': preset, 'store_rows': rows_n, 'prompt_len': prompt_len,
            'new_tokens': new_tokens, 'tokens_per_s': {}}
  flops = {'preset': preset}
  with tempfile.TemporaryDirectory(prefix='accel_store_') as store_dir:
    write_store(store_dir, rows_n, d, 'bfloat16', 65536,
                lambda a, z: rng.standard_normal((z - a, d), np.float32),
                {'bench': 'accelerator', 'rows': rows_n, 'd': d}, progress=False)
    ram = EmbeddingStore.open(store_dir, 'ram')
    print(f'\ndecode {preset}: tokens/s (store {rows_n:,} rows, RAM)', flush=True)
    for b in batches:
      starts = [i * 97 % (len(stream) - prompt_len) for i in range(b)]
      prompts = [stream[s:s + prompt_len] for s in starts]
      decoders = {'baseline': decoder_cls(lm, batch_size=b),
                  'scone': decoder_cls(lm, ram, table, batch_size=b)}
      for mode in ('callback', 'device'):
        try:
          decoders[f'scone-{mode}'] = decoder_cls(lm, ram, table, batch_size=b, lookup=mode)
        except ValueError as e:  # The FFI gather does not build here: say why.
          decode.setdefault('unavailable', {})[mode] = str(e)
      rates = {}
      for name, dec in decoders.items():
        dec.generate(prompts, new_tokens)  # Compile.
        rates[name] = max(dec.generate(prompts, new_tokens).tokens_per_second
                          for _ in range(2))
      decode['lookup'] = decoders['scone'].lookup.name
      decode['tokens_per_s'][str(b)] = {**rates, 'ratio': rates['scone'] / rates['baseline']}
      # The chunk the timed generations ran (compiled once per decoder and sampling).
      cost = {n: compat.cost_flops(decoders[n].compiled_loop_chunk(sampling_cls()))
              for n in ('baseline', 'scone')}
      flops[str(b)] = {**cost, 'ratio': cost['scone'] / cost['baseline']}
      lookups = '  '.join(f'{n} {r:8.0f}' for n, r in rates.items() if n.startswith('scone-'))
      print(f'B={b:>3}: tokens/s baseline {rates["baseline"]:10.0f}  SCONE '
            f'({decode["lookup"]}) {rates["scone"]:10.0f} '
            f'({rates["scone"] / rates["baseline"]:.3f}x)  {lookups}; XLA FLOPs '
            f'of the decode chunk baseline {cost["baseline"]:.4g}, SCONE {cost["scone"]:.4g} '
            f'({cost["scone"] / cost["baseline"]:.4f}x)', flush=True)
  return decode, flops


if __name__ == '__main__':
  main()
