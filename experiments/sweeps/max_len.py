"""Perplexity vs maximum f-gram length K = 2..8 (paper ablation: gains plateau at 4-6).

  python launch/sweep.py --sweep=experiments/sweeps/max_len.py --dry_run

GPT-2 419M + A_f at 1x depth, 10M f-grams. Each K mines its own table (the launcher gives
each distinct data/tokenizer/f-gram config its own artifacts dir); the tokenizer and token
shards are rebuilt per K too, which is cheap next to training.
"""

BASE_CONFIG = 'experiments/gpt2.py:419m,af=1'
MAX_LENS = (2, 3, 4, 5, 6, 7, 8)


def get_sweep():
  return [{'fgram_model.num_layers': 0}] + [{'fgram.max_len': k} for k in MAX_LENS]
