"""The add step in parts: copies of the trained empty index filled elsewhere (one per task, e.g. on a cluster),
then merged in order into one index in RAM, or into inverted lists on disk (faiss's `merge_ondisk`, as
autofaiss and clip-retrieval publish LAION's indexes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402
from faiss.contrib.ondisk import merge_ondisk  # noqa: E402

from rakt.indexes.base import IndexSpecError  # noqa: E402
from rakt.indexes.faiss_ops import prep_vectors, to_gpu  # noqa: E402
from rakt.indexes.helpers import c_stdout_to_stderr  # noqa: E402

log = logging.getLogger("rakt.indexes")

IVFDATA_SUFFIX = ".ivfdata"  # the on-disk inverted lists beside their index file (index-000.ivfdata)


def fill_copy(empty: np.ndarray, batches: Iterable[np.ndarray], normalize: bool,
              each: Callable[[np.ndarray], None] | None = None, first_id: int = 0) -> np.ndarray:
    """One part of the add step: the vector `batches` added in order to a copy of the serialized empty trained
    index (`faiss.serialize_index`); returns the filled copy, serialized. An IVF part holds the global ids
    first_id, first_id + 1, ... (merged as they are; faiss's own id shifting in merge_from_multiple adds each
    part's own size instead of its predecessors'), a flat part positions 0..n-1. Batches stream: only one is in
    memory at a time; `each(vectors)` sees every batch as it was added. On a GPU when faiss-gpu sees one."""
    index = faiss.deserialize_index(empty)
    work = to_gpu(index, ngpu=1) or index
    ivf, next_id = faiss.try_extract_index_ivf(index) is not None, first_id
    for vectors in batches:
        vectors = prep_vectors(vectors, normalize)
        if ivf:
            work.add_with_ids(vectors, np.arange(next_id, next_id + len(vectors), dtype=np.int64))
        else:
            work.add(vectors)
        next_id += len(vectors)
        if each is not None:
            each(vectors)
    return faiss.serialize_index(faiss.index_gpu_to_cpu(work) if work is not index else index)


def merge_parts(empty: faiss.Index, parts: Iterable[np.ndarray]) -> faiss.Index:
    """A copy of `empty` holding the serialized filled parts (fill_copy) in order, so it searches exactly as one
    index filled in that order (IVF: lists appended, ids global already; flat: codes concatenated)."""
    index = copy_index(empty)
    for blob in parts:
        index.merge_from(faiss.deserialize_index(blob), 0)
    return index


def merge_to_disk(empty: faiss.Index, part_files: list[Path], index_file: Path) -> faiss.Index:
    """Merge the filled parts (fill_copy's files, global ids, read memory-mapped) in order into inverted lists on
    disk beside `index_file` (`index_file` with suffix .ivfdata); returns the index, whose lists the caller writes
    with faiss.write_index. Memory stays that of the empty index whatever the parts hold."""
    if faiss.try_extract_index_ivf(empty) is None:
        raise IndexSpecError(f"{type(empty).__name__} has no inverted lists to keep on disk; use an IVF index")
    index = copy_index(empty)
    data = index_file.with_suffix(IVFDATA_SUFFIX)
    data.unlink(missing_ok=True)  # a killed merge's file is rewritten whole
    with c_stdout_to_stderr():
        merge_ondisk(index, [str(p) for p in part_files], str(data), shift_ids=False)
    return index


def copy_index(index: faiss.Index) -> faiss.Index:
    """A copy of the class the parts deserialize to (clone_index gives IndexFlat for IndexFlatIP: unmergeable)."""
    return faiss.deserialize_index(faiss.serialize_index(index))


def check_mergeable(empty: faiss.Index, factory: str) -> None:
    """Raise before any work if parts of this kind of index cannot be merged (e.g. HNSW graphs)."""
    try:
        copy_index(empty).merge_from(copy_index(empty), 0)
    except RuntimeError as e:
        raise IndexSpecError(f"'{factory}' indexes cannot be built in parts ({str(e).strip().splitlines()[-1]}); "
                             f"build it with --engine local, or use flat, ivfpq or another IVF index") from None
