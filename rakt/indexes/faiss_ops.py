"""Small FAISS operations the build and the open index share: vectors in the form faiss wants, exact top-k (whole
or accumulated batch by batch), merging top-k lists, recall, nprobe, the IVF inside an index, GPU cloning."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402


log = logging.getLogger("rakt.indexes")

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def prep_vectors(x: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 C-contiguous copy, L2-normalized when asked (zero vectors stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.where(norms > 0, norms, 1)
    return x


class ExactTopK:
    """Exact top-k of fixed queries over vectors that arrive batch by batch (ids continue from batch to batch,
    or are given), so a pool that never fits in memory can still be searched exactly."""

    def __init__(self, queries: np.ndarray, k: int, metric: str = "ip", start: int = 0) -> None:
        self.queries, self.k, self.metric = prep_vectors(queries, False), k, metric
        self.scores = np.zeros((len(queries), 0), np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)
        self.seen = start  # the id the next batch starts at

    def add(self, vectors: np.ndarray, first_id: int | None = None) -> None:
        """Fold a batch (already normalized as the index stores it) whose first row has id `first_id`."""
        start = self.seen if first_id is None else first_id
        if len(vectors) and len(self.queries):
            s, i = faiss.knn(self.queries, np.ascontiguousarray(vectors, np.float32), min(self.k, len(vectors)),
                             metric=METRICS[self.metric])
            self.scores, self.ids = merge_topk([self.scores, s], [self.ids, i + start], self.k, self.metric)
        self.seen = start + len(vectors)

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold top-k lists computed elsewhere (ids already global)."""
        self.scores, self.ids = merge_topk([self.scores, scores], [self.ids, ids], self.k, self.metric)


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip", *,
              normalize: bool = False, batch_size: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries` over `vectors`, scanned in batches (no full float32 copy of the pool)."""
    top = ExactTopK(queries, k, metric)
    for start in range(0, len(vectors), batch_size):
        top.add(prep_vectors(vectors[start:start + batch_size], normalize), start)
    return top.scores, top.ids


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part top-k lists (ids already global) into one top-k; id -1 ranks last."""
    s = np.concatenate(scores, axis=1).astype(np.float32)
    i = np.concatenate(ids, axis=1).astype(np.int64)
    key = -s if metric == "ip" else s.copy()
    key[i < 0] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if s.shape[1] < k:  # fewer candidates than k: pad like faiss does
        pad = k - s.shape[1]
        worst = -np.finfo(np.float32).max if metric == "ip" else np.finfo(np.float32).max
        s = np.hstack([s, np.full((len(s), pad), worst, np.float32)])
        i = np.hstack([i, np.full((len(i), pad), -1, np.int64)])
    return s, i


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    k = exact_ids.shape[1]
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k) if hits else 1.0


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set IVF lists visited per query (no-op for non-IVF indexes); works on CPU indexes and GPU clones. With an
    HNSW coarse quantizer its efSearch follows (at least 2 x nprobe, as autofaiss sets it)."""
    if nprobe <= 0:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
        hnsw = faiss.downcast_index(ivf.quantizer)
        if isinstance(hnsw, faiss.IndexHNSW):
            hnsw.hnsw.efSearch = max(hnsw.hnsw.efSearch, 2 * nprobe)
    elif hasattr(faiss, "GpuParameterSpace"):  # GPU IVF clones, shards and replicas of them
        with contextlib.suppress(RuntimeError):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


MAPPED_BYTES_PER_SEARCH = 512 << 20  # what one search call may map of memory-mapped lists before they are released
FOLIO_BYTES = 2 << 20  # the most the kernel maps at one fault of a file mapping (a large page-cache folio)


def mapped_rows(part: faiss.Index, nprobe: int) -> int:
    """Queries one search call may take: all of them, but on memory-mapped IVF lists (on_disk_lists) larger than
    MAPPED_BYTES_PER_SEARCH only as many as map that much, each probed list mapping at least a page-cache folio of
    up to FOLIO_BYTES (a batch of 1,000 queries over a 16M index maps all of its 1.1 GB at once)."""
    ivf = faiss.try_extract_index_ivf(part)
    lists_bytes = part.ntotal * ((ivf.code_size if ivf is not None else 0) + 8)
    if ivf is None or lists_bytes <= MAPPED_BYTES_PER_SEARCH or not on_disk_lists(part):
        return 1 << 40
    per_query = nprobe * max(lists_bytes / max(1, ivf.nlist), FOLIO_BYTES)
    return max(1, int(MAPPED_BYTES_PER_SEARCH // per_query))


def search_released(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int,
                    release: Callable[[], object]) -> tuple[np.ndarray, np.ndarray]:
    """index.search(queries, k) at `nprobe`, in calls of mapped_rows queries, `release()` (the mapped pages) after
    each: what a search maps of memory-mapped lists stays bounded however many queries there are."""
    rows, found = mapped_rows(index, nprobe), []
    for begin in range(0, max(len(queries), 1), rows):  # one call for no queries, as index.search
        found.append(index.search(queries[begin:begin + rows], k))
        release()
    if len(found) == 1:
        return found[0]
    return np.concatenate([s for s, _ in found]), np.concatenate([i for _, i in found])


def on_disk_lists(index: faiss.Index) -> bool:
    """Whether the index's inverted lists are memory-mapped (faiss's OnDiskInvertedLists). If so, faiss's prefetch
    threads (which read every list a search batch will visit, ahead of it and after it returns) are turned off, so
    what a search maps of the file is what it reads, while it runs (rakt/indexes/helpers.py release_mapped)."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return False
    lists.prefetch_nthread = 0
    return True


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF inside `index` (through pre-transforms), downcast to its concrete class, or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return faiss.downcast_index(ivf) if ivf is not None else None


def prepare_ivfpq(index: faiss.Index) -> None:
    """Training settings for IVF-PQ: no polysemous training (index_factory turns it on; it costs minutes and
    rakt never uses it) and <= 64 points per PQ centroid (16k per sub-quantizer, above faiss's 39 * 256
    minimum): PQ training time grows with m * points, and more points barely change 8-bit codebooks."""
    ivf = ivf_of(index)
    if ivf is not None and hasattr(ivf, "pq"):
        ivf.do_polysemous_training = False
        ivf.pq.cp.max_points_per_centroid = 64


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index: faiss.Index, ngpu: int = -1) -> faiss.Index | None:
    """Clone to `ngpu` GPUs (-1: all visible; sharded when several), or None without faiss-gpu/GPUs or on failure."""
    ngpu = gpu_count() if ngpu < 0 else min(ngpu, gpu_count())
    if ngpu == 0:
        return None
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1
    ivf = ivf_of(index)
    co.useFloat16 = bool(ivf is not None and hasattr(ivf, "pq") and ivf.pq.M > 48)  # large PQ needs fp16 tables
    try:
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)
    except RuntimeError as e:  # e.g. HNSW or an unsupported PQ size: stay on CPU
        log.warning("cannot move %s to GPU (%s); using CPU", type(index).__name__, str(e).splitlines()[0])
        return None
