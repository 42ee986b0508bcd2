"""Benchmark: exact search in PyTorch (fp16 flat on GPU) and faiss-gpu IVF-PQ, with the roofline beside each figure.

Not a test. On a GPU: a flat index of --sizes vectors (default 16M x 768, fp16: ~24.6 GB) searched by the torch
exact search (rakt/indexes/torch_search.py), and, when faiss-gpu imports and sees a GPU, IVF-PQ over --ivfpq-sizes
(default 100M, simulated from the same clustered random data). Without a GPU: the same code on the CPU at a small
size (200k x 512), beside faiss's CPU flat search. Data are clustered random unit vectors generated on the
device in chunks (regenerated, never held in fp32 at full size); recall@k is measured against exact fp32
search on a query subset. Roofline per query batch: bytes a batch must read (the database for a flat scan, the
probed PQ codes for IVF-PQ) / HBM bandwidth measured with a large device-to-device copy -> the floor time; the
flat scan also writes and re-reads a fp32 score tile (8 bytes per query x vector) and does 2*d flops per query
x vector: both floors are printed (measured matmul peak), and the binding one is marked.

    python bench/search_gpu.py                                  # GPU: 16M x 768 (+100M IVF-PQ with faiss-gpu)
    python bench/search_gpu.py --sizes 1000000,4000000 --dim 512 --queries 16384
    python bench/search_gpu.py --cpu                            # force the CPU run (200k x 512)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch

import faiss  # noqa: E402

from rakt.indexes.faiss_index import choose_index, prepare_ivfpq, recall_at, set_nprobe, to_gpu  # noqa: E402
from rakt.indexes.torch_search import TorchExactSearch, _block_scores, cuda_available  # noqa: E402
from rakt.pipeline.device import device_name  # noqa: E402

GPU_DEFAULTS = {"sizes": "16000000", "dim": 768, "queries": 32768, "batch": 8192, "ivfpq_sizes": "100000000"}
CPU_DEFAULTS = {"sizes": "200000", "dim": 512, "queries": 2048, "batch": 1024, "ivfpq_sizes": ""}


class Clustered:
    """Embedding-like unit vectors: clusters in a low-dimensional latent space lifted to `dim` dims (as in
    bench/search.py); chunk j is the same every time it is generated (seeded per chunk), so exact search can
    regenerate the database in fp32 instead of keeping it."""

    def __init__(self, dim: int, device: torch.device, seed: int, centers: int = 1000, latent: int = 32,
                 noise: float = 0.6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(centers, latent, generator=g).to(device)
        self.lift = torch.randn(latent, dim, generator=g).to(device)
        self.device, self.seed, self.noise = device, seed, noise

    def chunk(self, j: int, rows: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + j + 1)
        pick = torch.randint(0, len(self.centers), (rows,), generator=g, device=self.device)
        z = self.centers[pick] + self.noise * torch.randn(rows, self.centers.shape[1], generator=g, device=self.device)
        x = z @ self.lift
        return x / x.norm(dim=1, keepdim=True)

    def chunks(self, n: int, rows: int):
        """(begin, fp32 chunk) over n vectors."""
        for j, begin in enumerate(range(0, n, rows)):
            yield begin, self.chunk(j, min(rows, n - begin))

    def fill(self, n: int, dtype: torch.dtype, rows: int) -> torch.Tensor:
        out = torch.empty((n, self.lift.shape[1]), dtype=dtype, device=self.device)
        for begin, x in self.chunks(n, rows):
            out[begin:begin + len(x)] = x.to(dtype)
        return out

    def queries(self, m: int) -> np.ndarray:
        return self.chunk(10**7, m).cpu().numpy()  # a chunk index no database chunk uses


def exact_ids(data: Clustered, n: int, q: np.ndarray, k: int, rows: int) -> np.ndarray:
    """Exact fp32 top-k ids of `q` over the n generated vectors (regenerated chunk by chunk)."""
    qt = torch.from_numpy(q).to(data.device)
    best_v = best_i = None
    with torch.inference_mode():
        for begin, x in data.chunks(n, rows):
            v, i = torch.topk(qt @ x.T, min(k, len(x)), dim=1)
            i += begin
            if best_v is not None:
                v, pos = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
            best_v, best_i = v, i
    return best_i.cpu().numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy (read + write), best of 5."""
    nbytes = (4 if device.type == "cuda" else 1) * 2**30
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """flop/s of the search's own block matmul (half in, fp32 out on CUDA; fp32 on CPU), best of 3."""
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(4 * m, m, device=device).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            _block_scores(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * m * m * 4 * m / best


def describe_device(device: torch.device) -> str:
    text = f"{device_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(j) for j in range(torch.cuda.device_count())]
        text += f"; GPU: {len(names)} x {names[0]}"
        try:
            text += " (driver " + subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                 capture_output=True, text=True, timeout=10).stdout.split()[0] + ")"
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return text


def timed_batches(search, q: np.ndarray, k: int, batch: int, device: torch.device) -> tuple[np.ndarray, float]:
    """ids and seconds for searching q batch by batch (as `rakt retrieve` does), after one warm-up batch."""
    search(q[:batch], k)
    sync(device)
    ids = np.empty((len(q), k), np.int64)
    t = time.perf_counter()
    for begin in range(0, len(q), batch):
        ids[begin:begin + batch] = search(q[begin:begin + batch], k)[1]
    sync(device)
    return ids, time.perf_counter() - t


def roofline(row: dict, db_bytes: float, tile_bytes: float, flops: float, bw: float, peak: float) -> dict:
    """Floors (ms per query batch) from bytes read, score-tile traffic and flops; which one binds."""
    floors = {"read": db_bytes / bw, "tiles": tile_bytes / bw, "flops": flops / peak if flops else 0.0}
    row.update({f"floor_{key}_ms": v * 1e3 for key, v in floors.items()})
    row["bound"] = max(floors, key=floors.get)
    return row


def bench_flat(n: int, args: argparse.Namespace, data: Clustered, q: np.ndarray, bw: float, peak: float) -> list[dict]:
    device = data.device
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t = time.perf_counter()
    store = data.fill(n, dtype, args.chunk)
    sync(device)
    print(f"# flat n={n:,}: generated {n:,} x {args.dim} {dtype} on {device} in {time.perf_counter() - t:.1f} s",
          flush=True)
    exact = exact_ids(data, n, q[:args.exact_queries], args.k, args.chunk)
    search = TorchExactSearch(store, "ip", device=str(device), query_batch=args.batch)
    ids, secs = timed_batches(search.search, q, args.k, args.batch, device)
    batches = -(-len(q) // args.batch)
    elt = store.element_size()
    row = {"device": device.type, "method": f"torch exact ({str(dtype).split('.')[-1]})", "n": n, "nprobe": "-",
           "qps": len(q) / secs, "recall": recall_at(ids[:len(exact)], exact), "ms_batch": secs / batches * 1e3}
    rows = [roofline(row, n * args.dim * elt, 8.0 * args.batch * n, 2.0 * args.batch * n * args.dim, bw, peak)]
    if device.type == "cpu":  # faiss's CPU flat search on the same vectors: the baseline torch should match
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(store.float().numpy())
        ids, secs = timed_batches(flat.search, q, args.k, args.batch, device)
        row = {"device": "cpu", "method": "faiss Flat (fp32)", "n": n, "nprobe": "-", "qps": len(q) / secs,
               "recall": recall_at(ids[:len(exact)], exact), "ms_batch": secs / batches * 1e3}
        rows.append(roofline(row, n * args.dim * 4, 0.0, 2.0 * args.batch * n * args.dim, bw, peak))
        del flat
    del search, store
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_ivfpq(n: int, args: argparse.Namespace, data: Clustered, q: np.ndarray, bw: float) -> list[dict]:
    """IVF-PQ built and searched by faiss-gpu on one GPU (the factory `rakt index build --kind ivfpq` picks)."""
    choice = choose_index(n, args.dim, kind="ivfpq", memory_budget="1T", train_size=args.train_size)
    index = faiss.index_factory(args.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    prepare_ivfpq(index)
    gpu = to_gpu(index, ngpu=1)
    if gpu is None:
        print(f"# IVF-PQ n={n:,}: faiss cannot put {choice.factory} on GPU; skipped")
        return []
    t = time.perf_counter()
    gpu.train(data.chunk(10**7 + 1, min(n, args.train_size)).cpu().numpy())
    for _, x in data.chunks(n, args.chunk):
        gpu.add(x.cpu().numpy())
    print(f"# IVF-PQ n={n:,}: built {choice.factory} on GPU in {time.perf_counter() - t:.0f} s", flush=True)
    exact = exact_ids(data, n, q[:args.exact_queries], args.k, args.chunk)
    ivf = faiss.extract_index_ivf(index)
    nlist, m = ivf.nlist, ivf.pq.M
    rows = []
    for nprobe in args.nprobe:
        set_nprobe(gpu, nprobe)
        ids, secs = timed_batches(gpu.search, q, args.k, args.batch, data.device)
        row = {"device": "cuda", "method": f"faiss-gpu {choice.factory}", "n": n, "nprobe": nprobe,
               "qps": len(q) / secs, "recall": recall_at(ids[:len(exact)], exact),
               "ms_batch": secs / -(-len(q) // args.batch) * 1e3}
        rows.append(roofline(row, args.batch * nprobe * n / nlist * m, 0.0, 0.0, bw, 1.0))
    del gpu
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="", help="flat sizes, comma-separated (default: 16000000 on GPU, "
                                                    "200000 on CPU)")
    parser.add_argument("--dim", type=int, default=0, help="vector dimension (default: 768 on GPU, 512 on CPU)")
    parser.add_argument("--queries", type=int, default=0, help="queries timed (default: 32768 GPU, 2048 CPU)")
    parser.add_argument("--batch", type=int, default=0, help="queries per search call (default: 8192 GPU, 1024 CPU)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--exact-queries", type=int, default=1000, help="queries checked against exact fp32 search")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="flat storage dtype (auto: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--ivfpq-sizes", default=None, help="IVF-PQ sizes for faiss-gpu, comma-separated "
                                                            "(default: 100000000 on GPU; '' to skip)")
    parser.add_argument("--nprobe", default="16,64", help="IVF lists visited, comma-separated")
    parser.add_argument("--train-size", type=int, default=1_000_000, help="IVF-PQ training sample")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="rows generated per chunk")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is visible")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda:0" if cuda_available() and not args.cpu else "cpu")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    args.sizes = args.sizes or defaults["sizes"]
    args.dim, args.queries, args.batch = (args.dim or defaults["dim"], args.queries or defaults["queries"],
                                          args.batch or defaults["batch"])
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v]
    ivfpq_sizes = defaults["ivfpq_sizes"] if args.ivfpq_sizes is None else args.ivfpq_sizes
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"device: {describe_device(device)}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__} "
          f"({'faiss-gpu, ' + str(faiss_gpus) + ' GPU(s)' if faiss_gpus else 'no faiss GPU support'})")
    if device.type == "cpu":
        print("no GPU: running on CPU at a small size; on a GPU run `python bench/search_gpu.py`")
    bw = bandwidth(device)
    dtype = torch.float16 if device.type == "cuda" and args.dtype in ("auto", "fp16") else (
        torch.bfloat16 if device.type == "cuda" and args.dtype == "bf16" else torch.float32)
    peak = matmul_peak(device, dtype)
    print(f"measured: copy bandwidth {bw / 1e9:,.0f} GB/s, block matmul {peak / 1e12:,.2f} TFLOP/s ({dtype})")
    print(f"dim {args.dim}, {args.queries:,} queries in batches of {args.batch:,}, k {args.k}, recall vs exact fp32 "
          f"on {min(args.exact_queries, args.queries):,} queries", flush=True)
    data = Clustered(args.dim, device, args.seed)
    q = data.queries(args.queries)
    rows = []
    for n in (int(v) for v in args.sizes.split(",") if v):
        rows += bench_flat(n, args, data, q, bw, peak)
    if not (faiss_gpus and device.type == "cuda"):
        print("# IVF-PQ on GPU: skipped (faiss-gpu not installed or sees no GPU; CPU IVF-PQ: bench/search.py)")
    elif ivfpq_sizes:
        for n in (int(v) for v in ivfpq_sizes.split(",") if v):
            rows += bench_ivfpq(n, args, data, q, bw)
    print()
    print(f"| device | method | n | nprobe | QPS | recall@{args.k} | ms / batch of {args.batch:,} | floor: bytes read | "
          f"floor: score tiles | floor: flops | bound by |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['device']} | {r['method']} | {r['n']:,} | {r['nprobe']} | {r['qps']:,.0f} | {r['recall']:.3f} | "
              f"{r['ms_batch']:,.1f} | {r['floor_read_ms']:,.2f} | {r['floor_tiles_ms']:,.2f} | "
              f"{r['floor_flops_ms']:,.2f} | {r['bound']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
