"""Candidate rows a rank window at a time: curation never holds all candidates in memory.

Selection is greedy rank by rank, so it can read the candidates in windows of whole ranks, in order, and stop once
every slot is taken. `CandidateWindows` reads candidates.parquet so (pyarrow's dataset filter: with retrieve's
rank-sorted row groups a window reads only the groups that hold its ranks); `Spill` keeps what the candidate rules
kept on disk in the same windows, read back for each selection pass. Why pyarrow: bench/curate_read.py measures it
against DuckDB and polars on this access pattern (docs/scale.md), and it is a dependency already.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from rakt.pipeline.formats import CANDIDATE_COLUMNS
from rakt.pipeline.io import InputError

WINDOW_ROWS = 1_000_000  # candidate rows per window (a rank holding more is one window alone)
ORDER = (["rank", "score", "query_id", "pool_id"], [True, False, True, True])  # the order selection takes rows in
DTYPES = {"query_id": str, "query_label": "Int64", "rank": "int64", "pool_id": "int64", "score": "float32"}


def candidate_frame(table: pa.Table) -> pd.DataFrame:
    """Candidate rows as a frame with the contract's dtypes, in selection order, each (query, pool image) once."""
    frame = table.to_pandas().astype({k: v for k, v in DTYPES.items() if k in table.column_names})
    frame = frame.sort_values(ORDER[0], ascending=ORDER[1], kind="mergesort")
    return frame.drop_duplicates(["query_id", "pool_id"], keep="first").reset_index(drop=True)


class CandidateWindows:
    """candidates.parquet as consecutive windows of whole ranks (~WINDOW_ROWS rows each), in rank order."""

    def __init__(self, path: Path, window_rows: int | None = None) -> None:
        self.path = path
        if not path.exists():
            raise InputError(f"{path}: candidates not found; run `rakt retrieve ... --out {path.parent}` first")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable parquet file ({e}); delete it and rerun "
                             f"`rakt retrieve ... --out {path.parent}`") from None
        missing = [c for c in CANDIDATE_COLUMNS if c not in schema.names]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                             f"{', '.join(CANDIDATE_COLUMNS)} (rerun `rakt retrieve`)")
        per_rank = np.zeros(0, np.int64)
        for batch in self._batches(["rank"]):
            ranks = batch.column("rank").to_numpy(zero_copy_only=False).astype(np.int64)
            if len(ranks) and ranks.min() < 0:
                raise InputError(f"{path}: negative rank {int(ranks.min())}; rerun `rakt retrieve`")
            counts = np.bincount(ranks)
            per_rank = np.pad(per_rank, (0, max(0, len(counts) - len(per_rank)))) + np.pad(
                counts, (0, max(0, len(per_rank) - len(counts))))
        self.rows, self.ranks = int(per_rank.sum()), len(per_rank)
        self.bounds = _windows(per_rank, window_rows or WINDOW_ROWS)

    def _batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=1 << 20, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{self.path}: not a readable parquet file ({e}); delete it and rerun "
                             f"`rakt retrieve ... --out {self.path.parent}`") from None

    def queries(self) -> pd.DataFrame:
        """One row per query (query_id, query_label), sorted by query_id; conflicting labels raise."""
        parts = [b.to_pandas().drop_duplicates() for b in self._batches(["query_id", "query_label"])]
        q = (pd.concat(parts) if parts else pd.DataFrame(columns=["query_id", "query_label"])).drop_duplicates()
        q = q.astype({"query_id": str, "query_label": "Int64"})
        dup = q["query_id"].duplicated(keep=False)
        if dup.any():
            bad = q[dup].iloc[0]["query_id"]
            raise InputError(f"{self.path}: query '{bad}' appears with different query_label values; rerun "
                             "`rakt retrieve`")
        if q.empty:
            raise InputError(f"{self.path}: no candidates at all; check the query split given to `rakt retrieve`")
        return q.sort_values("query_id", kind="mergesort").reset_index(drop=True)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        dataset = ds.dataset(self.path, format="parquet")
        for lo, hi in self.bounds:
            table = dataset.to_table(columns=list(CANDIDATE_COLUMNS),
                                     filter=(pc.field("rank") >= lo) & (pc.field("rank") < hi))
            yield candidate_frame(table)
            pa.default_memory_pool().release_unused()


def _windows(per_rank: np.ndarray, window_rows: int) -> list[tuple[int, int]]:
    """[lo, hi) rank ranges of consecutive ranks holding <= window_rows rows (a larger rank alone)."""
    bounds, lo, rows = [], 0, 0
    for rank, count in enumerate(per_rank):
        if rows and rows + count > window_rows:
            bounds.append((lo, rank))
            lo, rows = rank, 0
        rows += int(count)
    if rows or not bounds:
        bounds.append((lo, len(per_rank)))
    return bounds


class Spill:
    """Candidate rows kept on disk in windows (one row group each) and read back window by window."""

    def __init__(self, path: Path) -> None:
        self.path, self.groups = path, 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._writer is None:
            self._schema = table.schema
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(table.cast(self._schema), row_group_size=max(1, len(frame)))
        self.groups += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def windows(self, exclude: np.ndarray | None = None) -> Iterator[pd.DataFrame]:
        """The kept rows window by window, in selection order, without the pool images in `exclude`."""
        if self._writer is None:
            return
        source = pq.ParquetFile(self.path)
        for g in range(source.num_row_groups):
            frame = source.read_row_group(g).to_pandas().astype(
                {k: v for k, v in DTYPES.items() if k != "query_id"})
            if exclude is not None and len(exclude):
                frame = frame[~np.isin(frame["pool_id"].to_numpy(), exclude)]
            yield frame.reset_index(drop=True)

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
