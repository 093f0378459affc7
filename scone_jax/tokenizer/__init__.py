"""Tokenizers (sentencepiece: train / load; Hugging Face tokenizer.json: load) and token shards."""

from scone_jax.tokenizer.hf import HFTokenizer
from scone_jax.tokenizer.shards import TokenShards, token_dtype, write_shards
from scone_jax.tokenizer.spm import (Tokenizer, install_tokenizer, open_tokenizer,
                                     split_long, train_tokenizer)

__all__ = ['HFTokenizer', 'TokenShards', 'Tokenizer', 'install_tokenizer', 'open_tokenizer',
           'split_long', 'token_dtype', 'train_tokenizer', 'write_shards']
