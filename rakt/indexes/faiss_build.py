"""Build FAISS index directories in bounded memory: choice (rakt/indexes/faiss_choice.py), training on a sample read
as just its rows, the add step batch by batch (or in parts, merged in RAM or on disk: rakt/indexes/faiss_parts.py),
metadata written part by part, and the recall check against an exact search folded into the same pass.

Memory follows the index, never the pool: the training sample, one batch of vectors and the index itself (its
codes in RAM, or only its coarse quantizer with --on-disk). Layout of the directory: rakt/indexes/faiss_index.py.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402

from rakt.indexes.base import IndexSpecError  # noqa: E402
from rakt.indexes.faiss_choice import (RECALL_QUERIES, build_memory, check_budget, choose_index,  # noqa: E402
                                       human)
from rakt.indexes.faiss_ops import (METRICS, ExactTopK, prep_vectors, prepare_ivfpq, recall_at,  # noqa: E402
                                    search_released, set_nprobe, to_gpu)
from rakt.indexes.faiss_parts import IVFDATA_SUFFIX, check_mergeable  # noqa: E402
from rakt.indexes.faiss_train import SampleFile, train_out_of_core  # noqa: E402
from rakt.indexes.helpers import atomic_path, release_mapped  # noqa: E402
from rakt.indexes.layout import INDEX_JSON, METADATA_DIR  # noqa: E402

log = logging.getLogger("rakt.indexes")

METADATA_ROWS_PER_FILE = 1_000_000
METADATA_ROW_GROUP = 8_192  # a looked-up row costs at most this many decoded rows
INDEX_PART = "index-000.faiss"
TRAIN_SAMPLE = ".train-sample.f32"  # the training sample while k-means reads it, removed after


class VectorRows(Protocol):
    """What an index is built from: n vectors of dim d and their metadata rows, in id order."""
    n: int
    d: int

    def take(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """float32 vectors of `rows` (sorted, unique) in that order, a chunk at a time, reading no more than the
        rows' neighbourhood."""

    def batches(self) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """Every vector in id order with its metadata rows (an `id` column), a batch at a time."""


@dataclass
class ArrayRows:
    """An in-memory [n, d] array and its metadata table as VectorRows."""
    vectors: np.ndarray
    metadata: pa.Table
    batch_size: int = 100_000

    @property
    def n(self) -> int:
        return len(self.vectors)

    @property
    def d(self) -> int:
        return self.vectors.shape[1]

    def take(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        for begin in range(0, len(rows), self.batch_size):
            yield np.asarray(self.vectors[rows[begin:begin + self.batch_size]], np.float32)

    def batches(self) -> Iterator[tuple[np.ndarray, pa.Table]]:
        for begin in range(0, self.n, self.batch_size):
            yield self.vectors[begin:begin + self.batch_size], self.metadata.slice(begin, self.batch_size)


class AddStep(Protocol):
    """The add step done elsewhere (in parts, then merged): called with the trained empty CPU index, normalize,
    the recall check's exact top-k to fold every vector into and the output directory, it returns the index
    holding all n vectors in order and writes `metadata/` (row i = id i) itself."""

    def takes(self, trained: faiss.Index) -> bool:
        """Whether it adds this index; if not, the build adds it in process, batch by batch."""

    def __call__(self, trained: faiss.Index, normalize: bool, exact: ExactTopK, out: Path) -> faiss.Index: ...


def build_faiss_index(vectors: VectorRows | np.ndarray, metadata: pa.Table | None, out_dir: str | Path, *, model: str,
                      metric: str = "ip", kind: str = "auto", memory_budget: str = "4G", train_size: int = 0,
                      nprobe: int = 16, seed: int = 0, on_disk: bool = False, extra_info: dict | None = None,
                      add_step: AddStep | None = None, part_rows: int = 0, trained: faiss.Index | None = None,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Build an index directory over `vectors` (VectorRows, or an [n, d] array with `metadata` row i describing
    id i); return index.json. `progress(n)` is called as vectors are added in process.

    The add step runs here, batch by batch, unless `add_step` is given (parts filled elsewhere and merged, e.g.
    by rakt/pipeline/index_build.py); with `on_disk` it must be given and leave the lists on disk beside index-000.faiss.
    `trained` (the empty index a killed build of the same settings trained) skips training. A build whose peak
    memory exceeds `memory_budget` is refused before anything is read.
    """
    start_time = time.perf_counter()
    rows = _as_rows(vectors, metadata)
    n, d = rows.n, rows.d
    if metric not in METRICS:
        raise IndexSpecError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if on_disk and add_step is None:
        raise IndexSpecError("an on-disk build adds in parts: give an add_step (rakt index build --on-disk does)")
    choice = choose_index(n, d, kind=kind, memory_budget=memory_budget, train_size=train_size, on_disk=on_disk)
    choice.memory = build_memory(choice, n, d, getattr(rows, "batch_size", 65_536), on_disk, part_rows)
    check_budget(choice, memory_budget, on_disk)
    size = human(choice.memory_bytes) if choice.memory_bytes is not None else "unknown size"
    log.info("index: %s (%s) over %d x %d, ~%s; expected recall: %s", choice.kind, choice.factory, n, d, size,
             choice.expected)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_JSON).unlink(missing_ok=True)  # a half-rebuilt directory must not look finished
    index = _new_index(d, choice.factory, metric) if trained is None else trained
    work = to_gpu(index, ngpu=1)  # one GPU: shards would each train their own quantizer
    device = "gpu" if work is not None else "cpu"
    work = work if work is not None else index
    log.info("building on %s", device.upper())
    normalize = metric == "ip"  # cosine: every vector goes in at unit length (a no-op for normalized embeddings)
    sample, queries, unit = _sample(rows, choice.train_size if not index.is_trained else 0, seed, normalize, out)
    sampled = (sample.n if sample is not None else 0) + len(queries)
    t0 = time.perf_counter()
    _train(index, work, sample, device)
    t1 = time.perf_counter()
    exact = ExactTopK(queries, min(10, n), metric)
    if add_step is not None and not add_step.takes(index):
        add_step = None  # e.g. a flat or graph index built in process
    if add_step is None:
        _add_in_process(work, rows, normalize, exact, out / METADATA_DIR, progress)
    else:
        trained = faiss.index_gpu_to_cpu(work) if device == "gpu" else work
        check_mergeable(trained, choice.factory)
        index = work = add_step(trained, normalize, exact, out)  # a CPU index, whichever device trained it
        if work.ntotal != n:
            raise IndexSpecError(f"the add step returned an index of {work.ntotal} vectors for {n}")
    t2 = time.perf_counter()
    recall, by_nprobe = 1.0, {}
    if choice.kind != "flat":
        probes = {1, 4, 16, 64, 256, nprobe} & set(range(1, choice.nlist + 1)) if choice.nlist else set()
        for probe in sorted(probes | {nprobe}):
            set_nprobe(work, probe)
            found = search_released(work, queries, exact.k, probe, lambda: release_mapped([out]))[1]
            by_nprobe[probe] = round(recall_at(found, exact.ids), 4)
        recall = by_nprobe[nprobe]
        log.info("recall@10 by nprobe: %s", ", ".join(f"{p}: {r:.3f}" for p, r in by_nprobe.items()))
    set_nprobe(work, nprobe)
    log.info("recall@10 = %.3f (%s)", recall, f"nprobe {nprobe}, {len(queries)} sampled pool vectors as queries vs "
             "exact search" if choice.kind != "flat" else "exact search")
    if device == "gpu" and add_step is None:
        index = faiss.index_gpu_to_cpu(work)
        set_nprobe(index, nprobe)
    with atomic_path(out / INDEX_PART) as tmp:
        faiss.write_index(index, str(tmp))
    for stale in [*out.glob("index-*.faiss"), *out.glob(f"index-*{IVFDATA_SUFFIX}")]:
        if stale.name not in (INDEX_PART, Path(INDEX_PART).with_suffix(IVFDATA_SUFFIX).name if on_disk else ""):
            stale.unlink()
    disk = sum(p.stat().st_size for p in out.glob("index-000.*"))
    info = {
        **(extra_info or {}),
        "kind": choice.kind, "factory": choice.factory, "model": model, "dim": d, "metric": metric, "count": n,
        "parts": [INDEX_PART], "nprobe": nprobe, "recall_at_10": round(recall, 4), "memory_bytes": disk,
        "recall_at_10_by_nprobe": by_nprobe,
        "ivf_lists": "ondisk" if on_disk else "ram", "built_with": f"faiss {faiss.__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "normalized": normalize and not unit, "device": device, "train_size": choice.train_size, "seed": seed,
        "add": "in parts, merged" + (" on disk" if on_disk else "") if add_step is not None else "in process",
        "build_memory": {k: int(v) for k, v in choice.memory.items()},
        "sample_read": {"rows": sampled, **(getattr(rows, "read_stats", dict)())},
        "seconds": {"train": round(t1 - t0, 2), "add": round(t2 - t1, 2),
                    "total": round(time.perf_counter() - start_time, 2)},
    }
    with atomic_path(out / INDEX_JSON) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    log.info("wrote %s: %s, %d vectors, %s on disk", out, choice.factory, n, human(disk))
    return info


def _as_rows(vectors: VectorRows | np.ndarray, metadata: pa.Table | None) -> VectorRows:
    if not isinstance(vectors, np.ndarray):
        return vectors
    if vectors.ndim != 2:
        raise IndexSpecError(f"vectors must be a 2-D array [n, dim], got shape {vectors.shape}")
    if metadata is None or metadata.num_rows != len(vectors) or "id" not in metadata.column_names:
        got = (metadata.num_rows, metadata.column_names) if metadata is not None else (0, [])
        raise IndexSpecError(f"metadata must have an 'id' column and one row per vector: got {got[0]} rows "
                             f"(columns {got[1]}) for {len(vectors)} vectors")
    return ArrayRows(vectors, metadata)


def _new_index(d: int, factory: str, metric: str) -> faiss.Index:
    try:
        index = faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexSpecError(f"'{factory}' is not a faiss index_factory string faiss accepts for dim {d} "
                             f"({str(e).strip().splitlines()[-1]}); use auto, flat, ivfpq or e.g. 'IVF1024,PQ32'")
    prepare_ivfpq(index)
    return index


def _sample(rows: VectorRows, train_size: int, seed: int, normalize: bool,
            folder: Path) -> tuple[SampleFile | None, np.ndarray, bool]:
    """The training sample (a float32 file in `folder`, None without training), the recall check's queries, drawn
    with `seed` over all rows and read in one pass, a chunk at a time, and whether the rows read were unit-norm."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(rows.n, size=min(rows.n, train_size), replace=False)) if train_size else \
        np.zeros(0, np.int64)
    # the queries by a stream of their own: the same with or without a training draw (a resumed build has none)
    queries = np.sort(np.random.default_rng([seed, 1]).choice(rows.n, size=min(rows.n, RECALL_QUERIES),
                                                               replace=False))
    wanted = np.union1d(train, queries)
    sample = SampleFile(folder / TRAIN_SAMPLE, rows.d) if len(train) else None
    found = np.zeros((len(queries), rows.d), np.float32)
    done, unit = 0, True
    for chunk in rows.take(wanted):
        ids = wanted[done:done + len(chunk)]
        unit = unit and bool(np.allclose(np.linalg.norm(chunk, axis=1), 1, atol=1e-3))
        chunk = prep_vectors(chunk, normalize)
        if sample is not None:
            sample.append(chunk[np.isin(ids, train, assume_unique=True)])
        asked = np.isin(ids, queries, assume_unique=True)
        found[np.searchsorted(queries, ids[asked])] = chunk[asked]
        done += len(chunk)
    if sample is not None:
        sample.close()
    if normalize and not unit:
        log.info("vectors are not unit-norm: normalizing them for metric ip (cosine similarity)")
    return sample, found, unit


def _train(index: faiss.Index, work: faiss.Index, sample: SampleFile | None, device: str) -> None:
    """Train on the sample: out of core for a plain IVF on the CPU (rakt/indexes/faiss_train.py), else in memory."""
    if sample is None:
        return
    try:
        log.info("training %s on %d sampled vectors", type(faiss.downcast_index(index)).__name__, sample.n)
        if device == "cpu" and train_out_of_core(index, sample):
            return
        work.train(sample.rows(0, sample.n))
    finally:
        sample.path.unlink(missing_ok=True)


def _add_in_process(work: faiss.Index, rows: VectorRows, normalize: bool, exact: ExactTopK, folder: Path,
                    progress: Callable[[int], None] | None) -> None:
    """Add every batch to `work`, fold it into the exact top-k and write its metadata rows."""
    with MetadataWriter(folder) as writer:
        for vectors, meta in rows.batches():
            vectors = prep_vectors(vectors, normalize)
            work.add(vectors)
            exact.add(vectors)
            writer.write(meta)
            if progress is not None:
                progress(len(vectors))
    if writer.rows != rows.n:
        raise IndexSpecError(f"{folder}: {writer.rows} metadata rows written for {rows.n} vectors; every vector "
                             f"needs one (an 'id' at least)")


class MetadataWriter:
    """metadata/part-NNNNN.parquet written as rows arrive: files of <= METADATA_ROWS_PER_FILE rows in row groups of
    METADATA_ROW_GROUP, each renamed into place when full; stale parts of an earlier build are removed at the end."""

    def __init__(self, folder: Path, first_part: int = 0) -> None:
        self.folder, self.part, self.rows = folder, first_part, 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._in_file = 0
        self.written: list[Path] = []

    def __enter__(self) -> "MetadataWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._tmp = self.folder / f".part-{self.part:05d}.parquet.tmp"
                self._writer = pq.ParquetWriter(self._tmp, table.schema)
            take = min(table.num_rows, METADATA_ROWS_PER_FILE - self._in_file)
            self._writer.write_table(table.slice(0, take), row_group_size=METADATA_ROW_GROUP)
            table, self._in_file, self.rows = table.slice(take), self._in_file + take, self.rows + take
            if self._in_file == METADATA_ROWS_PER_FILE:
                self._finish()

    def _finish(self) -> None:
        self._writer.close()
        final = self.folder / f"part-{self.part:05d}.parquet"
        self._tmp.replace(final)
        self.written.append(final)
        self._writer, self._in_file, self.part = None, 0, self.part + 1

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            if self._writer is not None:
                self._writer.close()
                self._tmp.unlink(missing_ok=True)
            return
        if self._writer is not None:
            self._finish()
        for stale in set(self.folder.glob("part-*.parquet")) - set(self.written):
            stale.unlink()
