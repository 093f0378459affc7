"""The competing ways to scale input embeddings, in one study (CPU scale, embedded corpus).

  make compare   # = python -m scone_jax.sweeps --sweep=experiments/sweeps/compare.py \
                 #       --root=runs --parallel=2 --report

Arms, all on the study backbone (experiments/demo.py:study: 600 steps of the same batches,
so every arm sees the SAME training tokens: the comparison is at matched tokens, not matched
training FLOPs; the report's accounting columns give each arm's training FLOPs):
  baseline          the backbone alone (token embeddings T)
  A_f replace       SCONE as in the paper: a 1-layer A_f, S = 2048 f-grams, e replaces T(x_i)
  A_f add           the same A_f, x_i = T(x_i) + e
  A_f gate          the same A_f, x_i = T(x_i) + sigmoid(g) * (e - T(x_i)), g learned per channel
  table             a directly trained [S, d] table on the same 2048 f-gram keys (no A_f)
  hashed            Over-Encoding-style hashed 2- and 3-gram tables, 1024 rows per order
                    (2048 rows: the same offloaded rows as S = 2048)
At inference every arm's extra embeddings sit in the host store and the decode step keeps
the baseline's FLOPs (add/gate/hashed: a stated elementwise extra per token).

Each arm's lr is chosen from LEARNING_RATES on 'valid.stdlib' (never on the test corpus);
then seeds 0, 1, 2 at the chosen lr, paired across arms. REPORT.md ranks the arms per test
corpus with paired intervals (scone_jax/sweeps/analysis.ranking_rows); STUDY.md records a
run of it. Any corpus: `--set data.*` exactly as in experiments/sweeps/study.py.
"""

BASE_CONFIG = 'experiments/demo.py:study'
NUM_FGRAMS = 2048
LEARNING_RATES = (1.25e-3, 2.5e-3, 5e-3, 1e-2)
SEEDS = (0, 1, 2)


def get_study():
  s = {'fgram.use_size': NUM_FGRAMS}
  no_af = {'fgram_model.num_layers': 0}
  arms = {
      'baseline': dict(no_af),
      'A_f replace': dict(s),
      'table': {**s, **no_af, 'fgram_model.kind': 'table'},
      'hashed': {**no_af, 'fgram_model.kind': 'hashed',
                 'fgram_model.hash_max_n': 3, 'fgram_model.hash_buckets': NUM_FGRAMS // 2},
      'A_f add': {**s, 'fgram_model.combine': 'add'},
      'A_f gate': {**s, 'fgram_model.combine': 'gate'},
  }
  return {'arms': arms, 'learning_rates': LEARNING_RATES, 'seeds': SEEDS,
          'tune_seeds': SEEDS[:1], 'baseline': 'baseline'}
