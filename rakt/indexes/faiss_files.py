"""An index directory on disk -> its validated description and FAISS parts (memory-mapped where faiss can).

Reads `index.json` (or synthesizes it for a published folder, rakt/indexes/published.py), every part it names, and
checks dim, metric, count and the metadata row count against each other. Searching is rakt/indexes/faiss_index.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402

from rakt.indexes.base import IndexSpecError  # noqa: E402
from rakt.indexes.helpers import c_stdout_to_stderr  # noqa: E402
from rakt.indexes.faiss_ops import METRICS, ivf_of  # noqa: E402
from rakt.indexes.layout import INDEX_JSON, METADATA_DIR, METADATA_PARTS  # noqa: E402
from rakt.indexes.published import describe_published, is_published, split_spec  # noqa: E402

log = logging.getLogger("rakt.indexes")


@dataclass
class IndexFiles:
    """What an index directory holds once read: its description, FAISS parts and metadata files."""
    path: Path
    info: dict
    parts: list
    mapped: bool
    meta_files: list[Path]


def read_index_dir(path: str | Path, mmap: bool = True, model: str | None = None) -> IndexFiles:
    """Read and validate an index directory (index.json, every part, metadata row count), or a published folder
    (rakt/indexes/published.py) whose embedding model `model` (or the spec's ?model=) declares."""
    path, options = split_spec(str(path))
    path = Path(path)
    jpath = path / INDEX_JSON
    fix = f"build one with `rakt index build POOL --out {path}`"
    if not path.is_dir():
        raise IndexSpecError(f"{path}: no such index directory; {fix}")
    model = model or options.get("model")
    if is_published(path):
        info, meta_files = describe_published(path, model)
        return _read_described(path, info, f"{path} (published index)", meta_files, mmap)
    if not jpath.exists():
        raise IndexSpecError(f"{jpath} not found: {path} is not an index directory or its build did not "
                             f"finish; {fix} (a published index needs FAISS parts: see docs/formats.md)")
    try:
        info = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise IndexSpecError(f"{jpath}: not valid JSON ({e}); rebuild the index ({fix})") from None
    missing = [key for key in ("dim", "metric", "count", "parts", "model") if key not in info]
    if missing:
        raise IndexSpecError(f"{jpath}: missing key(s) {', '.join(missing)}; add them or rebuild the index")
    if info["metric"] not in METRICS:
        raise IndexSpecError(f"{jpath}: metric must be one of {', '.join(METRICS)}, got {info['metric']!r}")
    if model and model != info["model"]:
        log.warning("%s records model %r; ignoring the declared model %r", jpath, info["model"], model)
    meta_files = sorted((path / METADATA_DIR).glob(METADATA_PARTS))
    if not meta_files:
        raise IndexSpecError(f"{path / METADATA_DIR}: no part-*.parquet metadata; each FAISS id needs a row "
                             f"(id, url / path / shard+key); rebuild the index ({fix})")
    if "id" not in metadata_file(meta_files[0]).schema_arrow.names:
        raise IndexSpecError(f"{meta_files[0]}: metadata has no 'id' column; rebuild the index")
    return _read_described(path, info, str(jpath), meta_files, mmap)


def metadata_file(path: Path) -> pq.ParquetFile:
    """One metadata parquet file, opened; a damaged (e.g. truncated) file is an IndexSpecError naming it."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IndexSpecError(f"{path}: index metadata is not a readable parquet file ({e}); restore it or rebuild "
                             f"the index with `rakt index build`") from None


def _read_described(path: Path, info: dict, source: str, meta_files: list[Path], mmap: bool) -> IndexFiles:
    """Read and check the parts `info` names; dim / metric / count left None are taken from the parts."""
    published = info["dim"] is None
    parts, mapped = [], bool(info["parts"]) and mmap
    for name in info["parts"]:
        file = path / name
        if not file.exists():
            raise IndexSpecError(f"{file}: index part listed in {source} is missing; restore the file or "
                                 + ("fix the part list in rakt.json" if published else
                                    "rebuild the index with `rakt index build`"))
        index, was_mapped = _read_part(file, mmap)
        mapped = mapped and was_mapped
        if info["dim"] is None:
            metric = {v: k for k, v in METRICS.items()}.get(index.metric_type)
            if metric is None:
                raise IndexSpecError(f"{file}: faiss metric type {index.metric_type} is neither inner product "
                                     f"nor L2; rakt searches ip or l2 indexes only")
            info = {**info, "dim": index.d, "metric": metric}
            first = file
        elif index.d != int(info["dim"]):
            raise IndexSpecError(f"{file}: part has dim {index.d} but " + (
                f"{first} has dim {info['dim']}; the parts of one index must agree: remove the stray part"
                if published else f"{source} says dim {info['dim']}; the part belongs to another index: fix "
                                  f"index.json or rebuild the index"))
        if index.metric_type != METRICS[info["metric"]]:
            raise IndexSpecError(f"{file}: part metric differs from " + (
                f"{first} (metric {info['metric']!r}); the parts of one index must agree" if published else
                f"{source} (metric {info['metric']!r}); fix index.json or rebuild the index"))
        parts.append(index)
    if not parts:
        raise IndexSpecError(f"{source}: 'parts' lists no FAISS files; rebuild the index")
    total = sum(p.ntotal for p in parts)
    if info["count"] is None:
        info = {**info, "count": total, "factory": factory_name(parts[0]), "ivf_lists": ivf_lists(parts[0])}
    elif total != int(info["count"]):
        raise IndexSpecError(f"{source}: count is {info['count']} but its parts hold {total} vectors; fix "
                             f"index.json or rebuild the index")
    rows = sum(metadata_file(f).metadata.num_rows for f in meta_files)
    meta_dir = meta_files[0].parent
    if rows < total or (rows > total and not published):
        raise IndexSpecError(f"{meta_dir}: metadata has {rows} rows but the index holds {total} vectors; row i "
                             f"must describe FAISS id i: " + ("the metadata folder is incomplete or belongs to "
                             "another index" if published else "rebuild the index or its metadata"))
    if rows > total:
        log.warning("%s: metadata has %d rows for %d vectors; rows past the last FAISS id are never read",
                    meta_dir, rows, total)
    return IndexFiles(path, info, parts, mapped, meta_files)


def _read_part(path: Path, mmap: bool) -> tuple[faiss.Index, bool]:
    """Read one FAISS file, memory-mapped when asked and supported; returns (index, mapped).

    faiss 1.15 maps IVF inverted lists (IVF-PQ parts) only with IO_FLAG_MMAP (OnDiskInvertedLists over the file);
    IO_FLAG_MMAP_IFC maps flat codes but reads IVF lists into RAM, so the file's fourcc picks the order. Lists kept
    on disk (`rakt index build --on-disk`, faiss's merge_ondisk: a `.ivfdata` file beside) are always mapped, from
    the index's own folder (IO_FLAG_ONDISK_SAME_DIR), whatever folder the index was written in.
    """
    if any(path.parent.glob("*.ivfdata")):
        try:
            with c_stdout_to_stderr():
                return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError as e:
            raise IndexSpecError(f"{path}: not a readable FAISS index with on-disk lists "
                                 f"({str(e).strip().splitlines()[-1]}); its .ivfdata file must sit beside it: "
                                 f"restore it or rebuild with `rakt index build --on-disk`") from None
    if mmap:
        names = ("IO_FLAG_MMAP", "IO_FLAG_MMAP_IFC") if _looks_ivf(path) else ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP")
        for name in names:
            if not hasattr(faiss, name):
                continue
            try:
                index = faiss.read_index(str(path), getattr(faiss, name))
            except RuntimeError as e:
                log.debug("%s failed for %s: %s", name, path, str(e).strip().splitlines()[-1])
                continue
            ivf = ivf_of(index)
            if ivf is None or isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
                log.debug("%s: memory-mapped with faiss.%s", path, name)
                return index, True
            log.info("%s: faiss.%s read the IVF lists into RAM (not mapped)", path, name)
            return index, False
        log.info("%s: this index type cannot be memory-mapped by faiss %s; reading it into RAM", path,
                 faiss.__version__)
    try:
        return faiss.read_index(str(path)), False
    except RuntimeError as e:
        raise IndexSpecError(f"{path}: not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             f"rebuild it with `rakt index build`") from None


def _looks_ivf(path: Path) -> bool:
    """Whether a FAISS file's 4-byte tag names an IVF index ("Iw.." / "Iv..")."""
    try:
        with open(path, "rb") as f:
            return f.read(2) in (b"Iw", b"Iv")
    except OSError:
        return False


def factory_name(index: faiss.Index) -> str:
    """A short description of a part read from disk, e.g. 'IndexIVFPQ(nlist=64, M=8)'."""
    ivf = ivf_of(index)
    name = type(faiss.downcast_index(index)).__name__
    if ivf is None:
        return name
    pq_m = f", M={ivf.pq.M}" if hasattr(ivf, "pq") else ""
    return f"{name}(nlist={ivf.nlist}{pq_m})"


def ivf_lists(index: faiss.Index) -> str:
    """How the IVF lists of a part are held: 'ondisk' (mapped) or 'ram'; 'n/a' without IVF."""
    ivf = ivf_of(index)
    if ivf is None:
        return "n/a"
    return "ondisk" if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists) else "ram"


class ListLocations:
    """Where ids sit in an IVF index's inverted lists (list, offset), found without a direct map: one pass over the
    lists' ids locates a whole request (memory: a block of list ids, and the located ids, up to CACHE_IDS of them
    kept for the next request), so ask for many ids at once (FaissIndex.prefetch). Scans and decodes go through the
    lists in order; `release()` (e.g. FaissIndex.release_pages) is called every `release_bytes` of lists passed, so
    the pages of memory-mapped lists do not pile up in the process."""

    CACHE_IDS = 8_000_000
    BLOCK = 1 << 20  # list ids scanned at a time

    def __init__(self, ivf: faiss.IndexIVF, release: Callable[[], object] | None = None,
                 release_bytes: int = 256 << 20) -> None:
        self.ivf, self.release = ivf, release
        self.ids = np.zeros(0, np.int64)
        self.where = np.zeros((0, 2), np.int64)
        list_bytes = ivf.ntotal * (ivf.code_size + 8) / max(1, ivf.nlist)  # a list's codes and ids, on average
        self.release_lists = max(1, int(release_bytes // max(list_bytes, 1.0)))
        self._group = -1  # the group of release_lists lists the current walk is in

    def _passed(self, lst: int) -> None:
        """The walk reached list `lst`: release() when it enters the next group of release_lists lists."""
        if self.release is not None and lst // self.release_lists != self._group:
            self.release()
        self._group = lst // self.release_lists

    def find(self, ids: np.ndarray) -> None:
        """Locate every id of `ids` not located yet (one scan of the lists' ids)."""
        wanted = np.setdiff1d(np.asarray(ids, np.int64), self.ids)
        if not len(wanted):
            return
        where = np.full((len(wanted), 2), -1, np.int64)
        invlists, lists, found, owners = self.ivf.invlists, [], [], []
        self._group = -1
        for lst in range(self.ivf.nlist):
            self._passed(lst)
            size = invlists.list_size(lst)
            if size:
                block = np.zeros(size, np.int64)
                ptr = invlists.get_ids(lst)
                try:
                    faiss.memcpy(faiss.swig_ptr(block), ptr, block.nbytes)
                finally:
                    invlists.release_ids(lst, ptr)
                found.append(block)
                owners.append(np.full(size, lst, np.int64))
                lists.append(size)
            if found and (sum(lists) >= self.BLOCK or lst == self.ivf.nlist - 1):
                block, owner = np.concatenate(found), np.concatenate(owners)
                offsets = np.concatenate([np.arange(n) for n in lists])
                pos = np.minimum(np.searchsorted(wanted, block), len(wanted) - 1)
                hit = wanted[pos] == block
                where[pos[hit]] = np.stack([owner[hit], offsets[hit]], 1)
                lists, found, owners = [], [], []
        if (where[:, 0] < 0).any():
            raise IndexSpecError(f"ids {wanted[where[:, 0] < 0][:5].tolist()} are in no inverted list of the index")
        if len(self.ids) + len(wanted) > self.CACHE_IDS:
            self.ids, self.where = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        order = np.argsort(np.concatenate([self.ids, wanted]), kind="stable")
        self.ids = np.concatenate([self.ids, wanted])[order]
        self.where = np.concatenate([self.where, where])[order]

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of `ids` (decoded from their codes)."""
        ids = np.asarray(ids, np.int64)
        self.find(ids)
        at = self.where[np.searchsorted(self.ids, ids)]
        vectors = np.empty((len(ids), self.ivf.d), np.float32)
        self._group = -1
        for i in np.lexsort((at[:, 1], at[:, 0])):  # list by list, in the order the lists lie on disk
            lst, off = int(at[i, 0]), int(at[i, 1])
            self._passed(lst)
            self.ivf.reconstruct_from_offset(lst, off, faiss.swig_ptr(vectors[i]))
        return vectors


def reconstruct_by_scan(ivf: faiss.IndexIVF, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of `ids` in an IVF index without a direct map (ListLocations, once)."""
    return ListLocations(ivf).reconstruct(ids)
