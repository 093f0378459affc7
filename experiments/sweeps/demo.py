"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
two seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --root=runs/demo --report

S is scaled to the demo's training budget (300 steps x ~1K tokens, ~0.6 epoch of the
520K-token train split): the 4096th f-gram occurs 30 times in that split, so training
meets each f-gram ~17 times. At S=16384 (cutoff count 11, ~6 sightings) perplexity rose
with S in our runs (1024: 293, 4096: 302, 16384: 357; baseline 322): A_f had not learned
the rare f-grams. The paper's regime has billions of tokens per table.
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (256, 1024, 4096)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
