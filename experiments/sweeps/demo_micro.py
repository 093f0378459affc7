"""The demo sweep at micro size (a few steps per point): the end-to-end test of `make demo`.

  python -m scone_jax.demo --workdir=runs/demo_micro --sweep=experiments/sweeps/demo_micro.py
"""

BASE_CONFIG = 'experiments/demo.py:micro'
NUM_FGRAMS = (64, 128, 256)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
