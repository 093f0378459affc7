"""Perplexity vs A_f size (paper, WebText, S = 100M f-grams: A_f at 0.5x, 1x, 2x and 3x the
backbone's non-embedding params for the 128M, 419M and 589M models. The 419M model's
WikiText-103 perplexity: baseline 26.1, + A_f 170M (6 layers) 23.4, + A_f 1020M (36 layers)
22.1).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/af_size.py --dry_run

A_f has the backbone's width, so its size is set by its layer count: 0.5x..3x of a
12-layer backbone are 6/12/24/36 layers (170M/340M/680M/1020M non-embedding params). All
points slice one table mined at S = 100M. One seed, as the paper; 80B tokens per point.
Data and tokenizer flags as in num_fgrams.py (--set=data.source=files ...).
"""

from scone_jax.model import presets

BASE_CONFIG = 'experiments/gpt2.py:419m'
NUM_FGRAMS = 100_000_000
MULTIPLIERS = (0.5, 1, 2, 3)
# Paper name: (d_model, layers, heads).
BACKBONES = {'128m': (1024, 6, 16), '419m': (1536, 12, 24), '589m': (1536, 18, 24)}


def get_sweep():
  points = []
  for d, layers, heads in BACKBONES.values():
    common = {'model.d_model': d, 'model.num_layers': layers, 'model.num_heads': heads,
              'fgram.size': NUM_FGRAMS}
    points.append({**common, 'fgram_model.num_layers': 0})
    points += [{**common, 'fgram_model.num_layers': presets.af_layers_for(m, layers)}
               for m in MULTIPLIERS]
  return points
