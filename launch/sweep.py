"""Launches a sweep locally or on a TPU pod: the same as `python -m scone_jax.sweeps`.

  python launch/sweep.py --sweep=experiments/sweeps/demo.py --dry_run

Flags and behaviour: scone_jax/sweeps/cli.py. scone_jax must be importable (`make venv`
installs it in editable mode; or run from the repo root with `python -m scone_jax.sweeps`).
"""

from scone_jax import cli
from scone_jax.sweeps import cli as sweeps_cli

if __name__ == '__main__':
  cli.run('sweep', sweeps_cli.main, sweeps_cli.FLAGS)
