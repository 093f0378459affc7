"""`python -m scone_jax.sweeps`: see scone_jax/sweeps/cli.py."""

from absl import app

from scone_jax.sweeps import cli

if __name__ == '__main__':
  app.run(cli.main)
