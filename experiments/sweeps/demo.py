"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
two seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --root=runs/demo --report

S is scaled to the demo's training budget (300 steps x ~1K tokens, ~0.6 epoch of the
520K-token train split): the 4096th f-gram occurs 30 times in that split, so training
meets each f-gram ~17 times. Measured (2 shared CPU cores, mean of 2 seeds): baseline 322;
SCONE S=256: 273, 1024: 293, 4096: 302, (16384: 357). SCONE beats the baseline at small
S, but perplexity RISES with S here: A_f has not learned the rarer f-grams in 300 steps.
The paper's S trend is at billions of tokens per table.
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (256, 1024, 4096)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
