"""The train stage: mesh, optimizer, jitted train step, loop, checkpoints, metrics.

`python -m scone_jax.train --config=experiments/tiny.py --workdir=W` runs `loop.train`.
"""
