"""Benchmark: QPS and recall@k of flat vs IVF-PQ (several nprobe) on clustered random unit vectors.

Not a test: prints the device, faiss version and threads, then a markdown table. The IVF-PQ factory is the one
`rakt index build --kind ivfpq` would pick for that size and memory budget (indexes.faiss_index.choose_index).
Recall is measured against the flat index's exact results.

    python bench/search.py                       # 100k and 1M x 512, ~1-2 min on 2 CPU cores
    python bench/search.py --sizes 10000 --dim 256 --nprobe 1,8,32
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import faiss
import numpy as np

from rakt.indexes.faiss_index import choose_index, prepare_ivfpq, recall_at, set_nprobe, to_gpu  # noqa: E402
from rakt.pipeline.device import device_name  # noqa: E402


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray, lift: np.ndarray, noise: float = 0.6,
              chunk: int = 100_000) -> np.ndarray:
    """Embedding-like unit vectors: clusters in a low-dimensional latent space, lifted to d dims by `lift`.

    Isotropic noise in all d dims would make every neighbour equally far (no index could find them); image
    embeddings have a low intrinsic dimension, which the latent space imitates. Generated in chunks.
    """
    out = np.empty((n, lift.shape[1]), np.float32)
    for begin in range(0, n, chunk):
        m = min(chunk, n - begin)
        z = centers[rng.integers(0, len(centers), m)] + noise * rng.standard_normal((m, centers.shape[1]),
                                                                                    dtype=np.float32)
        x = z @ lift
        out[begin:begin + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def device() -> str:
    import torch

    text = device_name(torch.device("cpu"))
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu:
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            names = []
        text += f"; GPU: {ngpu} x {names[0] if names else 'unknown'}"
    return text


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, len(queries) / (time.perf_counter() - start)


def bench_size(n: int, args: argparse.Namespace, rng: np.random.Generator, centers: np.ndarray,
               lift: np.ndarray) -> list[dict]:
    t0 = time.perf_counter()
    xb = clustered(n, rng, centers, lift)
    xq = clustered(args.queries, rng, centers, lift)
    print(f"# n={n}: generated data in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    build = time.perf_counter() - start
    search_flat = to_gpu(flat) if args.gpu else None
    exact, qps = timed_search(search_flat or flat, xq, args.k)
    rows.append({"n": n, "index": "Flat", "nprobe": "-", "build_s": build, "qps": qps, "recall": 1.0,
                 "bytes": n * args.dim * 4})
    del flat, search_flat
    choice = choose_index(n, args.dim, kind="ivfpq", memory_budget=args.memory_budget, train_size=args.train_size)
    start = time.perf_counter()
    index = faiss.index_factory(args.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    prepare_ivfpq(index)  # the training settings rakt's builder uses
    work = to_gpu(index, ngpu=1) if args.gpu else None
    work = work or index
    work.train(xb[np.sort(rng.choice(n, min(n, args.train_size), replace=False))])
    work.add(xb)
    build = time.perf_counter() - start
    print(f"# n={n}: built {choice.factory} in {build:.1f} s", flush=True)
    for nprobe in args.nprobe:
        set_nprobe(work, nprobe)
        ids, qps = timed_search(work, xq, args.k)
        rows.append({"n": n, "index": choice.factory, "nprobe": nprobe, "build_s": build, "qps": qps,
                     "recall": recall_at(ids, exact), "bytes": choice.memory_bytes})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="pool sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension")
    parser.add_argument("--queries", type=int, default=500, help="query vectors (from the same distribution)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--nprobe", default="4,16,64", help="IVF lists visited, comma-separated")
    parser.add_argument("--train-size", type=int, default=20_000, help="training sample for IVF-PQ")
    parser.add_argument("--memory-budget", default="4G", help="budget deciding the PQ code size")
    parser.add_argument("--centers", type=int, default=1000, help="clusters in the synthetic data")
    parser.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the synthetic data")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="search on GPU (default: when faiss-gpu sees a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.gpu is None:
        args.gpu = (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.centers, args.latent), dtype=np.float32)
    lift = rng.standard_normal((args.latent, args.dim), dtype=np.float32)
    print(f"device: {device()}")
    print(f"faiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}, search on {'GPU' if args.gpu else 'CPU'}")
    print(f"dim {args.dim}, queries {args.queries}, k {args.k}, train_size {args.train_size}, "
          f"memory budget {args.memory_budget}, "
          f"{args.centers} clusters in {args.latent} latent dims")
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        rows += bench_size(n, args, rng, centers, lift)
    print()
    print(f"| n | index | nprobe | build s | QPS | recall@{args.k} | index bytes |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['index']} | {r['nprobe']} | {r['build_s']:.1f} | {r['qps']:,.0f} | "
              f"{r['recall']:.3f} | {r['bytes'] / 2**20:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
