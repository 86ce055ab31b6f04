"""carryover: upgrade the embedding model behind an image-retrieval gallery on Ray."""

__version__ = "0.1.0"
