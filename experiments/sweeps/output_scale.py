"""A_f's output scale (fgram_model.output_scale), measured at matched tuned lrs.

  python -m scone_jax.sweeps --sweep=experiments/sweeps/output_scale.py --root=runs \\
      --parallel=2 --report

After training, A_f's raw outputs have norms many times the token embeddings' (issue 11),
so at matched positions the backbone's position signal is a small part of its input. Arms
(SCONE, S = 1024, 1-layer A_f, experiments/demo.py): today's raw output (the reference),
a learned per-channel gain, and an RMS norm with a per-channel gain started at the token
embeddings' init scale. Each arm's lr is chosen on 'valid.stdlib'; 3 paired seeds at the
chosen lrs. 'scalar' (one learned gain) is implemented but not in this grid: it is the
channel gain with tied channels. STUDY.md records the table; the default stays 'none'
unless an option wins beyond the seed spread.
"""

BASE_CONFIG = 'experiments/demo.py'
LEARNING_RATES = (2.5e-3, 5e-3, 1e-2)
SEEDS = (0, 1, 2)


def get_study():
  common = {'fgram.use_size': 1024}
  arms = {f'output_scale={kind}': {**common, 'fgram_model.output_scale': kind}
          for kind in ('none', 'rmsnorm_gain', 'channel')}
  return {'arms': arms, 'learning_rates': LEARNING_RATES, 'seeds': SEEDS,
          'baseline': 'output_scale=none'}
