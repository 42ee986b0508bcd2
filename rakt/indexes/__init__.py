"""Image indexes that retrieval queries: the Index protocol, FAISS indexes and a registry."""
from rakt.indexes.base import Index, IndexSpecError
from rakt.indexes.registry import open_index, register_index

__all__ = ["Index", "IndexSpecError", "open_index", "register_index"]
