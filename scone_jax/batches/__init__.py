"""Batches: token shards -> shuffle -> pack (segment ids) -> f-gram tagging -> batches."""

from scone_jax.batches.packing import Examples, build_rows, first_fit_rows, make_examples
from scone_jax.batches.pipeline import (BOS_ID, STATS_PREFIX, BatchDataset,
                                        make_eval_dataset, make_eval_iterator,
                                        make_train_dataset, make_train_iterator,
                                        offset_slots, split_stats, to_global_arrays)
from scone_jax.batches.tagging import tag_fgrams

__all__ = [
    'BOS_ID', 'STATS_PREFIX', 'BatchDataset', 'Examples', 'build_rows', 'first_fit_rows',
    'make_eval_dataset', 'make_eval_iterator', 'make_examples', 'make_train_dataset',
    'make_train_iterator', 'offset_slots', 'split_stats', 'tag_fgrams', 'to_global_arrays',
]
