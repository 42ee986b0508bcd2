"""FAISS indexes opened for search: memory-mapped, multi-part, optionally on GPU.

Index directory layout (docs/formats.md): `index.json` (written last), `index-000.faiss` (several parts
allowed: part j's ids are offset by the sizes of the parts before it) and `metadata/part-*.parquet`, whose
concatenated row i describes FAISS id i. Building lives in rakt/indexes/faiss_build.py (`build_faiss_index` is
re-exported here), reading and checking the files in rakt/indexes/faiss_files.py.

Search backends (chosen at the first search or by `set_backend`, per part, results merged as one):
  auto   faiss-gpu when it sees GPUs (sharded over several, fp16 flat storage when fp32 does not fit); else
         the torch exact search on CUDA for flat parts (IVF-PQ parts: faiss on CPU); else faiss on CPU.
  faiss  faiss: on GPU with faiss-gpu and a visible GPU, else on CPU.
  torch  rakt/indexes/torch_search.py exact search (CUDA when torch sees a GPU, else CPU); flat parts only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402

from rakt.indexes.base import IndexSpecError  # noqa: E402
from rakt.indexes.faiss_build import build_faiss_index  # noqa: E402,F401
from rakt.indexes.faiss_choice import choose_index, parse_memory  # noqa: E402,F401
from rakt.indexes.faiss_ops import (exact_knn, gpu_count, ivf_of, merge_topk, on_disk_lists,  # noqa: E402,F401
                                    prepare_ivfpq, prep_vectors, recall_at, search_released, set_nprobe, to_gpu)
from rakt.indexes.faiss_files import ListLocations, metadata_file, read_index_dir  # noqa: E402
from rakt.indexes.helpers import json_hash, release_mapped  # noqa: E402
from rakt.indexes.layout import INDEX_JSON, METADATA_DIR, METADATA_PARTS  # noqa: E402

__all__ = ["BACKENDS", "FaissIndex", "build_faiss_index", "choose_index", "exact_knn", "parse_memory", "prepare_ivfpq",
           "recall_at", "set_nprobe", "to_gpu", "INDEX_JSON", "METADATA_DIR"]

log = logging.getLogger("rakt.indexes")

BACKENDS = ("auto", "faiss", "torch")
FAISS_GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger k is searched on the CPU copy of the part
DIRECT_MAP_MAX = 2_000_000  # IVF parts up to this size get a direct map for embeddings(); larger ones are scanned


class FaissIndex:
    """An index directory opened for search: one or more FAISS parts plus parquet metadata."""

    def __init__(self, path: Path, info: dict, parts: list[faiss.Index], mapped: bool, gpu: bool | None,
                 backend: str = "auto", meta_files: list[Path] | None = None) -> None:
        self.path, self._info, self._parts, self.mapped = path, info, parts, mapped
        self.dim, self.metric, self.model = int(info["dim"]), str(info["metric"]), str(info["model"])
        self.size = int(info["count"])
        self.nprobe = int(info.get("nprobe") or 0)
        self._offsets = np.cumsum([0] + [p.ntotal for p in parts])
        self._gpu = gpu
        self.backend = _check_backend(backend)
        self._searchers: list | None = None  # per part: a faiss index (CPU or GPU clone) or a TorchExactSearch
        self._where: list[str] = []  # per part: what searches it, for logs and info()
        self.device: str | None = None  # "gpu" / "cpu" once the backend is resolved
        for p in parts:
            set_nprobe(p, self.nprobe)
        self._current_nprobe = self.nprobe
        self._direct_maps: set[int] = set()  # parts given a direct map
        self._located: dict[int, ListLocations] = {}  # large IVF parts: where looked-up ids sit in their lists
        on_disk = [on_disk_lists(p) for p in parts]  # each part's, which also turns faiss's prefetch threads off
        self._mapped_files = [path] if mapped or any(on_disk) else []
        if meta_files is None:
            meta_files = sorted((path / METADATA_DIR).glob(METADATA_PARTS))
        self._files = [metadata_file(f) for f in meta_files]
        self._synth_id = "id" not in self._files[0].schema_arrow.names  # published metadata: id = the FAISS id
        groups = [(fi, g, f.metadata.row_group(g).num_rows) for fi, f in enumerate(self._files)
                  for g in range(f.metadata.num_row_groups)]
        self._groups = [(fi, g) for fi, g, _ in groups]
        self._group_starts = np.cumsum([0] + [rows for _, _, rows in groups])
        log.info("opened %s: %s, %d vectors in %d part(s)%s, search backend %s", path,
                 info.get("factory", info.get("kind")), self.size, len(parts), ", memory-mapped" if mapped else "",
                 self.backend)

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True, gpu: bool | None = None,
             backend: str = "auto", model: str | None = None) -> "FaissIndex":
        """Open and validate an index directory (index.json, every part, metadata row count).

        A folder without index.json in the published layout (rakt/indexes/published.py) opens too; `model` declares
        its embedding model. gpu=False keeps search on the CPU whatever the backend; `backend` is one of
        BACKENDS (module doc). Reading and checking the files is rakt/indexes/faiss_files.py.
        """
        found = read_index_dir(path, mmap, model)
        return cls(found.path, found.info, found.parts, found.mapped, gpu, backend, found.meta_files)

    # --- search backends ------------------------------------------------------------------------------

    def set_backend(self, backend: str) -> None:
        """Choose the search backend (auto | faiss | torch) and set it up now, so a misfit fails here."""
        backend = _check_backend(backend)
        if backend != self.backend or self._searchers is None:
            self.backend, self._searchers = backend, None
            self._resolve()

    def _resolve(self) -> None:
        """Pick what searches each part (module doc) and log it."""
        if self._searchers is not None:
            return
        allow_gpu = self._gpu is not False
        faiss_gpus = gpu_count() if allow_gpu else 0
        torch_cuda = allow_gpu and faiss_gpus == 0 and self.backend != "faiss" and _torch_cuda()
        if self._gpu and not (faiss_gpus or torch_cuda):
            log.warning("gpu=True but neither faiss-gpu nor torch sees a GPU; searching on CPU")
        searchers, where = [], []
        for j, part in enumerate(self._parts):
            flat = _is_flat(part)
            name = f"{self.path}/{self._info['parts'][j]}"
            if self.backend == "torch":
                if not flat:
                    raise IndexSpecError(f"{name}: backend 'torch' is exact search over flat indexes, but this part is "
                                         f"{type(faiss.downcast_index(part)).__name__} (IVF-PQ or another compressed "
                                         f"index); use backend auto or faiss (--backend auto)")
                searchers.append(_torch_search(part, "auto" if allow_gpu else "cpu"))
            elif faiss_gpus:
                clone = _clone_to_gpus(part, faiss_gpus)
                searchers.append(clone if clone is not None else part)
            elif torch_cuda and flat:
                try:
                    searchers.append(_torch_search(part, "cuda"))
                except IndexSpecError as e:
                    log.warning("%s: %s; searching it with faiss on CPU", name, e)
                    searchers.append(part)
            else:
                if torch_cuda:
                    log.info("%s: %s without faiss-gpu: searching it with faiss on CPU (the torch backend is exact "
                             "search over flat indexes only; install faiss-gpu for IVF-PQ on GPU)", name,
                             self._info.get("factory", type(part).__name__))
                searchers.append(part)
            where.append(_describe(searchers[-1], part))
        for s in searchers:
            if isinstance(s, faiss.Index):
                set_nprobe(s, self._current_nprobe)
        self._searchers, self._where = searchers, where
        self.device = "cpu" if all(w.endswith("cpu") for w in where) else "gpu"
        if self.device == "cpu" and torch_cuda:  # a GPU is there, but no part could use it (logged above)
            log.info("searching on CPU although torch sees a GPU (backend %s: %s)", self.backend, ", ".join(where))
        elif self.device == "cpu":
            why = ("gpu=False" if not allow_gpu else "faiss sees no GPU" if self.backend == "faiss"
                   else "neither faiss-gpu nor torch sees a CUDA GPU")
            log.info("no GPU: searching on CPU (%s; backend %s: %s)", why, self.backend, ", ".join(sorted(set(where))))
        else:
            log.info("search backend %s: %s", self.backend,
                     "; ".join(f"part {j}: {w}" for j, w in enumerate(where)))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 [n, k], ids int64 [n, k]) over every part; ip queries are L2-normalized."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}] for {self.path}, got shape {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = prep_vectors(q, normalize=self.metric == "ip")
        self._resolve()
        want = nprobe or self.nprobe
        if want != self._current_nprobe:
            for p in [*self._parts, *self._searchers]:
                if isinstance(p, faiss.Index):
                    set_nprobe(p, want)
            self._current_nprobe = want
        scores, ids = [], []
        for part, searcher, offset, where in zip(self._parts, self._searchers, self._offsets, self._where):
            if part.ntotal == 0:
                continue
            if k > FAISS_GPU_MAX_K and where == "faiss-gpu":
                log.warning("k=%d exceeds faiss GPU's limit of %d: searching this part on CPU", k, FAISS_GPU_MAX_K)
                searcher = part
            if searcher is part:  # on memory-mapped lists: in calls that map a bounded share of them
                s, i = search_released(part, q, min(k, part.ntotal), want, self.release_pages)
            else:
                s, i = searcher.search(q, min(k, part.ntotal))
            scores.append(s)
            ids.append(np.where(i >= 0, i + offset, -1))
        if not scores:  # every part is empty
            scores, ids = [np.zeros((len(q), 0), np.float32)], [np.zeros((len(q), 0), np.int64)]
        if len(scores) == 1 and scores[0].shape[1] == k:
            return scores[0].astype(np.float32), ids[0].astype(np.int64)
        return merge_topk(scores, ids, k, self.metric)

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.size)]
        if len(bad):
            raise ValueError(f"ids out of range [0, {self.size}) for {self.path}: {bad[:5].tolist()}")
        return ids

    def metadata(self, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Metadata rows for `ids` in order (repeats allowed), reading only the row groups they fall in.

        Metadata without an `id` column (published indexes) gets one: the FAISS id as a decimal string.
        """
        ids = self._check_ids(ids)
        if self._synth_id:
            read = [c for c in columns if c != "id"] if columns is not None else None
            table = self._read_rows(ids, read)
            table = table.add_column(0, "id", pa.array([str(i) for i in ids.tolist()], pa.string()))
            return table.select(columns) if columns is not None else table
        return self._read_rows(ids, columns)

    def _read_rows(self, ids: np.ndarray, columns: list[str] | None) -> pa.Table:
        """The rows `ids` in order, reading their row groups one at a time (memory: one group + the result)."""
        if len(ids) == 0:
            return self._files[0].schema_arrow.empty_table().select(columns or self._files[0].schema_arrow.names)
        group_of = np.searchsorted(self._group_starts, ids, side="right") - 1
        order = np.argsort(group_of, kind="stable")
        groups, first = np.unique(group_of[order], return_index=True)
        pieces = []
        for g, a, b in zip(groups, first, [*first[1:], len(order)]):
            fi, rg = self._groups[g]
            group = self._files[fi].read_row_group(rg, columns=columns)
            pieces.append(group.take(pa.array(ids[order[a:b]] - self._group_starts[g])))
            del group
        table = pa.concat_tables(pieces, promote_options="default") if len(pieces) > 1 else pieces[0]
        return table.take(pa.array(np.argsort(order, kind="stable")))

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for `ids` (float32 [n, dim]); approximate (decoded codes) for PQ indexes. An IVF part of
        up to DIRECT_MAP_MAX vectors gets a direct map (8 bytes a vector); a larger one is looked up by one scan
        of its lists' ids per call (no memory that grows with the index), so ask for many ids at once."""
        ids = self._check_ids(ids)
        out = np.zeros((len(ids), self.dim), np.float32)
        part_of = np.searchsorted(self._offsets, ids, side="right") - 1
        for j in np.unique(part_of):
            mask = part_of == j
            local = ids[mask] - self._offsets[j]
            part, ivf = self._parts[j], ivf_of(self._parts[j])
            try:
                if ivf is not None and part.ntotal > DIRECT_MAP_MAX:
                    out[mask] = self._locations(j, ivf).reconstruct(local)
                    continue
                if ivf is not None and j not in self._direct_maps:
                    ivf.make_direct_map()
                    self._direct_maps.add(j)
                out[mask] = part.reconstruct_batch(local)
            except RuntimeError as e:
                raise IndexSpecError(f"{self.path}: {type(part).__name__} cannot reconstruct stored "
                                     f"vectors ({str(e).strip().splitlines()[-1]}); use a flat or IVF index") from None
        self.release_pages()
        return out

    def prefetch(self, ids: np.ndarray) -> None:
        """Make embeddings() of these ids fast: large IVF parts locate them all in one pass over their lists (an
        optional method of the Index protocol; curate calls it before asking for many ids in batches)."""
        ids = self._check_ids(ids)
        part_of = np.searchsorted(self._offsets, ids, side="right") - 1
        for j in np.unique(part_of):
            ivf = ivf_of(self._parts[j])
            if ivf is not None and self._parts[j].ntotal > DIRECT_MAP_MAX:
                self._locations(j, ivf).find(ids[part_of == j] - self._offsets[j])
        self.release_pages()

    def release_pages(self) -> None:
        """Take the pages that searches and lookups read from the memory-mapped parts (and on-disk lists) out of
        this process's resident set; they stay in the page cache (rakt/indexes/helpers.py release_mapped). Called
        after each search and lookup, so the process's memory does not grow with the index it reads."""
        if self._mapped_files:
            release_mapped(self._mapped_files)

    def _locations(self, j: int, ivf) -> ListLocations:
        if j not in self._located:
            self._located[j] = ListLocations(ivf, release=self.release_pages if self._mapped_files else None)
        return self._located[j]

    def identity(self) -> str:
        """json_hash of index.json (as written), or of info() for a published folder without one."""
        jpath = self.path / INDEX_JSON
        if jpath.exists():
            return json_hash(json.loads(jpath.read_text()))
        return json_hash(self.info())

    def info(self) -> dict:
        """index.json plus where and how it is open."""
        return {**self._info, "path": str(self.path.resolve()), "size": self.size, "device": self.device,
                "backend": self.backend, "search": list(self._where) or None, "mmap": self.mapped,
                "metadata_files": len(self._files)}

    def __repr__(self) -> str:
        return f"FaissIndex({str(self.path)!r}, {self._info.get('factory')}, size={self.size}, dim={self.dim})"


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise IndexSpecError(f"search backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _is_flat(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _torch_cuda() -> bool:
    """torch sees a CUDA GPU (False if torch is missing or broken)."""
    try:
        from rakt.indexes.torch_search import cuda_available
    except ImportError as e:
        log.debug("torch unavailable for GPU search: %s", e)
        return False
    return cuda_available()


def _torch_search(part: faiss.Index, device: str):
    from rakt.indexes.torch_search import TorchExactSearch

    return TorchExactSearch.from_faiss(part, device=device)


def _describe(searcher: object, part: faiss.Index) -> str:
    if searcher is part:
        return "faiss-cpu"
    if isinstance(searcher, faiss.Index):
        return "faiss-gpu"
    dev = searcher.devices[0].type
    return "torch-cpu" if dev == "cpu" else f"torch-cuda x{len(searcher.devices)} {searcher.info()['dtype']}"


def _clone_to_gpus(part: faiss.Index, ngpu: int) -> faiss.Index | None:
    """Clone a part to `ngpu` faiss GPUs (sharded when several), fp16 storage for a flat part that does not fit
    in fp32; None when faiss cannot put this index type on GPU."""
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1
    ivf = ivf_of(part)
    if _is_flat(part):
        co.useFloat16 = not _fits_gpus(part.ntotal * part.d * 4, ngpu)
        if co.useFloat16:
            log.info("flat part of %d x %d does not fit %d GPU(s) in fp32: storing it as fp16 on GPU", part.ntotal,
                     part.d, ngpu)
    elif ivf is not None and hasattr(ivf, "pq"):
        co.useFloat16 = ivf.pq.M > 48  # GPU IVF-PQ needs fp16 lookup tables for large codes
    try:
        return faiss.index_cpu_to_all_gpus(part, co=co, ngpu=ngpu)
    except RuntimeError as e:  # e.g. HNSW or an unsupported PQ size: stay on CPU
        log.warning("cannot move %s to GPU (%s); searching it on CPU", type(part).__name__, str(e).splitlines()[0])
        return None


def _fits_gpus(nbytes: int, ngpu: int, fraction: float = 0.8) -> bool:
    """Whether `nbytes` split over `ngpu` GPUs fit in `fraction` of the smallest one's free memory (True when
    free memory cannot be read)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return True
        free = min(torch.cuda.mem_get_info(j)[0] for j in range(min(ngpu, torch.cuda.device_count())))
    except (ImportError, RuntimeError, ValueError):
        return True
    return nbytes / ngpu <= free * fraction
