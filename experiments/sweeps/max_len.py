"""Perplexity vs maximum f-gram length K = 2..8 (paper ablation, WebText GPT-2 419M, S =
20M f-grams, A_f at 1x the backbone (12 layers), 3 seeds: gains plateau at K = 4-6).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/max_len.py --dry_run

Each K mines its own table of 20M f-grams (the launcher gives each distinct
data/tokenizer/f-gram config its own artifacts dir); the tokenizer and token shards are
rebuilt per K too, which is cheap next to training. The baseline runs the same 3 seeds,
paired with the SCONE points (same data order per seed). 80B tokens per point. Data and
tokenizer flags as in num_fgrams.py (--set=data.source=files ...).
"""

BASE_CONFIG = 'experiments/gpt2.py:419m,af=1'
NUM_FGRAMS = 20_000_000
MAX_LENS = (2, 3, 4, 5, 6, 7, 8)
SEEDS = (0, 1, 2)


def get_sweep():
  common = {'fgram.size': NUM_FGRAMS}
  points = [{**common, 'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{**common, 'fgram.max_len': k, 'train.seed': s} for k in MAX_LENS for s in SEEDS]
  return points
