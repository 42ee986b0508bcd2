"""File names of an index directory (docs/formats.md, section 2), known without importing faiss."""
from __future__ import annotations

INDEX_JSON = "index.json"  # the description, written last
METADATA_DIR = "metadata"  # metadata/part-NNNNN.parquet: row i describes FAISS id i
METADATA_PARTS = "part-*.parquet"
