"""python -m scone_jax.export --workdir=W [--config.export.dtype=bfloat16]

Runs A_f of W's latest checkpoint over every f-gram of the run's table and writes the
zarr3 store W/export (resumable: rerun after a kill to continue).

On several processes, start one per host with --config.distributed.* (and, for another
device count than training's, --config.mesh.*): the processes split the store's shards
and process 0 publishes it (export/export.py).
"""

from absl import flags

from scone_jax import cli
from scone_jax.export.export import export_store
from scone_jax import restore

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_CONFIG = cli.define_config_overrides(FLAGS)


def main(argv):
  del argv
  values = cli.overrides(_CONFIG, restore.SERVING_SECTIONS + restore.PLACEMENT_SECTIONS)
  print(export_store(restore.run_config(_WORKDIR.value, values), _WORKDIR.value))


if __name__ == '__main__':
  cli.run('export', main, FLAGS)
