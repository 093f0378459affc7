"""python -m scone_jax.export --workdir=W [--config.export.dtype=bfloat16]

Runs A_f of W's latest checkpoint over every f-gram of the run's table and writes the
zarr3 store W/export (resumable: rerun after a kill to continue).
"""

from absl import app, flags
from ml_collections import config_flags

from scone_jax import config as config_lib
from scone_jax import logs
from scone_jax.export.export import export_store
from scone_jax import restore

flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_CONFIG = config_flags.DEFINE_config_dict('config', config_lib.base_config(),
                                          lock_config=True)


def main(argv):
  del argv
  logs.quiet_third_party_logs()
  cfg = restore.run_config(flags.FLAGS.workdir,
                           config_flags.get_override_values(flags.FLAGS['config']))
  print(export_store(cfg, flags.FLAGS.workdir))


if __name__ == '__main__':
  app.run(main)
