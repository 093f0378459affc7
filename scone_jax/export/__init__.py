"""Export: A_f over every f-gram -> a zarr3 [S, d] store with a manifest."""

from scone_jax.export.export import (EXPORT_DIR, export_embeddings, export_hashed,
                                     export_store, hashed_meta, store_meta)
from scone_jax.export.writer import STORE_KIND, write_store, zarr3_spec

__all__ = ['EXPORT_DIR', 'STORE_KIND', 'export_embeddings', 'export_hashed', 'export_store',
           'hashed_meta', 'store_meta',
           'write_store', 'zarr3_spec']
