"""python -m scone_jax.export --workdir=W [--config.export.dtype=bfloat16]

Runs A_f of W's latest checkpoint over every f-gram of the run's table and writes the
zarr3 store W/export (resumable: rerun after a kill to continue).

On several processes, start one per host with --config.distributed.* (and, for another
device count than training's, --config.mesh.*): the processes split the store's shards
and process 0 publishes it (export/export.py).
"""

from absl import flags

from scone_jax import cli
from scone_jax import config as config_lib
from scone_jax.export.export import export_store
from scone_jax import restore

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_CONFIG = cli.define_config_overrides(FLAGS)
# Where the export runs, which the trained weights do not depend on.
_PLACEMENT = ('distributed', 'mesh')


def main(argv):
  del argv
  values = cli.overrides(_CONFIG, restore.SERVING_SECTIONS + _PLACEMENT)
  placement = {k: v for k, v in values.items() if k.split('.')[0] in _PLACEMENT}
  cfg = restore.run_config(_WORKDIR.value,
                           {k: v for k, v in values.items() if k not in placement})
  print(export_store(config_lib.replace(cfg, **placement), _WORKDIR.value))


if __name__ == '__main__':
  cli.run('export', main, FLAGS)
