"""python -m scone_jax.train --config=experiments/tiny.py --workdir=W [--config.a.b=v]

  --print_config              print the resolved config (JSON) and exit
  --allow_config_change=K,..  resume although these keys (or sections) changed
  --verbosity=1               keep orbax/jax INFO lines in the log
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from scone_jax import config as config_lib
from scone_jax import evaluate as evaluate_lib
from scone_jax import logs, runlock
from scone_jax.train import checkpoint as checkpoint_lib
from scone_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it '
                               'holds checkpoints).')
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False,
                                  'Print the resolved, validated config as JSON and exit.')
_ALLOW = flags.DEFINE_list(
    'allow_config_change', [],
    'Config keys or sections (e.g. train.steps) that may differ from the run in --workdir '
    'when resuming. Keys that change the run\'s math are refused without it.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config=experiments/<preset>.py is required')
  logs.quiet_third_party_logs()
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
    if _PRINT_CONFIG.value:
      print(cfg.to_json())
      return
    if not _WORKDIR.value:
      raise app.UsageError('--workdir is required (the run directory)')
    result = loop.train(cfg, _WORKDIR.value, tuple(_ALLOW.value))
  except (config_lib.ConfigError, runlock.RunLockedError,
          checkpoint_lib.CheckpointSaveError) as e:
    # Errors whose message says what is wrong and the fix: no traceback around it.
    sys.exit(f'train: {type(e).__name__}: {e}')
  logging.info('train: %s at step %d (resumed from %s)', result.status, result.step,
               result.resumed_from)
  if result.eval is not None:  # The final eval per corpus, with the fraction it covered.
    for line in evaluate_lib.format_eval(result.eval):
      print(line)
  if result.status == 'preempted':  # Saved, not finished: a scheduler requeues on 75.
    sys.exit(loop.EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main)
