"""Which FAISS index to build, and whether the build fits its memory budget (autofaiss-style, without autofaiss).

Why not autofaiss: it depends on `faiss-cpu`, and installing it would put faiss-cpu beside faiss-gpu (both ship
the `faiss` module; whichever pip wrote last wins and GPU support silently disappears). rakt re-implements the
small part of autofaiss's `get_optimal_index_keys_v2` / `get_optimal_train_size` it needs: flat when the raw
vectors fit the budget, else IVF-PQ with ~4 sqrt(N) lists (an HNSW coarse quantizer from 8,192 lists, as
autofaiss does above 1,000), trained on 39 vectors per list, with the largest PQ code the budget allows.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from rakt.indexes.base import IndexSpecError

log = logging.getLogger("rakt.indexes")

MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
FLAT_MAX_VECTORS = 2_000_000  # beyond this an exhaustive scan is too slow per query, whatever the memory
HNSW_MIN_LISTS = 8192  # from here an HNSW coarse quantizer assigns faster than a flat one (bench/scale.py)
GPU_PQ_M = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)  # code sizes GpuIndexIVFPQ supports
ID_BYTES = 8  # FAISS stores an int64 id beside every code in an inverted list
LIST_GROWTH = 1.5  # codes added batch by batch grow by doubling: up to 2x, ~1.4x measured (IVF lists merged from
# parts are allocated once at their final size instead: rakt/indexes/faiss_parts.py)
BASE_BYTES = 400 * 2**20  # the process with numpy, pyarrow and faiss loaded: outside --memory-budget
RECALL_QUERIES = 1000  # pool vectors sampled as queries for the recall@10 check
KMEANS_CHUNK_ROWS = 4096  # training-sample rows k-means holds at a time (rakt/indexes/faiss_train.py)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(budget: str | int) -> int:
    """Bytes in a memory budget written like 500M, 16G, 1.5T, 4GB or a plain byte count."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(budget), re.IGNORECASE)
    if not m:
        raise IndexSpecError(f"memory budget {budget!r} not understood; write it like 500M, 16G or 1.5T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(nbytes: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}T"


@dataclass
class IndexChoice:
    kind: str  # flat | ivfpq | factory
    factory: str  # the faiss index_factory string
    memory_bytes: int | None  # the index's size (None for arbitrary factory strings)
    expected: str  # what recall to expect, for the log
    train_size: int = 0  # vectors to train on (0: the index needs no training)
    nlist: int = 0  # IVF lists (0: not an IVF index, or unknown)
    memory: dict = field(default_factory=dict)  # the build's peak memory by part (build_memory)


def auto_nlist(n: int) -> int:
    """~4 sqrt(n) IVF lists, rounded to a power of two (autofaiss; faiss wiki: between 4 and 16 sqrt(n))."""
    return max(1, 1 << round(math.log2(4 * math.sqrt(n))))


def choose_index(n: int, d: int, *, kind: str = "auto", memory_budget: str | int = "4G", train_size: int = 0,
                 on_disk: bool = False) -> IndexChoice:
    """Pick the index for n vectors of dim d under a memory budget.

    auto: `Flat` (exact) when n*d*4 bytes fit the budget and n <= 2M (and the lists are not asked on disk), else
    IVF-PQ: `IVF{nlist},PQ{m}` (`IVF{nlist}_HNSW32,PQ{m}` from HNSW_MIN_LISTS lists) with 8-bit codes, without
    OPQ (slow to train on CPU, not cloned to GPU as one index, little gain on normalized CLIP embeddings; pass
    e.g. 'OPQ64,IVF4096,PQ64' to have it). nlist = auto_nlist(n); train_size 0 = 39 vectors per list, else
    nlist is lowered until `train_size` gives 39 per list. m is the largest code size GPU IVF-PQ supports
    (<= 96), divides d and is <= d/8 whose codes fit the budget (in RAM) or, with on_disk, the largest such m.
    Sub-vectors of >= 8 dims: faiss's k-means is ~10x slower below 8 dims.
    """
    if n <= 0 or d <= 0:
        raise IndexSpecError(f"cannot build an index over {n} vectors of dim {d}; the pool is empty")
    budget = parse_memory(memory_budget)
    if kind == "auto":
        flat_bytes = n * d * 4
        kind = "flat" if flat_bytes <= budget and n <= FLAT_MAX_VECTORS and not on_disk else "ivfpq"
        log.info("kind=auto: %d x %d float32 = %s vs budget %s%s -> %s", n, d, human(flat_bytes), human(budget),
                 ", lists on disk" if on_disk else "", kind)
    if kind == "flat":
        if on_disk:
            raise IndexSpecError("--on-disk keeps IVF lists on disk; a flat index has none (it is memory-mapped "
                                 "when searched anyway): drop --on-disk, or use kind ivfpq")
        return IndexChoice("flat", "Flat", n * d * 4, "exact search (recall 1.0)")
    if kind == "ivfpq":
        return _ivfpq(n, d, budget, train_size, on_disk)
    match = re.search(r"IVF(\d+)", kind)
    nlist = int(match.group(1)) if match else 0
    wanted = train_size or (MIN_POINTS_PER_LIST * nlist if nlist else 100_000)
    n_train = min(n, max(wanted, 10_000) if "PQ" in kind and not train_size else wanted)  # PQ: 39 x 256 codes
    if nlist and n_train < nlist * MIN_POINTS_PER_LIST:
        raise IndexSpecError(f"'{kind}': the pool holds {n} vectors (training sample {n_train}) but IVF{nlist} "
                             f"needs >= {nlist * MIN_POINTS_PER_LIST} to train; use kind=flat, fewer lists, "
                             f"or a larger --train-size")
    if on_disk and not nlist:
        raise IndexSpecError(f"--on-disk keeps IVF lists on disk, but '{kind}' has none; use an IVF index")
    return IndexChoice("factory", kind, None, "depends on the factory string (measured below)", n_train, nlist)


def _ivfpq(n: int, d: int, budget: int, train_size: int, on_disk: bool) -> IndexChoice:
    nlist = auto_nlist(n)
    n_train = min(n, train_size or max(MIN_POINTS_PER_LIST * nlist, 10_000))
    if n_train < 1000:
        raise IndexSpecError(f"IVF-PQ needs at least 1000 training vectors; this pool has {n} "
                             f"(train_size {train_size}); use kind=flat (--kind flat) for so small a pool")
    nlist = min(nlist, 1 << int(math.log2(n_train / MIN_POINTS_PER_LIST)))
    quantizer = "_HNSW32" if nlist >= HNSW_MIN_LISTS else ""
    sizes = [m for m in GPU_PQ_M if d % m == 0 and m <= max(1, d // 8)]
    for m in sizes:
        mem = n * (m + ID_BYTES) + nlist * d * 4
        if on_disk or mem <= budget:
            where = "on disk" if on_disk else "in RAM"
            return IndexChoice("ivfpq", f"IVF{nlist}{quantizer},PQ{m}", mem, f"approximate: PQ{m} codes "
                               f"({4 * d // m}x smaller than float32) {where}, nlist {nlist}", n_train, nlist)
    smallest = n * (sizes[-1] + ID_BYTES) + nlist * d * 4
    raise IndexSpecError(f"memory budget {human(budget)} is too small for {n} vectors of dim {d}: even the "
                         f"smallest IVF-PQ needs ~{human(smallest)} in RAM; raise --memory-budget, or keep the "
                         f"lists on disk (--on-disk)")


def build_memory(choice: IndexChoice, n: int, d: int, batch_rows: int, on_disk: bool,
                 part_rows: int = 0) -> dict[str, int]:
    """The data a build holds at its peak, by part: the larger of the training phase (sample, k-means) and the add
    phase (the index in RAM, a batch in its three forms: as read, float32, normalized; a part being merged).
    The process itself (BASE_BYTES) comes on top."""
    quantizer = choice.nlist * d * 4 * (2 if choice.nlist >= HNSW_MIN_LISTS else 1)  # + HNSW links
    if choice.nlist and choice.factory.startswith("IVF"):  # k-means out of core (rakt/indexes/faiss_train.py)
        train = {"k-means chunk": KMEANS_CHUNK_ROWS * d * 4 * 3,
                 "k-means work": choice.nlist * d * 4 * 3 + choice.train_size * 12}
    else:
        train = {"training sample": (choice.train_size + RECALL_QUERIES) * d * 4,
                 "k-means work": choice.nlist * d * 4 * 2 + choice.train_size * 16}
    codes = choice.memory_bytes if choice.memory_bytes is not None else n * d * 4
    code_bytes = (codes - choice.nlist * d * 4) if choice.nlist else codes
    growth = 1 if choice.nlist and choice.factory.startswith("IVF") else LIST_GROWTH
    add = {"index in RAM": 0 if on_disk else int(code_bytes * growth),
           "add batches": min(batch_rows, n) * d * 4 * 3
           + (min(part_rows, n) * (code_bytes // max(n, 1)) * 2 if part_rows else 0)}
    phase = train if sum(train.values()) > sum(add.values()) else add
    return {"coarse quantizer": quantizer, **phase}


def check_budget(choice: IndexChoice, memory_budget: str | int, on_disk: bool) -> None:
    """Refuse, with the figures, a build whose peak (choice.memory) exceeds the budget."""
    budget = parse_memory(memory_budget)
    total = sum(choice.memory.values())
    if total <= budget:
        log.info("index build memory: ~%s of the %s budget at its peak (%s; the process itself ~%s on top)",
                 human(total), human(budget), ", ".join(f"{k} {human(v)}" for k, v in choice.memory.items()),
                 human(BASE_BYTES))
        return
    fixes = ["raise --memory-budget"]
    if "training sample" in choice.memory and choice.train_size > 100_000:
        fixes.append("lower --train-size")
    if not on_disk and choice.nlist:
        fixes.append("keep the lists on disk (--on-disk)")
    raise IndexSpecError(f"{choice.factory} cannot be built within --memory-budget {human(budget)}: it needs ~"
                         f"{human(total)} (" + ", ".join(f"{k} {human(v)}" for k, v in choice.memory.items())
                         + f"), plus ~{human(BASE_BYTES)} for the process itself; " + " or ".join(fixes))
