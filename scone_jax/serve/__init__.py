"""Serving: the host-side f-gram embedding store, the KV-cache decoder, accounting."""

from scone_jax.serve.store import EmbeddingStore, GatherStats

__all__ = ['EmbeddingStore', 'GatherStats']
