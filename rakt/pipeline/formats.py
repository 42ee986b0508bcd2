"""The data contracts between stages (docs/formats.md) as code: file names, schemas, readers and writers.

Stages import the contracts from here, never from each other. The index directory (section 2) is reached only
through the `Index` protocol (rakt/indexes/base.py, opened by rakt/indexes/registry.py); its file names are re-exported
here for readers of a run directory. The run directory of `rakt run` (section 9) is laid out by rakt/rundir.py.
Sections follow docs/formats.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rakt.indexes.layout import INDEX_JSON, METADATA_DIR  # noqa: F401  (section 2's file names, re-exported)
from rakt.pipeline.config import EMBEDDING_DTYPES  # noqa: F401  (re-exported: the contract's dtypes)
from rakt.pipeline.io import (InputError, atomic_path, parquet_rows, read_json, read_parquet, regular_file,
                              write_json, write_parquet)

# --- 1. embedding set ------------------------------------------------------------------------------

EMBEDDINGS_JSON = "embeddings.json"
EMBEDDING_PARTS = "part-*.parquet"
EMBEDDING_ROW_GROUP = 16_384  # rows per parquet row group: a sampled row costs at most this many decoded


def embedding_table(ids, labels, splits, vectors: np.ndarray, extra: dict | None = None,
                    dtype: str = "float32") -> pa.Table:
    """One partition of an embedding set: id, label, split, embedding (float32 or float16) + locator columns."""
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
    vectors = np.ascontiguousarray(vectors, dtype=dtype)
    n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    cols = {
        "id": pa.array([str(i) for i in ids], pa.string()),
        "label": pa.array([None if lab is None or lab < 0 else int(lab) for lab in labels], pa.int64()),
        "split": pa.array(list(splits), pa.string()),
        "embedding": emb,
    }
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values)
    return pa.table(cols)


def write_embedding_part(path: str | Path, table: pa.Table) -> None:
    """Write one part file atomically: row groups of EMBEDDING_ROW_GROUP rows, no dictionary for the vectors."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=EMBEDDING_ROW_GROUP,
                       use_dictionary=[c for c in table.column_names if c != "embedding"])


def read_embedding_set(path: str | Path, split: str | None = None,
                       columns: list[str] | None = None) -> tuple[dict, pa.Table]:
    """Read a whole embedding set directory: (embeddings.json metadata, table of all partitions in order).
    For sets that may not fit in memory (an index's pool), use EmbeddingParts."""
    path = Path(path)
    meta = read_json(path / EMBEDDINGS_JSON, "embedding set metadata (embeddings.json); run `rakt embed` first")
    parts = sorted(path.glob(EMBEDDING_PARTS))
    if not parts:
        raise InputError(f"{path}: no part-*.parquet files; the embedding set is empty or unfinished")
    table = pa.concat_tables([read_parquet(p, _REEMBED, columns) for p in parts])
    if split:
        table = table.filter(pc.equal(table["split"], split))
    return meta, table


def embedding_matrix(data: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The `embedding` column (float32 or float16) as a float32 [n, dim] array."""
    col = data.column("embedding")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    dim = col.type.list_size
    if len(col) == 0:
        return np.zeros((0, dim), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), dim)


_REEMBED = "rerun `rakt embed` with the same --out: it embeds a damaged partition again"


class EmbeddingParts:
    """An embedding set read part by part: never whole in memory. Row r of the set is row r - start of the part
    file holding it (files in name order), as `read_embedding_set` concatenates them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = sorted(self.path.glob(EMBEDDING_PARTS))
        if not self.files:
            raise InputError(f"{self.path}: no part-*.parquet files; the embedding set is empty or unfinished")
        self.footers = [self._footer(f) for f in self.files]
        self.rows = [m.num_rows for m in self.footers]
        self.starts = np.cumsum([0] + self.rows)
        self.n = int(self.starts[-1])
        schema = self.footers[0].schema.to_arrow_schema()
        if "embedding" not in schema.names:
            raise InputError(f"{self.files[0]}: no 'embedding' column; is {self.path} an embedding set?")
        kind = schema.field("embedding").type
        self.dim = kind.list_size
        self.dtype = "float16" if kind.value_type == pa.float16() else "float32"
        self.columns = schema.names
        self.groups_read = 0  # row groups decoded by take(): what a training sample cost

    def __reduce__(self):  # pickled as its path (for Ray workers): the footers are read again there
        return EmbeddingParts, (self.path,)

    def _footer(self, path: Path) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable parquet file ({e}); {_REEMBED}") from None

    def batches(self, columns: list[str] | None = None, batch_rows: int = 65_536,
                files: range | None = None) -> Iterator[pa.RecordBatch]:
        """The rows of `files` (default: all) in order, as record batches of <= `batch_rows` rows."""
        for j in files if files is not None else range(len(self.files)):
            try:
                for batch in pq.ParquetFile(self.files[j]).iter_batches(batch_size=batch_rows, columns=columns):
                    yield batch
                    pa.default_memory_pool().release_unused()
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"{self.files[j]}: not a readable parquet file ({e}); {_REEMBED}") from None

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The set's rows `rows` (sorted, unique) in that order (see pieces)."""
        pieces = list(self.pieces(rows, columns))
        if not pieces:
            return pq.read_schema(self.files[0]).empty_table().select(columns or self.columns)
        return pa.concat_tables(pieces)

    def pieces(self, rows: np.ndarray, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The set's rows `rows` (sorted, unique) in that order, a row group's share at a time, reading only the
        row groups that hold them (counted in `groups_read`); decode buffers go back to the OS after each."""
        rows = np.asarray(rows, np.int64)
        for j in np.unique(np.searchsorted(self.starts, rows, side="right") - 1):
            local = rows[(rows >= self.starts[j]) & (rows < self.starts[j + 1])] - self.starts[j]
            file = pq.ParquetFile(self.files[j])
            group_starts = np.cumsum([0] + [self.footers[j].row_group(g).num_rows
                                            for g in range(self.footers[j].num_row_groups)])
            for g in np.unique(np.searchsorted(group_starts, local, side="right") - 1):
                inside = local[(local >= group_starts[g]) & (local < group_starts[g + 1])] - group_starts[g]
                piece = file.read_row_group(int(g), columns=columns).take(pa.array(inside))
                self.groups_read += 1
                pa.default_memory_pool().release_unused()
                yield piece


# --- 2. index directory: opened only through indexes.registry.open_index (the Index protocol) ---------
# Its file names, INDEX_JSON and METADATA_DIR, are rakt/indexes/layout.py's (imported above).


# --- 3. candidates ---------------------------------------------------------------------------------

CANDIDATES_PARQUET = "candidates.parquet"
CANDIDATES_JSON = "candidates.json"
CANDIDATES_SCHEMA = pa.schema([("query_id", pa.string()), ("query_label", pa.int64()), ("rank", pa.int32()),
                               ("pool_id", pa.int64()), ("score", pa.float32())])
CANDIDATE_COLUMNS = tuple(CANDIDATES_SCHEMA.names)


def read_candidates(path: Path) -> pd.DataFrame:
    """candidates.parquet as a frame with the contract's columns and dtypes; one row per (query, pool image)."""
    if not path.exists():
        raise InputError(f"{path}: candidates not found; run `rakt retrieve ... --out {path.parent}` first")
    table = read_parquet(path, f"delete it and rerun `rakt retrieve ... --out {path.parent}`")
    missing = [c for c in CANDIDATE_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(CANDIDATE_COLUMNS)} "
                         "(rerun `rakt retrieve`)")
    df = table.select(list(CANDIDATE_COLUMNS)).to_pandas()
    df = df.astype({"query_id": str, "query_label": "Int64", "rank": "int64", "pool_id": "int64",
                    "score": "float32"})
    df = df.sort_values(["query_id", "rank", "pool_id"], kind="mergesort")
    return df.drop_duplicates(["query_id", "pool_id"], keep="first").reset_index(drop=True)


# --- 3b. teacher scores of the candidates (`rakt score`, read by `rakt curate --teacher-scores`) ----------

SCORES_PARQUET = "scores.parquet"
SCORES_JSON = "scores.json"
SCORE_COLUMNS = ("pool_id", "pred", "prob")


def read_scores(folder: Path) -> tuple[pd.DataFrame, dict]:
    """scores.parquet (pool_id, pred, prob; one row per scored pool image, indexed by pool_id) and scores.json."""
    path = Path(folder) / SCORES_PARQUET
    if not path.exists():
        raise InputError(f"{path}: teacher scores not found; run `rakt score CANDIDATES --teacher T --out {folder}`")
    table = read_parquet(path, f"delete it and rerun `rakt score ... --out {folder}`")
    missing = [c for c in SCORE_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; rerun `rakt score`")
    meta = read_json(Path(folder) / SCORES_JSON, "teacher scores metadata; rerun `rakt score`")
    frame = table.select(list(SCORE_COLUMNS)).to_pandas().astype({"pool_id": "int64", "pred": "int64",
                                                                  "prob": "float32"})
    return frame.drop_duplicates("pool_id").set_index("pool_id"), meta


# --- 4. transfer manifest (+ removed.parquet) ------------------------------------------------------

MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_JSON = "manifest.json"
REMOVED_PARQUET = "removed.parquet"
LOCATOR_COLUMNS = ("shard", "key", "path", "url", "caption")
REMOVED_SCHEMA = pa.schema([("pool_id", pa.int64()), ("id", pa.string()), ("reason", pa.string()),
                           ("matched_id", pa.string()), ("matched_pool_id", pa.int64()), ("cosine", pa.float32())])


def is_manifest_dir(path: Path) -> bool:
    """Whether `path` holds a transfer manifest (`rakt curate` / `rakt sample` output)."""
    return (Path(path) / MANIFEST_PARQUET).exists()


def read_manifest(path: Path) -> pa.Table:
    """manifest.parquet rows sorted by (pool_id, query_id), stable: the order that fixes the shard split.

    `path` is the manifest.parquet file; a missing file or one without `pool_id` is an InputError.
    """
    if not path.exists():
        raise InputError(f"{path}: transfer manifest not found; run `rakt curate ... --out {path.parent}` first")
    table = read_parquet(path, f"delete {path.parent} and rerun `rakt curate` (or `rakt sample`)")
    if "pool_id" not in table.column_names:
        raise InputError(f"{path}: no 'pool_id' column; is this a transfer manifest from `rakt curate`?")
    order = [(c, "ascending") for c in ("pool_id", "query_id") if c in table.column_names]
    return table.sort_by(order)  # a stable sort


def write_manifest(out: Path, manifest: pa.Table, meta: dict, removed: pa.Table | None = None) -> None:
    """A transfer manifest folder: removed.parquet (when given), manifest.parquet, then manifest.json (its lineage
    and counts), each written atomically."""
    if removed is not None:
        write_parquet(out / REMOVED_PARQUET, removed)
    write_parquet(out / MANIFEST_PARQUET, manifest)
    write_json(out / MANIFEST_JSON, meta)


def manifest_size(path: Path) -> int:
    """Rows of a manifest.parquet, from its footer."""
    return parquet_rows(path, f"delete {path.parent} and rerun `rakt curate` (or `rakt sample`)")


# --- 5. shards (and the pool / target shards stages read) ------------------------------------------

# Image members / file names every stage accepts, in order of preference for a sample with several.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LABELLED_SHARD = "labelled-000000.tar"  # `rakt labelled`: the few-shot draw as one shard (KEY.img, KEY.cls, KEY.json)
_BRACES = re.compile(r"\{[^{}]*\}")


def is_image_name(name: str) -> bool:
    """Whether a file name ends in one of IMAGE_EXTS (case-insensitive)."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS if "." in name else False


def has_brace_pattern(spec: str) -> bool:
    """Whether a shard spec is a brace pattern like 'train-{000000..000009}.tar'."""
    return bool(_BRACES.search(spec))


def expand_shards(spec: str) -> list[str]:
    """The absolute shard paths a brace pattern names, in pattern order (not checked for existence)."""
    return [os.path.abspath(p) for p in braceexpand.braceexpand(spec)]


# --- 5b. a carved task (`rakt carve`): OUT/train/, OUT/test/ (one shard + classes.txt each), OUT/pool/, carve.json

CARVE_JSON = "carve.json"
CARVE_TRAIN = "train/train-000000.tar"  # KEY.jpg (pool bytes), KEY.cls, KEY.json ({"class", "split", "pool_shard", ...})
CARVE_TEST = "test/test-000000.tar"
CARVE_POOL = "pool"                     # pool-NNNNNN.tar: input shard N without the carved samples, members as they were


# --- classes file ----------------------------------------------------------------------------------

CLASSES_TXT = "classes.txt"


def read_classes(path: Path) -> list[str]:
    """Class names, one per line (blank lines skipped): the one reader of class files. An unreadable or empty file,
    or a name given twice (labels and text queries would collide), is an InputError."""
    regular_file(path, "classes file")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"classes file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    names, first = [], {}
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        if name in first:
            raise InputError(f"classes file {path}: class '{name}' appears twice (lines {first[name]} and {lineno}); "
                             "class names must be unique: remove or rename one")
        first[name] = lineno
        names.append(name)
    if not names:
        raise InputError(f"classes file {path}: empty; write one class name per line")
    return names


def classes_beside(path: str | Path) -> list[str] | None:
    """The classes.txt in the folder of `path` (a shard or manifest), if there is one."""
    txt = Path(path).parent / CLASSES_TXT
    return read_classes(txt) if txt.is_file() else None
