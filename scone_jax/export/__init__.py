"""Export: A_f over every f-gram -> a zarr3 [S, d] store with a manifest."""

from scone_jax.export.export import export_embeddings, export_hashed, export_store
from scone_jax.export.format import (EXPORT_DIR, STORE_KIND, hashed_meta, store_meta,
                                     zarr3_spec)
from scone_jax.export.writer import write_store

__all__ = ['EXPORT_DIR', 'STORE_KIND', 'export_embeddings', 'export_hashed', 'export_store',
           'hashed_meta', 'store_meta',
           'write_store', 'zarr3_spec']
