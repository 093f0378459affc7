"""Sweeps: a sweep file's points as validated configs (spec), run locally or on TPU pods
(backends); `python -m scone_jax.sweeps` (or launch/sweep.py) is the command line."""
