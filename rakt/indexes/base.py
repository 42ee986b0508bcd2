"""The Index protocol: what retrieval needs from any image index."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa


class IndexSpecError(ValueError):
    """An index that cannot be opened or used as asked; the message names the file and the fix."""


@runtime_checkable
class Index(Protocol):
    """A searchable set of image embeddings whose ids index a metadata table.

    `model` names the embedding model the vectors came from (as in `embeddings.json`), so retrieval can
    refuse queries from another model. Ids are int64 in [0, size); id -1 in search results means "none".
    """

    dim: int
    metric: str  # "ip" (cosine on normalized vectors) or "l2"
    size: int
    model: str

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores float32 [n, k], ids int64 [n, k]), best first.

        `nprobe`: IVF lists to visit (None or 0: the index's default); an index without that knob ignores it.
        """
        ...

    def metadata(self, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Rows for `ids` in the given order, with at least `id` and one of url / path / (shard, key).

        `columns` (None = all) selects the columns to read, in that order.
        """
        ...

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored (possibly approximate) vectors for `ids`, float32 [n, dim]; used for dedup and leakage checks."""
        ...

    def info(self) -> dict:
        """A JSON-able description: kind, model, dim, metric, size, parts, ..."""
        ...

    def identity(self) -> str:
        """A short hash of what the index holds (e.g. of its description file), recorded by retrieve."""
        ...

    def set_backend(self, backend: str) -> None:
        """Choose how to search ("auto", "faiss", "torch"); an index with one way to search ignores it."""
        ...


CORE_MEMBERS = ("dim", "metric", "size", "model", "search", "metadata", "embeddings", "info")
"""What an index must have to be opened; `open_index` supplies the other members' defaults (BasicIndex)."""
