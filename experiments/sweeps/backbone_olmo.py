"""OLMo backbone sizes vs SCONE (paper: 0.7B/1B/1.3B/1.9B baselines; OLMo-1.3B + 10M
f-grams matches the 1.9B baseline; OLMo-1B + 1B f-grams with a 1.8B A_f beats it).

  python launch/sweep.py --sweep=experiments/sweeps/backbone_olmo.py --dry_run

The dry-run table shows each point's accelerator-resident params (711M/1014M/1316M/1920M
within 2%) and equal inference FLOPs per token for SCONE and its backbone.
"""

BASE_CONFIG = 'experiments/olmo.py:0.7b'
# Paper name: layers (d_model 2048 throughout).
LAYERS = {'0.7b': 12, '1b': 18, '1.3b': 24, '1.9b': 36}


def get_sweep():
  points = [{'model.num_layers': n, 'fgram_model.num_layers': 0} for n in LAYERS.values()]
  # 1.3B + 10M f-grams, A_f at 1x depth (24 layers, ~1.2B).
  points.append({'model.num_layers': LAYERS['1.3b'], 'fgram_model.num_layers': 24,
                 'fgram.size': 10_000_000})
  # 1B + 1B f-grams, A_f of 36 layers (~1.8B, the paper's SCONE-1B).
  points.append({'model.num_layers': LAYERS['1b'], 'fgram_model.num_layers': 36,
                 'fgram.size': 1_000_000_000})
  return points
