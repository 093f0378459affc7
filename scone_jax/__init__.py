"""scone_jax: scaling studies of SCONE embedding layers (Yu et al., arXiv 2502.01637) in JAX.

Pipeline stages, one package each, in data-flow order:
  corpus -> tokenizer -> fgrams -> batches -> model / train -> export -> serve
"""

__version__ = '0.1.0'
