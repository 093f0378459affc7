"""Baseline vs SCONE for equal wall-clock minutes on one accelerator: a study for a short slot.

  make gpu-wheels gpu-corpus                 # here, with network + the Debian corpora
  python benchmarks/gpu_study.py --corpus=.whl/corpus/kjv.tar.xz --out=/tmp/gpu_study.json
  python benchmarks/gpu_study.py --device=cpu --quick --corpus=DIR --out=/tmp/s.json

On a fresh GPU machine (wheels and corpus carried in the ignored `.whl/`), in at most
~10 minutes with the defaults:
1. wheels and setup as benchmarks/accelerator.py (carried wheels, GPU XLA flags, the
   persistent compilation cache);
2. the corpus: a directory with train.txt, valid.txt and test.txt (one document per
   line; scone_jax/corpus/prose.py writes them), or a .tar.xz/.tar.gz of one;
3. prepare once (tokenizer, f-gram table), shared by both arms;
4. per arm (baseline: no A_f; SCONE: a 1-layer A_f over S f-grams), a short calibration
   run measures the step time (compilation excluded: the train loop's step_seconds), then
   a fresh run trains for `--minutes` of step time: steps = minutes x 60 / step time, so
   each arm gets the same wall-clock budget and a complete lr schedule;
5. prints and writes JSON: per arm steps, tokens seen (and epochs: a small corpus
   overfits), step time, MFU (when the device's peak is known), validation and test loss;
   the test-loss difference SCONE - baseline.
One seed at one learning rate: a measurement of what equal time buys, not a tuned verdict
(`make study` / `make study-prose` are those).

The GPU preset: GPT-2 family, d 640, 10 layers, 10 heads (~50M backbone parameters without
embeddings), 512 tokens x 32 rows per step, 8K vocabulary, S = 32,768, A_f 1 layer.
`--quick` is a tiny smoke run of every step (CI: `--device=cpu --quick`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tarfile
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_accelerator():
  """benchmarks/accelerator.py (carried wheels, GPU setup; it makes the repo importable on
  a machine without `pip install -e .`), loaded by path: benchmarks/ is not a package."""
  spec = importlib.util.spec_from_file_location('accelerator',
                                                os.path.join(_HERE, 'accelerator.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


accelerator = _load_accelerator()

# Overrides of scone_jax.config.base_config per preset; the arms add their own.
PRESETS = {
    'gpu': {'model.family': 'gpt2', 'model.d_model': 640, 'model.num_layers': 10,
            'model.num_heads': 10, 'model.max_seq_len': 512, 'model.dtype': 'bfloat16',
            'train.seq_len': 512, 'train.batch_size': 32, 'train.learning_rate': 1e-3,
            'train.warmup_steps': 100, 'train.log_every': 20, 'train.eval_batches': 40,
            'tokenizer.vocab_size': 8192, 'fgram.size': 32768, 'fgram.min_count': 2,
            'fgram.max_len': 4, 'checkpoint.every_steps': 100000},
    'quick': {'model.family': 'gpt2', 'model.d_model': 32, 'model.num_layers': 1,
              'model.num_heads': 2, 'model.max_seq_len': 32, 'train.seq_len': 32,
              'train.batch_size': 4, 'train.learning_rate': 3e-3, 'train.warmup_steps': 2,
              'train.log_every': 2, 'train.eval_batches': 2, 'tokenizer.vocab_size': 512,
              'fgram.size': 500, 'fgram.min_count': 2, 'fgram.max_len': 3,
              'checkpoint.every_steps': 100000},
}
ARMS = {'baseline': {'fgram_model.num_layers': 0}, 'scone': {'fgram_model.num_layers': 1}}
CALIBRATION_STEPS = {'gpu': 60, 'quick': 6}


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--device', choices=('gpu', 'cpu'), default='gpu')
  p.add_argument('--quick', action='store_true', help='tiny sizes (a smoke test)')
  p.add_argument('--corpus', required=True, help='dir with train/valid/test.txt, or a '
                 '.tar.xz/.tar.gz of one')
  p.add_argument('--minutes', type=float, default=None,
                 help='step time per arm (default 2.5 on gpu, 0.05 with --quick)')
  p.add_argument('--workdir', default='', help='default: a temporary directory')
  p.add_argument('--whl_dir', default=os.path.join(os.path.dirname(_HERE), '.whl'))
  p.add_argument('--out', default='', help='also write the JSON here')
  return p.parse_args(argv)


def corpus_dir(path: str, scratch: str) -> str:
  """`path` if it is a corpus directory, else the directory its tarball unpacks to."""
  if os.path.isdir(path):
    root = path
  elif path.endswith(('.tar.xz', '.tar.gz', '.tgz')):
    root = os.path.join(scratch, 'corpus')
    with tarfile.open(path) as tar:
      tar.extractall(root, filter='data')
    subdirs = [os.path.join(root, d) for d in os.listdir(root)]
    if not os.path.exists(os.path.join(root, 'train.txt')) and len(subdirs) == 1:
      root = subdirs[0]
  else:
    raise SystemExit(f'--corpus={path}: not a directory or a .tar.xz/.tar.gz')
  missing = [f for f in ('train.txt', 'valid.txt', 'test.txt')
             if not os.path.isfile(os.path.join(root, f))]
  if missing:
    raise SystemExit(f'--corpus={path}: {missing} missing (python -m scone_jax.corpus.prose '
                     'writes train/valid/test.txt)')
  return root


def make_config(preset: str, corpus: str, artifacts: str, arm: str, steps: int):
  from scone_jax import config as config_lib  # After ensure_wheels (ml_collections).
  cd = config_lib.base_config()
  values = {**PRESETS[preset], **ARMS[arm], 'name': f'gpu_study_{arm}',
            'data.source': 'files', 'data.format': 'lines',
            'data.train_files': os.path.join(corpus, 'train.txt'),
            'data.valid_files': 'prose=' + os.path.join(corpus, 'valid.txt'),
            'data.eval_files': 'prose=' + os.path.join(corpus, 'test.txt'),
            'data.artifacts_dir': artifacts, 'fgram.allow_short_table': True,
            'train.steps': steps}
  values['train.warmup_steps'] = min(values['train.warmup_steps'], max(steps // 10, 1))
  for dotted, value in values.items():
    node = cd
    *parents, leaf = dotted.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config_lib.from_configdict(cd)


def train_arm(preset: str, corpus: str, artifacts: str, arm: str, minutes: float,
              workdir: str) -> dict:
  from scone_jax.run import RunDir
  from scone_jax.train import loop
  calib_dir = os.path.join(workdir, f'{arm}_calibration')
  loop.train(make_config(preset, corpus, artifacts, arm, CALIBRATION_STEPS[preset]),
             calib_dir)
  timed = [m['step_seconds'] for m in RunDir(calib_dir).metrics() if 'step_seconds' in m]
  # The first interval holds the warm-up of the data pipeline; the median ignores it.
  step_s = statistics.median(timed[1:] or timed)
  steps = max(int(minutes * 60 / step_s), 2)
  run_dir = os.path.join(workdir, arm)
  cfg = make_config(preset, corpus, artifacts, arm, steps)
  start = time.perf_counter()
  loop.train(cfg, run_dir)
  wall = time.perf_counter() - start
  metrics = RunDir(run_dir).metrics()
  logged = [m for m in metrics if 'step_seconds' in m]
  with open(os.path.join(run_dir, 'eval.json')) as f:
    corpora = json.load(f)['corpora']
  with open(os.path.join(artifacts, 'tokens', 'train', 'manifest.json')) as f:
    train_tokens = json.load(f)['num_tokens']
  mfus = [m['mfu'] for m in logged if m.get('mfu') is not None]
  tokens = steps * cfg.train.batch_size * cfg.train.seq_len
  return {'arm': arm, 'steps': steps, 'calibrated_step_seconds': step_s,
          'step_seconds': statistics.median(m['step_seconds'] for m in logged),
          'train_seconds_with_compile_and_eval': wall, 'tokens_seen': tokens,
          'epochs': tokens / train_tokens,
          'mfu': statistics.median(mfus) if mfus else None,
          'valid_loss': corpora['valid.prose']['loss'], 'test_loss': corpora['prose']['loss'],
          'test_perplexity': corpora['prose']['perplexity']}


def main(argv=None) -> dict:
  args = _args(argv)
  start = time.perf_counter()
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  wheels = accelerator.ensure_wheels(args.whl_dir) if args.device == 'gpu' else {}
  from scone_jax import compat
  if args.device == 'gpu':  # Before the backend starts.
    os.environ['XLA_FLAGS'] = compat.gpu_xla_flags()
  import jax
  if jax.devices()[0].platform != args.device:
    raise SystemExit(f'--device={args.device} but jax sees {jax.devices()[0].platform}')
  compat.enable_compilation_cache()
  preset = 'quick' if args.quick else 'gpu'
  minutes = args.minutes if args.minutes is not None else (0.05 if args.quick else 2.5)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or os.path.join(scratch, 'runs')
    corpus = corpus_dir(args.corpus, scratch)
    artifacts = os.path.join(workdir, 'prepare')
    rows = [train_arm(preset, corpus, artifacts, arm, minutes, workdir) for arm in ARMS]
  base, scone = rows
  result = {'device': jax.devices()[0].device_kind, 'preset': preset,
            'minutes_per_arm': minutes, 'wheels': wheels, 'arms': rows,
            'test_loss_scone_minus_baseline': scone['test_loss'] - base['test_loss'],
            'seconds_total': time.perf_counter() - start,
            'note': 'one seed, one learning rate: what equal step time buys, not a tuned '
                    'comparison'}
  print(f'{"arm":9} {"steps":>7} {"step s":>8} {"tokens":>11} {"epochs":>7} {"MFU":>6} '
        f'{"valid":>7} {"test":>7}')
  for r in rows:
    mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a'
    print(f'{r["arm"]:9} {r["steps"]:>7} {r["step_seconds"]:>8.4f} {r["tokens_seen"]:>11,} '
          f'{r["epochs"]:>7.2f} {mfu:>6} {r["valid_loss"]:>7.4f} {r["test_loss"]:>7.4f}')
  print(f'test loss SCONE - baseline: {result["test_loss_scone_minus_baseline"]:+.4f} '
        f'({result["device"]}, {minutes:g} min of step time per arm, '
        f'{result["seconds_total"]:.0f} s in all)')
  if args.out:
    with open(args.out + '.tmp', 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(args.out + '.tmp', args.out)
  return result


if __name__ == '__main__':
  main()
