"""Image indexes that retrieval queries: the Index protocol, FAISS indexes and a registry."""
from indexes.base import Index, IndexSpecError
from indexes.registry import open_index, register_index

__all__ = ["Index", "IndexSpecError", "open_index", "register_index"]
