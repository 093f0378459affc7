"""Perplexity vs A_f size (paper: WebText, GPT-2 419M (12 layers), 10M f-grams).

  python launch/sweep.py --sweep=experiments/sweeps/af_size.py --dry_run

A_f has the backbone's width; its size is varied by depth: 0.5x, 1x, 2x, 3x the
backbone's 12 layers (the paper's A_f 170M .. 1020M). All points share one mined table.
"""

BASE_CONFIG = 'experiments/gpt2.py:419m'
BACKBONE_LAYERS = 12
MULTIPLIERS = (0.5, 1, 2, 3)


def get_sweep():
  points = [{'fgram_model.num_layers': 0}]
  points += [{'fgram_model.num_layers': int(m * BACKBONE_LAYERS)} for m in MULTIPLIERS]
  return points
