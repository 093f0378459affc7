"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
two seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --root=runs/demo --report
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (1024, 4096, 16384)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
