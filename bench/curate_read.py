"""Benchmark: reading candidates a rank window at a time, the access pattern of `rakt curate`, with pyarrow, DuckDB
and polars (each in its own process: wall time and peak RSS from /usr/bin/time).

Not a test. Writes a candidates.parquet as `rakt retrieve` does (QUERIES x K rows, each search batch's rows in
rank order, row groups of 65,536 rows), then each library reads every window of ~1M rows (whole ranks), sorted
the way selection takes them (rank, score desc, query_id, pool_id), into a pandas frame. DuckDB and polars are
not rakt dependencies: `pip install duckdb polars` to include them (missing ones are skipped).

    python bench/curate_read.py                     # 10,000 queries x k = 1,000: 1e7 rows
    python bench/curate_read.py --queries 100000    # 1e8 rows (~2.4 GB of parquet)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([("query_id", pa.string()), ("query_label", pa.int64()), ("rank", pa.int32()),
                    ("pool_id", pa.int64()), ("score", pa.float32())])
LIBRARIES = ("pyarrow", "duckdb", "polars")


def write_candidates(path: Path, queries: int, k: int, batch: int = 4096) -> None:
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for begin in range(0, queries, batch):
            n = min(batch, queries - begin)
            rank = np.repeat(np.arange(k, dtype=np.int32), n)  # rank-major, as retrieve writes a batch
            q = np.tile(np.arange(begin, begin + n), k)
            score = (1 - rank / k - rng.random(n * k) * 1e-3).astype(np.float32)
            table = pa.table({"query_id": pa.array([f"q{i:07d}" for i in q]), "query_label": pa.array(q % 10),
                              "rank": pa.array(rank), "pool_id": pa.array(rng.integers(0, 10**8, n * k)),
                              "score": pa.array(score)}, schema=SCHEMA)
            writer.write_table(table, row_group_size=65_536)


def windows(k: int, queries: int, rows: int = 1_000_000) -> list[tuple[int, int]]:
    step = max(1, rows // queries)
    return [(lo, min(k, lo + step)) for lo in range(0, k, step)]


def read(library: str, path: str, k: int, queries: int) -> int:
    """Every window into pandas, sorted as selection takes rows; returns the rows read."""
    total = 0
    if library == "pyarrow":
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        dataset = ds.dataset(path, format="parquet")
        for lo, hi in windows(k, queries):
            table = dataset.to_table(filter=(pc.field("rank") >= lo) & (pc.field("rank") < hi))
            frame = table.to_pandas().sort_values(["rank", "score", "query_id", "pool_id"],
                                                  ascending=[True, False, True, True], kind="mergesort")
            total += len(frame)
    elif library == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.execute("SET threads TO 2; SET memory_limit = '2GB'")
        for lo, hi in windows(k, queries):
            frame = con.execute(f"SELECT * FROM read_parquet('{path}') WHERE rank >= {lo} AND rank < {hi} "
                                "ORDER BY rank, score DESC, query_id, pool_id").df()
            total += len(frame)
    elif library == "polars":
        import polars as pl

        for lo, hi in windows(k, queries):
            frame = (pl.scan_parquet(path).filter((pl.col("rank") >= lo) & (pl.col("rank") < hi))
                     .sort(["rank", "score", "query_id", "pool_id"], descending=[False, True, False, False])
                     .collect().to_pandas())
            total += len(frame)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--read", nargs=2, metavar=("LIBRARY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read:
        start = time.perf_counter()
        rows = read(args.read[0], args.read[1], args.k, args.queries)
        print(f"{rows} {time.perf_counter() - start:.2f}")
        return 0
    sys.path.insert(0, str(ROOT))
    from rakt.pipeline.device import device_name

    work = Path(tempfile.mkdtemp(prefix="rakt-curate-read-"))
    try:
        path = work / "candidates.parquet"
        start = time.perf_counter()
        write_candidates(path, args.queries, args.k)
        print(f"device: {device_name()}")
        print(f"# {args.queries * args.k:,} candidate rows ({path.stat().st_size / 2**20:,.0f} MiB) written in "
              f"{time.perf_counter() - start:.0f} s; windows of ~1M rows")
        print("| library | version | rows read | seconds | peak RSS MiB |\n|---|---|---:|---:|---:|")
        for library in LIBRARIES:
            try:
                version = __import__(library).__version__
            except ImportError:
                print(f"| {library} | not installed | | | |")
                continue
            out = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, __file__, "--queries", str(args.queries),
                                  "--k", str(args.k), "--read", library, str(path)], capture_output=True, text=True)
            rows, seconds = out.stdout.split()
            peak = int(out.stderr.strip().splitlines()[-1]) / 1024
            print(f"| {library} | {version} | {int(rows):,} | {float(seconds):.1f} | {peak:,.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
