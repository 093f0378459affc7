"""Serving: the host-side f-gram embedding store, its lookups, the KV-cache decoder,
accounting."""

from scone_jax.serve.accounting import Accounting, account
from scone_jax.serve.decode import Decoder, Generation
from scone_jax.serve.lookup import Lookup
from scone_jax.serve.sampling import Sampling, sample
from scone_jax.serve.store import EmbeddingStore, GatherStats

__all__ = ['Accounting', 'Decoder', 'EmbeddingStore', 'GatherStats', 'Generation',
           'Lookup', 'Sampling', 'account', 'sample']
