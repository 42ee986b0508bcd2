"""Benchmark: index build, retrieve and curate at web-scale pool sizes, through the real CLI, each in its own process.

Not a test. For each N it writes a synthetic clustered embedding set (rakt's own format, float16 by default, part
files of 100,000 rows) and a matching query set, then runs

  build       rakt index build SET --kind ivfpq                        (lists in RAM)
  build-disk  rakt index build SET --kind ivfpq --on-disk              (lists on disk, built in parts)
  retrieve    rakt retrieve QUERIES --index (on-disk index) --k K      (QUERIES x K candidates)
  curate      rakt curate CANDIDATES --budget B --balance class --near-dup 0.98 (+ the leakage guard)
  dtype       the same pool as float32 too, both indexed flat (exact): recall@10 of the float16 set's neighbours
              against the float32 set's, for the queries (run at the smallest N only)

and prints wall time, peak RSS (the kernel's high-water mark of the process, as /usr/bin/time reports it: it
counts pages of memory-mapped files too), peak anonymous RSS (sampled every 0.1 s: memory the process owns,
without mapped index files, which the kernel can drop), and the growth of each against the smallest N. Every
file it writes is deleted when a size is done (--keep keeps them).

    python bench/scale.py                                  # 250k, 1M, 4M, 16M x 512 (~2.5 h on 2 cores)
    python bench/scale.py --sizes 250000,1000000 --stages build,build-disk
    python bench/scale.py --sizes 1000000 --engine ray      # the same stages with the add step on a local Ray
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rakt.pipeline.formats import embedding_table, write_embedding_part  # noqa: E402

STAGES = ("build", "build-disk", "retrieve", "curate", "dtype")
PART_ROWS = 100_000


class Clusters:
    """Embedding-like unit vectors: clusters in a low-dimensional latent space, lifted to `dim` dims (image
    embeddings have a low intrinsic dimension; isotropic noise in all dims would make every neighbour equally
    far). The same clusters give the pool and the queries."""

    def __init__(self, dim: int, centers: int = 2000, latent: int = 64, noise: float = 0.6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((centers, latent), dtype=np.float32)
        self.lift = rng.standard_normal((latent, dim), dtype=np.float32)
        self.noise = noise

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        which = rng.integers(0, len(self.centers), n)
        z = self.centers[which] + self.noise * rng.standard_normal((n, self.centers.shape[1]), dtype=np.float32)
        x = z @ self.lift
        return x / np.linalg.norm(x, axis=1, keepdims=True), which


def write_set(path: Path, n: int, clusters: Clusters, seed: int, dtype: str, split: str, labels: bool) -> float:
    """An embedding set of n vectors in part files of PART_ROWS rows; returns the seconds it took."""
    start = time.perf_counter()
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for j, begin in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - begin)
        x, which = clusters.draw(m, rng)
        ids = [f"{split}{i:09d}" for i in range(begin, begin + m)]
        extra = {"url": pa.array([f"http://pool.example/{i}.jpg" for i in ids])} if split == "pool" else None
        table = embedding_table(ids, (which % 10).tolist() if labels else [None] * m, [split] * m, x, extra, dtype)
        write_embedding_part(path / f"part-{j:05d}.parquet", table)
    meta = {"model": "synthetic:clusters", "dim": clusters.lift.shape[1], "count": n, "normalized": True,
            "dtype": dtype, "classes": [str(c) for c in range(10)] if labels else None}
    (path / "embeddings.json").write_text(json.dumps(meta))
    return time.perf_counter() - start


def run_stage(args: list[str], log: Path) -> dict:
    """Run `rakt ARGS` in its own process under /usr/bin/time: wall seconds, peak RSS (GNU time's %M: the
    process's own high-water mark; this process's wait4 would count its own memory at fork), peak anonymous RSS
    (sampled every 0.1 s), exit code."""
    env = {**os.environ, "RAKT_PROGRESS_SECONDS": "60"}
    peak_file = log.with_suffix(".maxrss")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), sys.executable, "-m",
                                 "rakt.cli", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_anon = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                try:
                    child = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    status = Path(f"/proc/{child[0]}/status").read_text() if child else ""
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        rc = proc.wait()
        done.set()
        watcher.join()
    rss = int(peak_file.read_text().split()[-1]) * 1024 if peak_file.exists() else 0
    return {"seconds": time.perf_counter() - start, "rss": rss, "anon": peak_anon[0], "rc": rc}


def summary(log: Path) -> dict:
    """The JSON summary a rakt command prints last."""
    text = log.read_text()
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def bench_size(n: int, args: argparse.Namespace, clusters: Clusters) -> list[dict]:
    work = Path(args.work) / f"n{n}"
    written = work / ".sets-written"  # the three sets are complete (--keep --reuse reads them again)
    reuse = args.reuse and written.exists() and json.loads(written.read_text()) == set_key(n, args)
    rows = []
    try:
        if reuse:
            for old in ("ram", "disk", "candidates", "manifest"):
                shutil.rmtree(work / old, ignore_errors=True)
            secs, verb = 0.0, "reused"
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            secs = write_set(work / "pool", n, clusters, seed=n, dtype=args.dtype, split="pool", labels=False)
            write_set(work / "queries", args.queries, clusters, seed=1, dtype="float32", split="train", labels=True)
            write_set(work / "eval", 1000, clusters, seed=2, dtype="float32", split="test", labels=True)
            written.write_text(json.dumps(set_key(n, args)))
            verb = "wrote"
        disk = sum(p.stat().st_size for p in (work / "pool").glob("*.parquet"))
        print(f"# n={n:,}: {verb} the {args.dtype} set ({disk / 2**30:.2f} GiB) in {secs:.0f} s", flush=True)
        engine = ["--engine", args.engine] if args.engine != "local" else []
        commands = {
            "build": ["index", "build", str(work / "pool"), "--kind", "ivfpq", *engine, "--out", str(work / "ram")],
            "build-disk": ["index", "build", str(work / "pool"), "--kind", "ivfpq", "--on-disk", *engine,
                           "--out", str(work / "disk")],
            "retrieve": ["retrieve", str(work / "queries"), "--index", str(work / "disk"), "--k", str(args.k),
                         "--out", str(work / "candidates")],
            "curate": ["curate", str(work / "candidates"), "--budget", str(args.budget), "--balance", "class",
                       "--near-dup", "0.98", "--eval-embeddings", str(work / "eval"), "--out", str(work / "manifest")],
        }
        for stage in args.stages:
            if stage == "dtype":
                if n == min(args.sizes_list):
                    rows.append(dtype_recall(work, n, clusters, args))
                continue
            if stage == "retrieve" and not (work / "disk" / "index.json").exists():
                commands["retrieve"][4] = str(work / "ram")
            result = run_stage(commands[stage], work / f"{stage}.log")
            info = summary(work / f"{stage}.log")
            row = {"n": n, "stage": stage, **result, "info": info}
            rows.append(row)
            print(f"# n={n:,} {stage}: {result['seconds']:.0f} s, peak RSS {result['rss'] / 2**30:.2f} GiB, "
                  f"anon {result['anon'] / 2**30:.2f} GiB, rc {result['rc']}"
                  + (f", {info.get('factory')} recall@10 {info.get('recall_at_10')}" if "build" in stage else ""),
                  flush=True)
            if result["rc"] != 0:
                print((work / f"{stage}.log").read_text()[-3000:], flush=True)
                break
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def set_key(n: int, args: argparse.Namespace) -> dict:
    """What the written sets depend on: a kept set is reused only when all of it matches."""
    return {"n": n, "dim": args.dim, "dtype": args.dtype, "queries": args.queries}


def dtype_recall(work: Path, n: int, clusters: Clusters, args: argparse.Namespace) -> dict:
    """recall@10 of exact search over the pool stored as float16 against the same pool stored as float32."""
    from rakt.indexes.faiss_index import FaissIndex
    from rakt.indexes.faiss_ops import recall_at
    from rakt.pipeline.formats import EmbeddingParts, embedding_matrix

    write_set(work / "pool32", n, clusters, seed=n, dtype="float32", split="pool", labels=False)
    for name in ("pool", "pool32"):
        result = run_stage(["index", "build", str(work / name), "--kind", "flat", "--memory-budget", "16G",
                            "--out", str(work / f"flat-{name}")], work / f"flat-{name}.log")
        if result["rc"] != 0:
            raise RuntimeError((work / f"flat-{name}.log").read_text()[-2000:])
    queries = np.concatenate([embedding_matrix(b) for b in EmbeddingParts(work / "queries").batches(["embedding"])])
    found = {name: FaissIndex.open(work / f"flat-{name}").search(queries, 10)[1] for name in ("pool", "pool32")}
    recall = recall_at(found["pool"], found["pool32"])
    sizes = {name: sum(p.stat().st_size for p in (work / name).glob("*.parquet")) for name in ("pool", "pool32")}
    print(f"# n={n:,} dtype: recall@10 of the {args.dtype} set against float32, exact search: {recall:.4f}; "
          f"set on disk {sizes['pool'] / 2**30:.2f} vs {sizes['pool32'] / 2**30:.2f} GiB", flush=True)
    return {"n": n, "stage": "dtype", "recall": recall, "sizes": sizes}


def table(rows: list[dict]) -> str:
    first = {}
    for r in rows:
        first.setdefault(r["stage"], r)
    lines = ["| stage | N | wall s | x time | peak RSS GiB | x RSS | peak anon GiB | x anon | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["stage"] == "dtype":
            lines.append(f"| dtype | {r['n']:,} | | | | | | | recall@10 {r['recall']:.4f} against the float32 "
                         f"set (exact search); {r['sizes']['pool'] / 2**30:.2f} GiB vs "
                         f"{r['sizes']['pool32'] / 2**30:.2f} GiB on disk |")
            continue
        f = first[r["stage"]]
        info = r["info"]
        note = (f"{info.get('factory')}, recall@10 {info.get('recall_at_10')}" if "build" in r["stage"]
                else f"{info.get('n_candidates', '')} candidates" if r["stage"] == "retrieve"
                else f"{info.get('selected', '')} selected" if r["stage"] == "curate" else "")
        failed = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        lines.append(f"| {r['stage']} | {r['n']:,} | {r['seconds']:.0f} | {r['seconds'] / f['seconds']:.2f} | "
                     f"{r['rss'] / 2**30:.2f} | {r['rss'] / f['rss']:.2f} | {r['anon'] / 2**30:.2f} | "
                     f"{r['anon'] / max(f['anon'], 1):.2f} | {note}{failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="250000,1000000,4000000,16000000", help="pool sizes, comma-separated")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="the pool set's dtype")
    parser.add_argument("--queries", type=int, default=10_000, help="query vectors (10 labels)")
    parser.add_argument("--k", type=int, default=1000, help="neighbours per query")
    parser.add_argument("--budget", type=int, default=100_000, help="curate's transfer-set size (10 per query)")
    parser.add_argument("--engine", default="local", choices=("local", "ray"))
    parser.add_argument("--work", default="/tmp/rakt-scale", help="where the sets and outputs go (deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the files of each size")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: read a size's sets again when an earlier --keep run wrote them")
    args = parser.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
    from rakt.pipeline.device import device_name

    print(f"device: {device_name()}; {os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable; "
          f"memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    print(f"engine {args.engine}, dim {args.dim}, pool dtype {args.dtype}, {args.queries} queries x k={args.k}, "
          f"budget {args.budget}", flush=True)
    clusters = Clusters(args.dim)
    rows = []
    args.sizes_list = [int(v) for v in args.sizes.split(",")]
    for n in args.sizes_list:
        rows += bench_size(n, args, clusters)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
