"""python -m scone_jax.train --config=experiments/tiny.py --workdir=W [--config.a.b=v]"""

from absl import app, flags, logging
from ml_collections import config_flags

from scone_jax import config as config_lib
from scone_jax import evaluate
from scone_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it '
                               'holds checkpoints).', required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config=experiments/<preset>.py is required')
  cfg = config_lib.from_configdict(_CONFIG.value)
  result = loop.train(cfg, _WORKDIR.value)
  logging.info('train: %s at step %d (resumed from %s)', result.status, result.step,
               result.resumed_from)
  if result.eval:  # The final eval per corpus, with the fraction of each set it covered.
    print('\n'.join(evaluate.summary_lines(result.eval)))


if __name__ == '__main__':
  app.run(main)
