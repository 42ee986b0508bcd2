"""Exact top-k search in PyTorch: blocked matmul + `torch.topk` per block, merged as it goes.

Why: faiss-gpu needs CUDA 12 builds that are not available everywhere, while any CUDA machine with torch can
scan a flat index. The database lives as a tensor (fp16/bf16 on CUDA, fp32 on CPU), split by rows across the
visible GPUs when it does not fit one. A search walks query batches x database blocks: scores of a block
(`q @ x.T`, fp32 output where torch allows), its top-k, then top-k of (running top-k ++ block top-k). Per-shard
results are merged on the first device. l2 uses ||x||^2 - 2 q.x with the database norms precomputed (in fp32,
from the stored vectors) and adds ||q||^2 at the end. Results come back ordered by score, ties by lower id.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rakt.indexes.base import IndexSpecError

log = logging.getLogger("rakt.indexes")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BLOCK_ROWS = 16_384  # database rows per block on CPU: a 1024 x 16k fp32 score tile is 64 MiB
CPU_QUERY_BATCH = 1024
GPU_QUERY_BATCH = 8192  # past ~1k queries a flat scan is compute-bound; larger batches only grow score tiles
LOAD_CHUNK_ROWS = 1 << 18  # rows copied host -> device at a time (no full-size staging copy)
WORKSPACE_FRACTION = 0.5  # share of the free GPU memory (at search time) that score tiles may use
TILE_MAX_ELEMENTS = 1 << 30  # score tile cap (4 GiB fp32): stays clear of 32-bit indexing limits in kernels
GPU_RESERVE_FRACTION = 0.15  # share of each GPU's free memory kept for score tiles when placing the database
_mm_out_dtype_ok: dict[torch.dtype, bool] = {}  # input dtype -> torch.mm(..., out_dtype=float32) works on CUDA


@dataclass
class _Shard:
    x: torch.Tensor  # [rows, d] stored vectors
    norms: torch.Tensor | None  # [rows] fp32 squared norms (l2 only)
    offset: int  # global id of row 0


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError:  # a broken driver install: treat as no GPU
        return False


def _devices(device: str | Sequence[str] | None) -> list[torch.device]:
    """'auto' / None: every visible GPU, else the CPU; 'cuda': every visible GPU; or explicit device names."""
    if device is None or device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if isinstance(device, str):
        if device == "cuda":
            if not cuda_available():
                raise IndexSpecError("torch search on 'cuda' asked for, but torch sees no CUDA GPU; use 'cpu'")
            return [torch.device("cuda", j) for j in range(torch.cuda.device_count())]
        device = [device]
    out = [torch.device(d) for d in device]
    if any(d.type == "cuda" for d in out) and not cuda_available():
        raise IndexSpecError(f"torch search on {device} asked for, but torch sees no CUDA GPU; use 'cpu'")
    if len({d.type for d in out}) != 1 or (out[0].type == "cpu" and len(out) > 1):
        raise IndexSpecError(f"torch search devices must be one CPU or CUDA devices only, got {device}")
    return [torch.device("cuda", d.index or 0) if d.type == "cuda" else d for d in out]


def _free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what torch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _human(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


class TorchExactSearch:
    """Exact top-k over database vectors held as torch tensors, on CPU or one or several CUDA devices."""

    def __init__(self, vectors: np.ndarray | torch.Tensor, metric: str = "ip", *,
                 device: str | Sequence[str] | None = "auto", dtype: str = "auto", block_rows: int = 0,
                 query_batch: int = 0) -> None:
        """`vectors` [n, d] (numpy, possibly memory-mapped, or a tensor); dtype auto: fp16 on CUDA, fp32 on CPU.

        On CPU with fp32 a float32 C-contiguous numpy array is used in place (not copied). block_rows and
        query_batch 0 mean automatic (from free GPU memory at search time; fixed sizes on CPU).
        """
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if getattr(vectors, "ndim", 0) != 2:
            raise ValueError(f"vectors must be [n, d], got shape {getattr(vectors, 'shape', None)}")
        self.metric = metric
        self.size, self.dim = int(vectors.shape[0]), int(vectors.shape[1])
        self.devices = _devices(device)
        on_cuda = self.devices[0].type == "cuda"
        if dtype == "auto":
            dtype = "fp16" if on_cuda else "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.block_rows, self.query_batch = int(block_rows), int(query_batch)
        self._owner: object = None  # keeps memory alive that `vectors` views (e.g. a faiss index's codes)
        self._shards = self._place(vectors)
        where = ", ".join(f"{s.x.device}: {len(s.x):,} rows" for s in self._shards)
        log.info("torch exact search: %d x %d %s (%s), metric %s", self.size, self.dim, dtype, where, metric)

    @classmethod
    def from_faiss(cls, index: object, **kwargs) -> "TorchExactSearch":
        """From a faiss flat index (IndexFlatIP / IndexFlatL2), reading its stored vectors without a copy."""
        import faiss

        flat = faiss.downcast_index(index)
        if not isinstance(flat, faiss.IndexFlat):
            raise IndexSpecError(f"the torch backend searches flat indexes exactly; {type(flat).__name__} is not "
                                 f"flat (IVF-PQ and other compressed indexes): search it with the faiss backend")
        metrics = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}
        if flat.metric_type not in metrics:
            raise IndexSpecError(f"the torch backend supports metrics ip and l2, not faiss metric {flat.metric_type}")
        n, d = flat.ntotal, flat.d
        xb = (faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32))
        search = cls(xb, metrics[flat.metric_type], **kwargs)
        search._owner = (index, flat)
        return search

    # --- placement -------------------------------------------------------------------------------------

    def _rows_per_device(self, vectors: np.ndarray | torch.Tensor) -> list[int]:
        """Rows for each device: all on the first when it has room, else split in proportion to free memory."""
        first = self.devices[0]
        if first.type == "cpu" or (isinstance(vectors, torch.Tensor) and vectors.device == first
                                   and vectors.dtype == self.dtype):  # already there: used in place
            return [self.size] + [0] * (len(self.devices) - 1)
        row_bytes = self.dim * torch.empty((), dtype=self.dtype).element_size() + (4 if self.metric == "l2" else 0)
        room = [int(_free_bytes(dev) * (1 - GPU_RESERVE_FRACTION)) // row_bytes for dev in self.devices]
        need = self.size
        if need <= room[0]:
            return [need] + [0] * (len(room) - 1)
        if need > sum(room):
            raise IndexSpecError(
                f"{need:,} x {self.dim} vectors need {_human(need * row_bytes)} of GPU memory in "
                f"{str(self.dtype).split('.')[-1]}; {len(room)} GPU(s) have {_human(sum(room) * row_bytes)} free to "
                f"hold them: use fewer/smaller parts, dtype fp16, or the faiss backend (IVF-PQ on GPU, or CPU)")
        rows = [need * r // sum(room) for r in room]
        rows[0] += need - sum(rows)
        return rows

    def _place(self, vectors: np.ndarray | torch.Tensor) -> list[_Shard]:
        shards, begin = [], 0
        for dev, rows in zip(self.devices, self._rows_per_device(vectors)):
            if rows == 0:
                continue
            x = self._to_device(vectors, begin, begin + rows, dev)
            norms = None
            if self.metric == "l2":  # norms of the stored (rounded) vectors, so distances are consistent
                norms = torch.cat([x[c:c + LOAD_CHUNK_ROWS].float().pow(2).sum(1)
                                   for c in range(0, rows, LOAD_CHUNK_ROWS)])
            shards.append(_Shard(x, norms, begin))
            begin += rows
        if not shards:  # an empty database: one empty shard keeps search's shape logic simple
            shards.append(_Shard(torch.zeros((0, self.dim), dtype=self.dtype, device=self.devices[0]),
                                 torch.zeros(0, device=self.devices[0]) if self.metric == "l2" else None, 0))
        return shards

    def _to_device(self, vectors: np.ndarray | torch.Tensor, begin: int, end: int, dev: torch.device) -> torch.Tensor:
        """Rows [begin, end) as a `self.dtype` tensor on `dev`, copied chunk by chunk (in place when possible)."""
        if isinstance(vectors, torch.Tensor):
            src = vectors[begin:end]
            if src.device == dev and src.dtype == self.dtype and src.is_contiguous():
                return src
        elif dev.type == "cpu" and self.dtype == torch.float32:
            src = vectors[begin:end]
            if isinstance(src, np.ndarray) and src.dtype == np.float32 and src.flags.c_contiguous:
                return torch.from_numpy(src)  # no copy: the caller's (or faiss's, or a mmap's) memory
        out = torch.empty((end - begin, self.dim), dtype=self.dtype, device=dev)
        for c in range(begin, end, LOAD_CHUNK_ROWS):
            chunk = vectors[c:min(end, c + LOAD_CHUNK_ROWS)]
            if not isinstance(chunk, torch.Tensor):
                chunk = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
            out[c - begin:c - begin + len(chunk)].copy_(chunk)
        return out

    # --- search ----------------------------------------------------------------------------------------

    def _sizes(self, shard: _Shard, n_queries: int) -> tuple[int, int]:
        """(query batch, block rows) for a shard: fixed on CPU, from free memory at search time on CUDA."""
        dev = shard.x.device
        qb = self.query_batch or (CPU_QUERY_BATCH if dev.type == "cpu" else GPU_QUERY_BATCH)
        qb = max(1, min(qb, n_queries))
        if self.block_rows:
            return qb, self.block_rows
        if dev.type == "cpu":
            return qb, CPU_BLOCK_ROWS
        # per row of a block: the fp32 score column (x qb) plus topk's and the l2 update's temporaries (~x3)
        budget = _free_bytes(dev) * WORKSPACE_FRACTION
        rows = min(int(budget // (qb * 4 * 3)), TILE_MAX_ELEMENTS // qb)
        return qb, min(max(1024, rows // 256 * 256), max(len(shard.x), 1))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k: (scores float32 [n, k], ids int64 [n, k]), best first, ties by lower id."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got shape {q.shape}")
        if k < 1 or k > self.size:
            raise ValueError(f"k must be in [1, {self.size}] (the number of database vectors), got {k}")
        scores = np.empty((len(q), k), np.float32)
        ids = np.empty((len(q), k), np.int64)
        qb = min(self._sizes(s, len(q))[0] for s in self._shards)
        with torch.inference_mode():
            for begin in range(0, len(q), qb):
                s, i = self._search_batch(torch.from_numpy(q[begin:begin + qb]), k)
                scores[begin:begin + len(s)], ids[begin:begin + len(s)] = s, i
        return scores, ids

    def _search_batch(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query batch over every shard (kernels queued on all devices before any result is read)."""
        largest = self.metric == "ip"
        home = self._shards[0].x.device
        partial = []
        for shard in self._shards:
            if len(shard.x) == 0:
                continue
            dev = shard.x.device
            qd = q.to(dev, non_blocking=True)
            if dev.type == "cuda":
                qd = qd.to(self.dtype)  # CPU keeps fp32 queries: blocks are upcast there (see _block_scores)
            _, block = self._sizes(shard, len(q))
            best_v = best_i = None
            for b0 in range(0, len(shard.x), block):
                s = _block_scores(qd, shard.x[b0:b0 + block])
                if shard.norms is not None:  # l2 key: ||x||^2 - 2 q.x (||q||^2 is added at the end)
                    s.mul_(-2).add_(shard.norms[b0:b0 + block])
                v, i = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest, sorted=False)
                i += b0 + shard.offset
                if best_v is not None:
                    v, i = _topk_merge(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k, largest)
                best_v, best_i = v, i
            partial.append((best_v.to(home, non_blocking=True), best_i.to(home, non_blocking=True)))
        v = torch.cat([p[0] for p in partial], 1)
        i = torch.cat([p[1] for p in partial], 1)
        v, i = _topk_merge(v, i, k, largest) if v.shape[1] > k else (v, i)
        v, i = _order(v, i, largest)
        if not largest:
            v = (v + q.to(home).float().pow(2).sum(1, keepdim=True)).clamp_min_(0)
        return v.float().cpu().numpy(), i.cpu().numpy()

    def info(self) -> dict:
        """Where the vectors live and in which dtype."""
        return {"backend": "torch", "dtype": str(self.dtype).split(".")[-1], "size": self.size, "dim": self.dim,
                "metric": self.metric, "devices": [f"{s.x.device}: {len(s.x)}" for s in self._shards]}


def _block_scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q @ x.T as fp32 [nq, rows]: fp16/bf16 matmul with fp32 output on CUDA where torch allows; on CPU the
    block is upcast to fp32 (exact scores of the stored vectors; CPU half matmuls round their output)."""
    if x.dtype == torch.float32:
        return q.float() @ x.T
    if x.device.type != "cuda":
        return q.float() @ x.float().T
    if _mm_out_dtype_ok.get(x.dtype, True):
        try:
            return torch.mm(q, x.T, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _mm_out_dtype_ok[x.dtype] = False
            log.warning("torch %s has no fp32-output half matmul (%s); scores are rounded to %s before top-k, which "
                        "can swap near-tied neighbours", torch.__version__, str(e).splitlines()[0][:80], x.dtype)
    return (q @ x.T).float()


def _topk_merge(v: torch.Tensor, i: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of candidate (scores, ids) pairs along dim 1."""
    v, pos = torch.topk(v, min(k, v.shape[1]), dim=1, largest=largest, sorted=False)
    return v, torch.gather(i, 1, pos)


def _order(v: torch.Tensor, i: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score (best first), equal scores by lower id: two stable sorts."""
    pos = torch.argsort(i, dim=1, stable=True)
    v, i = torch.gather(v, 1, pos), torch.gather(i, 1, pos)
    pos = torch.argsort(v, dim=1, descending=largest, stable=True)
    return torch.gather(v, 1, pos), torch.gather(i, 1, pos)
