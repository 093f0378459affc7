"""python -m scone_jax.train --config=experiments/tiny.py --workdir=W [--config.a.b=v]

  --print_config              print the resolved config (JSON) and exit
  --allow_config_change=K,..  resume although these keys (or sections) changed
  --verbosity=1               keep orbax/jax INFO lines in the log (and tracebacks of user
                              errors, which otherwise print as one line, exit status 2)
"""

import sys

from absl import flags, logging

from scone_jax import cli
from scone_jax import evaluate as evaluate_lib
from scone_jax.train import loop

FLAGS = flags.FlagValues()
_CONFIG = cli.define_config_file(FLAGS)
_WORKDIR = cli.define_workdir(
    FLAGS, 'Run directory (created; resumed if it holds checkpoints).', default='')
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False,
                                  'Print the resolved, validated config as JSON and exit.',
                                  flag_values=FLAGS)
_ALLOW = flags.DEFINE_list(
    'allow_config_change', [],
    'Config keys or sections (e.g. train.steps) that may differ from the run in --workdir '
    'when resuming. Keys that change the run\'s math are refused without it.',
    flag_values=FLAGS)


def main(argv):
  del argv
  cfg = cli.config_from_file(_CONFIG)
  if _PRINT_CONFIG.value:
    print(cfg.to_json())
    return
  if not _WORKDIR.value:
    raise cli.CommandLineError('--workdir is required (the run directory)')
  result = loop.train(cfg, _WORKDIR.value, tuple(_ALLOW.value))
  logging.info('train: %s at step %d (resumed from %s)', result.status, result.step,
               result.resumed_from)
  if result.eval is not None:  # The final eval per corpus, with the fraction it covered.
    for line in evaluate_lib.format_eval(result.eval):
      print(line)
  if result.status == 'preempted':  # Saved, not finished: a scheduler requeues on 75.
    sys.exit(loop.EXIT_PREEMPTED)


if __name__ == '__main__':
  cli.run('train', main, FLAGS)
