"""File names of an index directory (docs/formats.md, section 2), known without importing faiss."""
from __future__ import annotations

from pathlib import Path

INDEX_JSON = "index.json"  # the description, written last
METADATA_DIR = "metadata"  # metadata/part-NNNNN.parquet: row i describes FAISS id i
METADATA_PARTS = "part-*.parquet"


def is_index_dir(path: str | Path) -> bool:
    """A built index directory (with index.json) or a published folder (FAISS parts + metadata, no index.json)."""
    from indexes.published import is_published

    path = Path(path)
    return (path / INDEX_JSON).exists() or is_published(path)
