"""Hugging Face checkpoints in: config.json -> our ModelConfig (config_map.py), safetensors
read by header + memory map (safetensors.py), each parameter built as a sharded jax.Array
from the slices its devices hold (load.py)."""
