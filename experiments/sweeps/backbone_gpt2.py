"""Backbone size vs doubled baselines (paper, WebText: GPT-2 128M/419M/589M + SCONE with
S = 100M f-grams and A_f at 1x the backbone match the "doubled" baselines 204M/759M/1099M
of twice the depth, at the backbone's inference FLOPs and accelerator memory).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/backbone_gpt2.py --dry_run

The dry-run table shows each point's accelerator-resident params (the paper's counts
within 1%) and that a SCONE point's inference FLOPs per token equal its backbone's.
80B tokens per point, one seed. Data and tokenizer flags as in num_fgrams.py.
"""

BASE_CONFIG = 'experiments/gpt2.py:128m'
NUM_FGRAMS = 100_000_000
# Paper name: (d_model, layers, heads); the first three also get a SCONE point.
SIZES = {'128m': (1024, 6, 16), '419m': (1536, 12, 24), '589m': (1536, 18, 24),
         '204m': (1024, 12, 16), '759m': (1536, 24, 24), '1099m': (1536, 36, 24)}
SCONE_SIZES = ('128m', '419m', '589m')


def backbone(name):
  d, layers, heads = SIZES[name]
  return {'model.d_model': d, 'model.num_layers': layers, 'model.num_heads': heads,
          'fgram.size': NUM_FGRAMS}


def get_sweep():
  points = [{**backbone(n), 'fgram_model.num_layers': 0} for n in SIZES]
  points += [{**backbone(n), 'fgram_model.num_layers': SIZES[n][1]} for n in SCONE_SIZES]
  return points
