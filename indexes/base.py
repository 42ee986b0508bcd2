"""The Index protocol: what retrieval needs from any image index."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores float32 [n, k], ids int64 [n, k]), best first."""
        ...

    def metadata(self, ids: np.ndarray) -> pa.Table:
        """Rows for `ids` in the given order, with at least `id` and one of url / path / (shard, key)."""
        ...

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored (possibly approximate) vectors for `ids`, float32 [n, dim]; used for dedup and leakage checks."""
        ...

    def info(self) -> dict:
        """A JSON-able description: kind, model, dim, metric, size, parts, ..."""
        ...
