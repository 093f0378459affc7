"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
two seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --root=runs/demo --report

S is scaled to the demo's training budget (300 steps x ~1K tokens, ~0.6 epoch of the
520K-token train split): the 4096th f-gram occurs 30 times in that split, so training
meets each f-gram ~17 times. Measured (`make demo`, 2 CPU cores, 2m56s, mean of 2 seeds, peak
lr 5e-3 = the baseline's best): baseline 285.2; SCONE S=256: 275.7, 1024: 274.0, 4096: 275.8.
SCONE is 3-4% below the baseline at every S, within about one seed-to-seed spread, and
perplexity does not keep falling as S grows at this budget: A_f has not learned the rarer
f-grams in 300 steps. (At lr 1e-2, where the baseline fits worse, the gap was ~15%.) The
paper's S trend is at billions of tokens per table.
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (256, 1024, 4096)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
