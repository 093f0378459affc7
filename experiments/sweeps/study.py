"""`make study`: does SCONE beat a TUNED baseline on the embedded corpus, and how does it
scale with the number of f-grams S and the depth of A_f? 3 seeds per arm, paired.

  python -m scone_jax.sweeps --sweep=experiments/sweeps/study.py --root=runs --parallel=2 --report

Arms: the baseline (no A_f); SCONE with a 1-layer A_f at S = 128, 512, 1024, 2048 (16x);
SCONE with a 2-layer A_f at S = 2048 (the A_f depth comparison). Each arm's peak learning
rate is chosen from LEARNING_RATES on the validation corpus 'valid.stdlib' (5% of stdlib
modules, disjoint from train and from the test corpus 'stdlib'), by the mean validation
loss of TUNE_SEEDS (two: at this size the lr curve is not smooth and one seed's best cell
can be luck); then every arm trains seeds 0, 1, 2 at its chosen lr (the tuning runs at
the chosen lr are reused), the same data order per seed across arms. The backbone is experiments/demo.py:study (600 steps, ~1.3 epochs, so
the least frequent f-gram at S = 2048 is seen ~50 times). REPORT.md holds the grid, the
chosen lrs, per-corpus means with 95% t-intervals and the paired SCONE-minus-baseline
differences; STUDY.md records a run of it.

Any corpus: the arms, grid and verdict logic do not depend on the data. On your own files
(a validation set is required: lrs are never chosen on the test set):

  python -m scone_jax.sweeps --sweep=experiments/sweeps/study.py --root=runs/study_prose \\
      --parallel=2 --report --set=data.source=files \\
      --set=data.train_files='/d/train/*.txt' --set=data.valid_files='prose=/d/valid/*.txt' \\
      --set=data.eval_files='prose=/d/test/*.txt' --set=data.format=lines

(S values must not exceed the mined table, fgram.size = 16384 in the preset.)
"""

BASE_CONFIG = 'experiments/demo.py:study'
NUM_FGRAMS = (128, 512, 1024, 2048)
LEARNING_RATES = (1.25e-3, 2.5e-3, 5e-3, 1e-2)
SEEDS = (0, 1, 2)
TUNE_SEEDS = SEEDS[:2]


def get_study():
  # Arms run in this order (each arm's seeds right after its grid): the baseline and the
  # ends of the S range first, so a run cut short still answers the main questions.
  s = {n: {'fgram.use_size': n} for n in NUM_FGRAMS}
  arms = {'baseline': {'fgram_model.num_layers': 0},
          f'S={NUM_FGRAMS[-1]}': s[NUM_FGRAMS[-1]],
          f'S={NUM_FGRAMS[0]}': s[NUM_FGRAMS[0]],
          f'S={NUM_FGRAMS[-1]}, A_f 2L': {**s[NUM_FGRAMS[-1]], 'fgram_model.num_layers': 2}}
  arms.update({f'S={n}': s[n] for n in NUM_FGRAMS[1:-1]})
  return {'arms': arms, 'learning_rates': LEARNING_RATES, 'seeds': SEEDS,
          'tune_seeds': TUNE_SEEDS, 'baseline': 'baseline'}
