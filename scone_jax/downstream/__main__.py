"""python -m scone_jax.downstream --workdir=W --tasks=... --task_dir=D [--path=train|store]

(scone_jax/downstream/runner.py documents the flags and W/downstream.json.)
"""

import sys

from absl import app, flags

from scone_jax import logs
from scone_jax.downstream import presets, runner
from scone_jax.errors import UserError


def main(argv):
  del argv
  logs.quiet_third_party_logs()
  f = flags.FLAGS
  try:
    runner.run(f.workdir, f.tasks, f.task_dir, f.path, f.preset, f.rows_per_batch,
               truncate=f.truncate, step=f.step)
  except UserError as e:  # The input's fault: one line naming it and the fix.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training run directory (local or gs://).',
                      required=True)
  flags.DEFINE_list('tasks', None, f'Tasks to score, from {list(presets.TASKS)}.',
                    required=True)
  flags.DEFINE_string('task_dir', None, 'Directory of the task files <task>.jsonl '
                      '(and <task>.dev.jsonl for few-shot presets).', required=True)
  flags.DEFINE_enum('path', 'train', list(runner.PATHS),
                    'train: the training forward (A_f on the fly); store: the exported store.')
  flags.DEFINE_enum('preset', 'olmo', sorted(presets.PRESETS), 'Task formulation and metric.')
  flags.DEFINE_integer('rows_per_batch', 0, 'Rows per scored batch (0: max(8, data '
                       'parallel devices)).')
  flags.DEFINE_bool('truncate', True, 'Cut the oldest context tokens of a request longer '
                    "than the model's window (counted); --notruncate makes it an error.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  app.run(main)
