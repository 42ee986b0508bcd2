"""Build FAISS index directories: budget-driven choice (flat / IVF-PQ), training, metadata, recall check.

Why not autofaiss: it depends on `faiss-cpu`, and installing it would put faiss-cpu beside faiss-gpu (both
ship the `faiss` module; whichever pip wrote last wins and GPU support silently disappears). rakt re-implements
the small part of autofaiss's `get_optimal_index_keys_v2` it needs: flat when the raw vectors fit the memory
budget, else IVF-PQ sized to it. Also the helpers the open index shares (normalizing, merging top-k lists,
nprobe, GPU cloning). Layout of the directory: see indexes/faiss_index.py.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402

from indexes.base import IndexSpecError
from indexes.helpers import atomic_path, l2_normalize
from indexes.layout import INDEX_JSON, METADATA_DIR  # noqa: F401  (re-exported)

log = logging.getLogger("rakt.indexes")

MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
FLAT_MAX_VECTORS = 2_000_000  # beyond this an exhaustive scan is too slow per query, whatever the memory
GPU_PQ_M = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)  # code sizes GpuIndexIVFPQ supports
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METADATA_ROWS_PER_FILE = 1_000_000
METADATA_ROW_GROUP = 65_536
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(budget: str | int) -> int:
    """Bytes in a memory budget written like 500M, 16G, 1.5T, 4GB or a plain byte count."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(budget), re.IGNORECASE)
    if not m:
        raise IndexSpecError(f"memory budget {budget!r} not understood; write it like 500M, 16G or 1.5T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _human(nbytes: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}T"


@dataclass
class IndexChoice:
    kind: str  # flat | ivfpq | factory
    factory: str  # the faiss index_factory string
    memory_bytes: int | None  # estimate (None for arbitrary factory strings)
    expected: str  # what recall to expect, for the log


def choose_index(n: int, d: int, *, kind: str = "auto", memory_budget: str | int = "4G",
                 train_size: int = 100_000) -> IndexChoice:
    """Pick the index for n vectors of dim d under a memory budget (autofaiss-style).

    auto: `Flat` (exact) when n*d*4 bytes fit the budget and n <= 2M, else IVF-PQ.
    IVF-PQ is `IVF{nlist},PQ{m}` with 8-bit codes, without OPQ: OPQ's rotation trains slowly on CPU, is not
    cloned to GPU as one index, and gains little on normalized CLIP embeddings; pass an index_factory string
    such as 'OPQ64,IVF4096,PQ64' to have it. nlist ~ 4*sqrt(n) rounded to a power of two, lowered until the
    training sample gives >= 39 points per list. m is the largest code size (bytes per vector) that GPU IVF-PQ
    supports (<= 96), divides d, is <= d/8 and lets n*(m + 8 id bytes) + the coarse centroids fit the budget
    (the largest code the budget allows gives the best recall). Sub-vectors of >= 8 dims: faiss's k-means is
    ~10x slower below 8 dims (no SIMD path), and 8-dim sub-vectors are the usual trade-off (PQ64 for 512-d).
    """
    if n <= 0 or d <= 0:
        raise IndexSpecError(f"cannot build an index over {n} vectors of dim {d}; the pool is empty")
    budget = parse_memory(memory_budget)
    n_train = min(n, train_size)
    if kind == "auto":
        flat_bytes = n * d * 4
        kind = "flat" if flat_bytes <= budget and n <= FLAT_MAX_VECTORS else "ivfpq"
        log.info("kind=auto: %d x %d float32 = %s vs budget %s -> %s", n, d, _human(flat_bytes), _human(budget), kind)
    if kind == "flat":
        return IndexChoice("flat", "Flat", n * d * 4, "exact search (recall 1.0)")
    if kind == "ivfpq":
        if n_train < 1000:
            raise IndexSpecError(f"IVF-PQ needs at least 1000 training vectors; this pool has {n} "
                                 f"(train_size {train_size}); use kind=flat (--kind flat) for so small a pool")
        nlist = min(1 << round(math.log2(4 * math.sqrt(n))), 1 << int(math.log2(n_train / MIN_POINTS_PER_LIST)))
        for m in (m for m in GPU_PQ_M if d % m == 0 and m <= max(1, d // 8)):
            mem = n * (m + 8) + nlist * d * 4
            if mem <= budget:
                return IndexChoice("ivfpq", f"IVF{nlist},PQ{m}", mem,
                                   f"approximate: PQ{m} codes ({4 * d // m}x smaller than float32), nlist {nlist}")
        smallest = n * (1 + 8) + nlist * d * 4
        raise IndexSpecError(f"memory budget {_human(budget)} is too small for {n} vectors of dim {d}: even the "
                             f"smallest IVF-PQ needs ~{_human(smallest)}; raise --memory-budget")
    match = re.search(r"IVF(\d+)", kind)
    if match and n_train < int(match.group(1)) * MIN_POINTS_PER_LIST:
        nlist = int(match.group(1))
        raise IndexSpecError(f"'{kind}': the pool holds {n} vectors (training sample {n_train}) but IVF{nlist} "
                             f"needs >= {nlist * MIN_POINTS_PER_LIST} to train; use kind=flat, fewer lists, "
                             f"or a larger --train-size")
    return IndexChoice("factory", kind, None, "depends on the factory string (measured below)")


# --- building -----------------------------------------------------------------------------------------

def prep_vectors(x: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 C-contiguous copy, L2-normalized when asked (zero vectors stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if normalize:
        x = l2_normalize(x, axis=1)
    return x


def _unit_norm(vectors: np.ndarray, batch_size: int, tol: float = 1e-3) -> bool:
    return all(np.all(np.abs(np.linalg.norm(np.asarray(vectors[i:i + batch_size], np.float32), axis=1) - 1) < tol)
               for i in range(0, len(vectors), batch_size))


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip", *,
              normalize: bool = False, batch_size: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries` over `vectors`, scanned in batches (no full float32 copy of the pool)."""
    q = prep_vectors(queries, False)
    best_s = np.full((len(q), 0), 0, np.float32)
    best_i = np.full((len(q), 0), 0, np.int64)
    for start in range(0, len(vectors), batch_size):
        chunk = prep_vectors(vectors[start:start + batch_size], normalize)
        s, i = faiss.knn(q, chunk, min(k, len(chunk)), metric=METRICS[metric])
        best_s, best_i = merge_topk([best_s, s], [best_i, i + start], k, metric)
    return best_s, best_i


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
    """Set IVF lists visited per query (no-op for non-IVF indexes); works on CPU indexes and GPU clones."""
    if nprobe <= 0:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    elif hasattr(faiss, "GpuParameterSpace"):  # GPU IVF clones, shards and replicas of them
        with contextlib.suppress(RuntimeError):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


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


def build_faiss_index(vectors: np.ndarray, metadata: pa.Table, out_dir: str | Path, *, model: str,
                      metric: str = "ip", kind: str = "auto", memory_budget: str = "4G",
                      train_size: int = 100_000, nprobe: int = 16, seed: int = 0,
                      extra_info: dict | None = None, batch_size: int = 100_000,
                      add_step: AddStep | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Build an index directory over `vectors` [n, d] with `metadata` row i describing id i; return index.json.
    `progress(n)` is called as vectors are added in process.

    The add step runs here, in batches, unless `add_step` is given: it gets the trained empty index (on the
    CPU) and must return it filled with all n vectors in order, e.g. by partitions added elsewhere to copies of
    it and merged (`fill_copy`, `merge_parts`); `vectors` then only feed training and the recall check.
    """
    start_time = time.perf_counter()
    if getattr(vectors, "ndim", 0) != 2:
        raise IndexSpecError(f"vectors must be a 2-D array [n, dim], got shape {getattr(vectors, 'shape', None)}")
    n, d = vectors.shape
    if metric not in METRICS:
        raise IndexSpecError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metadata.num_rows != n or "id" not in metadata.column_names:
        raise IndexSpecError(f"metadata must have an 'id' column and one row per vector: got {metadata.num_rows} "
                             f"rows (columns {metadata.column_names}) for {n} vectors")
    choice = choose_index(n, d, kind=kind, memory_budget=memory_budget, train_size=train_size)
    mem = _human(choice.memory_bytes) if choice.memory_bytes is not None else "unknown size"
    log.info("index: %s (%s) over %d x %d, ~%s; expected recall: %s", choice.kind, choice.factory, n, d, mem,
             choice.expected)
    normalize = metric == "ip" and not _unit_norm(vectors, batch_size)
    if normalize:
        log.info("vectors are not unit-norm: normalizing them for metric ip (cosine similarity)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_JSON).unlink(missing_ok=True)  # a half-rebuilt directory must not look finished
    try:
        index = faiss.index_factory(d, choice.factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexSpecError(f"'{choice.factory}' is not a faiss index_factory string faiss accepts for dim {d} "
                             f"({str(e).strip().splitlines()[-1]}); use auto, flat, ivfpq or e.g. 'IVF1024,PQ32'")
    prepare_ivfpq(index)
    work = to_gpu(index, ngpu=1)  # one GPU: shards would each train their own quantizer
    device = "gpu" if work is not None else "cpu"
    work = work if work is not None else index
    log.info("building on %s", device.upper())
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    if not index.is_trained:
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        work.train(prep_vectors(vectors[sample], normalize))
    t1 = time.perf_counter()
    if add_step is None:
        for begin in range(0, n, batch_size):
            work.add(prep_vectors(vectors[begin:begin + batch_size], normalize))
            if progress is not None:
                progress(min(batch_size, n - begin))
    else:
        trained = faiss.index_gpu_to_cpu(work) if device == "gpu" else work
        check_mergeable(trained, choice.factory)
        index = work = add_step(trained, normalize)  # a CPU index, whichever device trained it
        if work.ntotal != n:
            raise IndexSpecError(f"the add step returned an index of {work.ntotal} vectors for {n}")
    t2 = time.perf_counter()
    set_nprobe(work, nprobe)
    recall = 1.0
    if choice.kind != "flat":
        queries = prep_vectors(vectors[np.sort(rng.choice(n, size=min(n, 1000), replace=False))], normalize)
        k = min(10, n)
        _, exact = exact_knn(queries, vectors, k, metric, normalize=normalize, batch_size=batch_size)
        recall = recall_at(work.search(queries, k)[1], exact)
        log.info("recall@10 = %.3f (nprobe %d, %d sampled pool vectors as queries vs exact search)", recall,
                 nprobe, len(queries))
    else:
        log.info("recall@10 = 1.0 (exact search)")
    if device == "gpu" and add_step is None:
        index = faiss.index_gpu_to_cpu(work)
        set_nprobe(index, nprobe)
    part = "index-000.faiss"
    with atomic_path(out / part) as tmp:
        faiss.write_index(index, str(tmp))
    _write_metadata(metadata, out / METADATA_DIR)
    for stale in out.glob("index-*.faiss"):
        if stale.name != part:
            stale.unlink()
    info = {
        **(extra_info or {}),
        "kind": choice.kind, "factory": choice.factory, "model": model, "dim": d, "metric": metric, "count": n,
        "parts": [part], "nprobe": nprobe, "recall_at_10": round(recall, 4),
        "memory_bytes": (out / part).stat().st_size, "built_with": f"faiss {faiss.__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "normalized": normalize, "device": device, "train_size": min(n, train_size), "seed": seed,
        "add": "in parts, merged" if add_step is not None else "in process",
        "seconds": {"train": round(t1 - t0, 2), "add": round(t2 - t1, 2),
                    "total": round(time.perf_counter() - start_time, 2)},
    }
    with atomic_path(out / INDEX_JSON) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    log.info("wrote %s: %s, %d vectors, %s on disk", out, choice.factory, n, _human(info["memory_bytes"]))
    return info


# --- the add step in parts (e.g. one per embedding-set partition, on a cluster) ----------------------------

AddStep = Callable[[faiss.Index, bool], faiss.Index]  # (trained empty CPU index, normalize) -> filled index


def fill_copy(empty: np.ndarray, batches: Iterable[np.ndarray], normalize: bool) -> np.ndarray:
    """One part of the add step: the vector `batches` added in order (as ids 0..n-1) to a copy of the serialized
    empty trained index (`faiss.serialize_index`); returns the filled copy, serialized. Batches stream: only
    one is in memory at a time. On a GPU when faiss-gpu sees one, as the in-process build adds."""
    index = faiss.deserialize_index(empty)
    work = to_gpu(index, ngpu=1) or index
    for vectors in batches:
        work.add(prep_vectors(vectors, normalize))
    return faiss.serialize_index(faiss.index_gpu_to_cpu(work) if work is not index else index)


def merge_parts(empty: faiss.Index, parts: Iterable[np.ndarray]) -> faiss.Index:
    """A copy of `empty` holding the serialized filled parts in order: ids continue from part to part, so it
    searches exactly as one index filled in that order (IVF: lists appended with ids shifted; flat: codes
    concatenated)."""
    index = _copy(empty)
    ivf = faiss.try_extract_index_ivf(index) is not None
    for blob in parts:
        index.merge_from(faiss.deserialize_index(blob), index.ntotal if ivf else 0)  # flat ids are positions
    return index


def _copy(index: faiss.Index) -> faiss.Index:
    """A copy of the class the parts deserialize to (clone_index gives IndexFlat for IndexFlatIP: unmergeable)."""
    return faiss.deserialize_index(faiss.serialize_index(index))


def check_mergeable(empty: faiss.Index, factory: str) -> None:
    """Raise before any work if parts of this kind of index cannot be merged (e.g. HNSW graphs)."""
    try:
        _copy(empty).merge_from(_copy(empty), 0)
    except RuntimeError as e:
        raise IndexSpecError(f"'{factory}' indexes cannot be built in parts ({str(e).strip().splitlines()[-1]}); "
                             f"build it with --engine local, or use flat, ivfpq or another IVF index") from None


def _write_metadata(table: pa.Table, folder: Path) -> list[Path]:
    """Write metadata as part-NNNNN.parquet files of <= 1M rows (row groups of 64k), removing stale parts."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for j, begin in enumerate(range(0, max(table.num_rows, 1), METADATA_ROWS_PER_FILE)):
        path = folder / f"part-{j:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table.slice(begin, METADATA_ROWS_PER_FILE), tmp, row_group_size=METADATA_ROW_GROUP)
        written.append(path)
    for stale in set(folder.glob("part-*.parquet")) - set(written):
        stale.unlink()
    return written
