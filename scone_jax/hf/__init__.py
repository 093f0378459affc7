"""Hugging Face checkpoints in and out: config.json <-> our ModelConfig (config_map.py),
safetensors read by header + memory map and written whole-file atomically (safetensors.py),
each parameter loaded as a sharded jax.Array from the slices its devices hold (load.py),
and a backbone written back as a checkpoint (export.py, `python -m scone_jax.export_hf`)."""
