"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
two seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --root=runs/demo --report

S is scaled to the demo's training budget (300 steps x ~1K tokens, ~0.6 epoch of the
520K-token train split): the 4096th f-gram occurs 30 times in that split, so training
meets each f-gram ~17 times. Measured (`make demo`, 2 CPU cores, 3m18s, mean of 2 seeds,
with A_f's defaults final_norm=none and init=identity): baseline 322.5; SCONE S=256: 277.1,
1024: 274.5, 4096: 282.8. SCONE beats the baseline by ~15% at every S, but perplexity does
not keep falling as S grows at this budget: A_f has not learned the rarer f-grams in 300
steps. (Before those defaults, with a final LayerNorm on A_f: 273 / 293 / 302.) The paper's S
trend is at billions of tokens per table.
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (256, 1024, 4096)
SEEDS = (0, 1)


def get_sweep():
  points = [{'fgram_model.num_layers': 0, 'train.seed': s} for s in SEEDS]
  points += [{'fgram.use_size': n, 'train.seed': s} for n in NUM_FGRAMS for s in SEEDS]
  return points
