"""The nouns of lookalike in one place: table.py (DatasetTable), embeddings.py (Embeddings), results.py
(RetrievalResults), protocol.py (which rows query, which form the gallery, what is never a match), errors.py and
atomic.py. Every other package imports these; core imports nothing else of lookalike, and this file imports nothing, so
`from lookalike.core.errors import LookalikeError` stays light."""
