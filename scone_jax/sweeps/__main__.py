"""`python -m scone_jax.sweeps`: see scone_jax/sweeps/cli.py."""

from scone_jax import cli
from scone_jax.sweeps import cli as sweeps_cli

if __name__ == '__main__':
  cli.run('sweeps', sweeps_cli.main, sweeps_cli.FLAGS)
