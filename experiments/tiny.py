"""CPU-tiny SCONE preset: trains in minutes on 2 cores, on the embedded stdlib corpus.

  python -m scone_jax.train --config=experiments/tiny.py --workdir=runs/tiny
  python -m scone_jax.train --config=experiments/tiny.py --workdir=runs/tiny_base \\
      --config.fgram_model.num_layers=0      # the same backbone without SCONE
"""

from scone_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.name = 'tiny'
  # 1024, not 4096: with 4096 pieces SCONE's held-out loss was above the baseline's at
  # every learning rate up to the baseline's best; with 1024 it is below it (3 seeds;
  # BENCHMARKS.md, "CPU-tiny quality").
  c.tokenizer.vocab_size = 1024
  c.fgram.max_len = 5
  c.fgram.size = 50_000
  c.fgram.min_count = 5
  c.model.family = 'gpt2'
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.max_seq_len = 128
  c.fgram_model.num_layers = 2  # A_f at 1x the backbone's depth.
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.learning_rate = 3e-3  # The baseline's best of 2e-3..5e-3 (BENCHMARKS.md).
  c.train.warmup_steps = 30
  c.checkpoint.every_steps = 100
  return c
