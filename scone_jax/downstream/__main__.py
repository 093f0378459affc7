"""python -m scone_jax.downstream --workdir=W --tasks=... --task_dir=D [--path=train|store]
    [--config.distributed.mode=explicit --config.distributed.num_processes=P ...]

(scone_jax/downstream/runner.py documents the flags and W/downstream.json.)
"""

from absl import flags

from scone_jax import cli
from scone_jax.downstream import presets, runner

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory (local or gs://).')
_TASKS = flags.DEFINE_list('tasks', None, f'Tasks to score, from {list(presets.TASKS)}.',
                           required=True, flag_values=FLAGS)
_TASK_DIR = flags.DEFINE_string('task_dir', None, 'Directory of the task files <task>.jsonl '
                                '(and <task>.dev.jsonl for few-shot presets).', required=True,
                                flag_values=FLAGS)
_PATH = flags.DEFINE_enum('path', 'train', list(runner.PATHS), 'train: the training forward '
                          '(A_f on the fly); store: the exported store.', flag_values=FLAGS)
_PRESET = flags.DEFINE_enum('preset', 'olmo', sorted(presets.PRESETS),
                            'Task formulation and metric.', flag_values=FLAGS)
_ROWS = flags.DEFINE_integer('rows_per_batch', 0, 'Rows per scored batch (0: max(8, data '
                             'parallel devices)).', flag_values=FLAGS)
_TRUNCATE = flags.DEFINE_bool('truncate', True, 'Cut the oldest context tokens of a request '
                              "longer than the model's window (counted); --notruncate makes "
                              'it an error.', flag_values=FLAGS)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                             flag_values=FLAGS)
# Only --config.distributed.* (scoring on more processes than, or other processes than,
# the run trained on); the rest of W/config.json is fixed.
_CONFIG = cli.define_config_overrides(FLAGS)


def main(argv):
  del argv
  runner.run(_WORKDIR.value, _TASKS.value, _TASK_DIR.value, _PATH.value, _PRESET.value,
             _ROWS.value, truncate=_TRUNCATE.value, step=_STEP.value,
             overrides=cli.overrides(_CONFIG, ('distributed',)))


if __name__ == '__main__':
  cli.run('downstream', main, FLAGS)
