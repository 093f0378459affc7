"""SentencePiece tokenizer (train / load / fingerprint) and memory-mapped token shards."""

from scone_jax.tokenizer.shards import TokenShards, token_dtype, write_shards
from scone_jax.tokenizer.spm import (Tokenizer, install_tokenizer, open_tokenizer,
                                     split_long, train_tokenizer)

__all__ = ['TokenShards', 'Tokenizer', 'install_tokenizer', 'open_tokenizer', 'split_long',
           'token_dtype', 'train_tokenizer', 'write_shards']
