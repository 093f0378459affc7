"""Export: A_f over every f-gram -> a zarr3 [S, d] store with a manifest."""

from scone_jax.export.writer import STORE_KIND, write_store, zarr3_spec

__all__ = ['STORE_KIND', 'write_store', 'zarr3_spec']
