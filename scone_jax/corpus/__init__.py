"""Corpus readers (text / blank-line / JSONL globs) and the embedded stdlib-docstring corpus."""

from scone_jax.corpus.embedded import EmbeddedCorpus, build_embedded, open_embedded
from scone_jax.corpus.document import CorpusError, Document
from scone_jax.corpus.readers import (FileCorpus, ReadStats, expand_globs, files_corpus,
                                      parse_named_globs)

__all__ = ['CorpusError', 'Document', 'EmbeddedCorpus', 'FileCorpus', 'ReadStats',
           'build_embedded', 'expand_globs', 'files_corpus', 'open_embedded',
           'parse_named_globs']
