"""BasicIndex: an index with only the core members (rakt/indexes/base.py CORE_MEMBERS) given the rest's defaults.

Third-party indexes written before the protocol grew `nprobe`, `columns`, `identity` and `set_backend` keep
working: `open_index` wraps them in this adapter instead of refusing them.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pyarrow as pa

from rakt.indexes.helpers import json_hash

log = logging.getLogger("rakt.indexes")


class BasicIndex:
    """Delegates to `inner`; search passes nprobe only where it is taken, metadata selects columns afterwards."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self._takes_nprobe = "nprobe" in inspect.signature(inner.search).parameters
        self._takes_columns = "columns" in inspect.signature(inner.metadata).parameters
        self._warned = False

    def __getattr__(self, name: str):  # dim, metric, size, model and anything else the index offers
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if nprobe and self._takes_nprobe:
            return self.inner.search(queries, k, nprobe=nprobe)
        if nprobe and not self._warned:
            log.warning("retrieve: %s ignores --nprobe", self.name)
            self._warned = True
        return self.inner.search(queries, k)

    def metadata(self, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        if self._takes_columns:
            return self.inner.metadata(ids, columns=columns)
        table = self.inner.metadata(ids)
        return table if columns is None else table.select(columns)

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        return self.inner.embeddings(ids)

    def info(self) -> dict:
        return self.inner.info()

    def identity(self) -> str:
        return json_hash(self.info())

    def set_backend(self, backend: str) -> None:
        if hasattr(self.inner, "set_backend"):
            self.inner.set_backend(backend)
        elif backend != "auto":
            log.debug("retrieve: %s has no search backends; --backend %s ignored", self.name, backend)

    def __repr__(self) -> str:
        return f"BasicIndex({self.inner!r})"
