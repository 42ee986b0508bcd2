"""The data contracts between stages (docs/formats.md) as code: file names, schemas, readers and writers.

Stages import the contracts from here, never from each other. The index directory (section 2) is reached only
through the `Index` protocol (indexes/base.py, opened by indexes/registry.py); its file names are re-exported
here for readers of a run directory. The run directory of `rakt run` (section 9) is laid out by pipeline/rundir.py.
Sections follow docs/formats.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import braceexpand
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from indexes.layout import INDEX_JSON, METADATA_DIR  # noqa: F401  (section 2's file names, re-exported)
from pipeline.io import InputError, parquet_rows, read_json, read_parquet, regular_file

# --- 1. embedding set ------------------------------------------------------------------------------

EMBEDDINGS_JSON = "embeddings.json"
EMBEDDING_PARTS = "part-*.parquet"


def embedding_table(ids, labels, splits, vectors: np.ndarray, extra: dict | None = None) -> pa.Table:
    """One partition of an embedding set: id, label, split, embedding (+ locator columns in `extra`)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    cols = {
        "id": pa.array([str(i) for i in ids], pa.string()),
        "label": pa.array([None if lab is None or lab < 0 else int(lab) for lab in labels], pa.int64()),
        "split": pa.array(list(splits), pa.string()),
        "embedding": emb,
    }
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values)
    return pa.table(cols)


def read_embedding_set(path: str | Path, split: str | None = None,
                       columns: list[str] | None = None) -> tuple[dict, pa.Table]:
    """Read an embedding set directory: (embeddings.json metadata, table of all partitions in order)."""
    path = Path(path)
    meta = read_json(path / EMBEDDINGS_JSON, "embedding set metadata (embeddings.json); run `rakt embed` first")
    parts = sorted(path.glob(EMBEDDING_PARTS))
    if not parts:
        raise InputError(f"{path}: no part-*.parquet files; the embedding set is empty or unfinished")
    fix = "rerun `rakt embed` with the same --out: it embeds a damaged partition again"
    table = pa.concat_tables([read_parquet(p, fix, columns) for p in parts])
    if split:
        table = table.filter(pc.equal(table["split"], split))
    return meta, table


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as a float32 [n, dim] array."""
    col = table["embedding"].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), col.type.list_size)


# --- 2. index directory: opened only through indexes.registry.open_index (the Index protocol) ---------
# Its file names, INDEX_JSON and METADATA_DIR, are indexes/layout.py's (imported above).


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
