"""lookalike: train embeddings, search a gallery, re-rank the top results, measure the ranking."""

__version__ = "0.1.0"
