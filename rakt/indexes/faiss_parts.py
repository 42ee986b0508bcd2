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

from rakt.indexes.base import IndexSpecError  # noqa: E402
from rakt.indexes.faiss_ops import on_disk_lists, prep_vectors, to_gpu  # noqa: E402
from rakt.indexes.helpers import c_stdout_to_stderr, releasing_mapped, trim_heap  # noqa: E402

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


def merge_parts(empty: faiss.Index, part_files: list[Path]) -> faiss.Index:
    """A copy of `empty` holding the filled parts (fill_copy's files) in order, so it searches exactly as one index
    filled in that order (IVF: lists appended, ids global already; flat: codes concatenated). One part is in memory
    at a time beside the merged index, whose IVF lists are allocated once at their final size (reserve_lists):
    the index holds its codes, not the ~1.4x of lists grown by doubling as vectors are added one batch at a time."""
    trim_heap()  # what the add tasks freed goes back first
    index = copy_index(empty)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and len(part_files) > 1:
        reserve_lists(ivf, part_files)
    for path in part_files:
        index.merge_from(faiss.read_index(str(path)), 0)
    return index


def reserve_lists(ivf: faiss.IndexIVF, part_files: list[Path]) -> None:
    """Give each (empty) in-RAM inverted list of `ivf` the capacity of its size once the parts are appended (their
    list sizes summed, each part read with its lists left on disk): appending then never regrows a list."""
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists) or lists.compute_ntotal():
        return
    totals = np.zeros(ivf.nlist, np.int64)
    for path in part_files:
        part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        sizes = faiss.extract_index_ivf(part).invlists
        totals += [sizes.list_size(i) for i in range(ivf.nlist)]
        del part, sizes
    for i, total in enumerate(totals.tolist()):
        lists.resize(i, total)  # an empty std::vector grown to `total` gets exactly that capacity, kept when
        lists.resize(i, 0)      # shrunk back


def merge_to_disk(empty: faiss.Index, part_files: list[Path], index_file: Path) -> faiss.Index:
    """Merge the filled parts (fill_copy's files, global ids, read memory-mapped) in order into inverted lists on
    disk beside `index_file` (`index_file` with suffix .ivfdata); returns the index, whose lists the caller writes
    with faiss.write_index. Memory stays that of the empty index whatever the parts hold: the pages of the mapped
    parts read and of the lists written leave the process as the merge goes (release_mapped).

    faiss's merge_ondisk (faiss.contrib.ondisk), whose parts' lists stay mapped for the life of the process, plus
    their pages released while merge_from_multiple runs (it copies at memory speed: every 50 ms) and after."""
    ivf = faiss.try_extract_index_ivf(empty)
    if ivf is None:
        raise IndexSpecError(f"{type(empty).__name__} has no inverted lists to keep on disk; use an IVF index")
    index = copy_index(empty)
    ivf = faiss.extract_index_ivf(index)
    data = index_file.with_suffix(IVFDATA_SUFFIX)
    data.unlink(missing_ok=True)  # a killed merge's file is rewritten whole
    lists = faiss.InvertedListsPtrVector()
    for path in part_files:  # as merge_ondisk: each part's index (its quantizer: ~36 MB at 16k lists) is freed at
        part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)  # once, its mapped lists kept
        part_ivf = faiss.extract_index_ivf(part)
        part_ivf.own_invlists = False
        lists.push_back(part_ivf.invlists)
        del part, part_ivf
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
    with c_stdout_to_stderr(), releasing_mapped([data, *part_files], every=0.05):
        ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()
    on_disk_lists(index)  # no prefetch threads when the build's recall check searches it
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
