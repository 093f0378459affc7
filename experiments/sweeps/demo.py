"""CPU demo sweep (what `make demo` runs): a baseline and SCONE at three numbers of f-grams S,
three paired seeds each, on one tiny backbone. All points slice one table mined at fgram.size.

  python -m scone_jax.sweeps --sweep=experiments/sweeps/demo.py --root=runs/demo --report

S is scaled to the demo's training budget (300 steps x ~1K tokens, ~0.65 epoch of the
459K-token train split). Each arm trains at the peak learning rate the studies chose on the
validation corpus 'valid.stdlib' (never on the test corpus 'stdlib'; STUDY.md): the
baseline's by `make study` (5e-3 of 2.5e-3 / 5e-3 / 1e-2), SCONE's (1-layer A_f, S = 1024,
this preset's 300 steps) by experiments/sweeps/output_scale.py's raw-output arm (5e-3 of the
same grid). The report's verdicts are per corpus, with paired 95% intervals over the seeds.
"""

BASE_CONFIG = 'experiments/demo.py'
NUM_FGRAMS = (256, 1024, 4096)
SEEDS = (0, 1, 2)
LEARNING_RATES = {'baseline': 5e-3, 'scone': 5e-3}  # Chosen by the studies (STUDY.md).


def get_sweep():
  lr = 'train.learning_rate'
  points = [{'fgram_model.num_layers': 0, lr: LEARNING_RATES['baseline'], 'train.seed': s}
            for s in SEEDS]
  points += [{'fgram.use_size': n, lr: LEARNING_RATES['scone'], 'train.seed': s}
             for n in NUM_FGRAMS for s in SEEDS]
  return points
