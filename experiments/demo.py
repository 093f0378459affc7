"""`make demo` preset: a tiny GPT-2 backbone that trains in about a minute on 2 CPU cores.

  python -m scone_jax.train --config=experiments/demo.py --workdir=runs/demo_one
  python -m scone_jax.train --config=experiments/demo.py:micro --workdir=runs/micro

The demo sweep (experiments/sweeps/demo.py) trains it as a baseline and with SCONE at
several numbers of f-grams S. 'micro' is a few-step variant for end-to-end tests.
'study' is what `make study` (experiments/sweeps/study.py) trains: a larger mined table
(16,384 f-grams, sliced per point) and 600 steps, so the least frequent f-gram of the
largest S it compares (2,048, count 39 in the train split) is seen ~50 times in training
(600 steps x ~995 tokens = 1.3 epochs of the 459K-token train split).
"""

from scone_jax import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.name = 'demo'
  # 5% of stdlib modules form the validation corpus 'valid.stdlib' (learning rates are
  # chosen on it), disjoint from the test corpus 'stdlib' and from train.
  c.data.embedded_valid_fraction = 0.05
  c.tokenizer.vocab_size = 2048
  c.tokenizer.train_chars = 4_000_000
  c.fgram.max_len = 4
  c.fgram.size = 4096  # The demo sweep slices this table (fgram.use_size) for smaller S.
  c.fgram.min_count = 5
  c.model.family = 'gpt2'
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.max_seq_len = 64
  c.fgram_model.num_layers = 1
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.seq_len = 64
  # The baseline's best of 3e-3 / 5e-3 / 1e-2 (seed 0: ppl 294 / 292 / 325), so SCONE is
  # compared with the baseline at its best learning rate.
  c.train.learning_rate = 5e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.checkpoint.every_steps = 1000  # Only the final checkpoint (export reads it).
  if arg == 'study':
    c.name = 'study'
    c.fgram.size = 16384
    c.fgram.min_count = 2
    c.train.steps = 600
    c.train.warmup_steps = 60
  elif arg == 'micro':
    c.name = 'micro'
    c.tokenizer.vocab_size = 512  # Above the 256 byte-fallback pieces.
    c.fgram.size = 512
    c.fgram.min_count = 2
    c.model.d_model = 32
    c.model.max_seq_len = 32
    c.train.steps = 3
    c.train.batch_size = 8  # Divisible by the tests' 8 fake devices.
    c.train.seq_len = 32
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.eval_batches = 1
  elif arg:
    raise ValueError(f"experiments/demo.py takes no argument, 'study' or 'micro', got {arg!r}")
  return c
