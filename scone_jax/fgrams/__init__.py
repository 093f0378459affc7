"""Exact f-gram mining (local out-of-core numpy; Apache Beam in `beam.py`), the ranked
FgramTable, and longest-suffix matchers."""

from scone_jax.fgrams.match import IncrementalMatcher
from scone_jax.fgrams.mine import mine_fgrams
from scone_jax.fgrams.table import FgramTable

__all__ = ['FgramTable', 'IncrementalMatcher', 'mine_fgrams']
