"""Perplexity vs number of f-grams S (paper: WebText, GPT-2 419M + A_f at 1x depth).

  python launch/sweep.py --sweep=experiments/sweeps/num_fgrams.py --dry_run
  python launch/sweep.py --sweep=experiments/sweeps/num_fgrams.py --backend=tpu \\
      --tpu_name=NAME --zone=ZONE --root=gs://BUCKET/runs --repo=GIT_URL --report

One table is mined at the largest S (fgram.size); every point trains on a prefix of it
(fgram.use_size), and all points share one artifacts dir, so mining happens once. S=0 is
the plain backbone (fgram_model.num_layers=0).
"""

BASE_CONFIG = 'experiments/gpt2.py:419m,af=1'
LARGEST = 100_000_000
NUM_FGRAMS = (2**19, 2**20, 2**21, 2**22, 10_000_000, 20_000_000, LARGEST)


def get_sweep():
  common = {'fgram.size': LARGEST}
  points = [{**common, 'fgram_model.num_layers': 0}]
  points += [{**common, 'fgram.use_size': s} for s in NUM_FGRAMS]
  return points
