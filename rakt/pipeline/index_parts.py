"""The pool side of `rakt index build`: an embedding set as the build's rows (read part by part, never whole), its
metadata columns (+ the --metadata join), and the add step in parts run by an engine, resumable.

Add step in parts (--on-disk, or --engine ray): consecutive embedding-set part files form tasks; each task fills a
copy of the trained empty index with its rows, writes it (`add-NAME.faiss`), its metadata rows (`meta-NAME.parquet`)
and the exact top-10 of the recall queries over its rows (`knn-NAME.npz`), then its done marker (`add-NAME.json`)
into `{out}/.add-parts/`. The driver merges the parts in task order, in RAM or into lists on disk. A killed build
rerun with the same settings keeps the trained index (`trained.faiss`) and the finished tasks.
"""
from __future__ import annotations

import functools
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rakt.pipeline.engines import Engine, raise_if_failed
from rakt.pipeline.formats import EmbeddingParts, embedding_matrix
from rakt.pipeline.io import InputError, atomic_path, read_json, timed, write_json
from rakt.pipeline.progress import Progress

if TYPE_CHECKING:
    import faiss

    from rakt.indexes.faiss_ops import ExactTopK

log = logging.getLogger("rakt")

ADD_PARTS_SUBDIR = ".add-parts"
TRAINED = "trained.faiss"
STATE_JSON = "state.json"
MAX_RETRIES = 1
BATCH_ROWS = 16_384
LOCAL_TASK_ROWS = 1_000_000  # vectors per task run in process: a part's codes (~72 MB for PQ64) stay small, whatever N


@dataclass
class PoolMetadata:
    """Which embedding-set columns become index metadata (all-null ones dropped, read off the footers), joined
    with an extra parquet on `id` (--metadata; held in memory: its size, not the pool's)."""
    columns: list[str]
    schema: pa.Schema
    extra_path: str = ""

    @classmethod
    def of(cls, parts: EmbeddingParts, extra_path: str) -> "PoolMetadata":
        names = [c for c in parts.columns if c != "embedding"]
        nulls = dict.fromkeys(names, 0)
        for meta in parts.footers:
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for j in range(group.num_columns):
                    col, stats = group.column(j), group.column(j).statistics
                    name = col.path_in_schema
                    if name in nulls:
                        nulls[name] += stats.null_count if stats is not None and stats.null_count is not None else 0
        keep = [c for c in names if c == "id" or nulls[c] < parts.n]
        schema = pa.unify_schemas([m.schema.to_arrow_schema() for m in parts.footers], promote_options="permissive")
        return cls(keep, pa.schema([schema.field(c) for c in keep]), extra_path)

    def rows(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """The metadata rows of a batch of the embedding set."""
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        table = table.select(self.columns).cast(self.schema)
        return self._join(table) if self.extra_path else table

    @functools.cached_property
    def _extra(self) -> tuple[pa.Table, pd.Index]:
        path = Path(self.extra_path)
        if not path.exists():
            raise InputError(f"{path}: metadata file not found (--metadata); pass a parquet with an 'id' column")
        try:
            extra = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable parquet file ({e}); --metadata takes parquet with an 'id' column")
        if "id" not in extra.column_names:
            raise InputError(f"{path}: no 'id' column (columns: {', '.join(extra.column_names)}); the metadata is "
                             f"joined on the pool image ids")
        extra = extra.set_column(extra.column_names.index("id"), "id", pc.cast(extra["id"], pa.string()))
        ids = pd.Index(extra["id"].to_pandas())
        if ids.has_duplicates:
            dup = ids[ids.duplicated()][:3].tolist()
            raise InputError(f"{path}: ids appear more than once (e.g. {dup}); give one metadata row per pool image")
        return extra, ids

    def __getstate__(self) -> dict:  # the extra table is read again where it is used (e.g. in a Ray worker)
        return {k: v for k, v in self.__dict__.items() if k != "_extra"}

    def check(self, parts: EmbeddingParts) -> None:
        """Before the build: every pool id has a row in the extra metadata (reads the id column only)."""
        if not self.extra_path:
            return
        _, ids = self._extra
        missing, examples = 0, []
        for batch in parts.batches(columns=["id"], batch_rows=BATCH_ROWS):
            pool = batch.column("id").to_numpy(zero_copy_only=False)
            absent = pool[ids.get_indexer(pool) < 0]
            missing += len(absent)
            examples += absent[:3 - len(examples)].tolist()
        if missing:
            raise InputError(f"{self.extra_path}: {missing} of {parts.n} pool ids have no metadata row (e.g. "
                             f"{examples}); add them or drop --metadata")

    def _join(self, meta: pa.Table) -> pa.Table:
        extra, ids = self._extra
        rows = ids.get_indexer(pd.Index(meta["id"].to_pandas()))
        joined = extra.take(pa.array(rows.astype(np.int64)))
        for name in joined.column_names:
            if name == "id":
                continue
            if name in meta.column_names:
                meta = meta.set_column(meta.column_names.index(name), name, joined[name])
            else:
                meta = meta.append_column(name, joined[name])
        return meta


@dataclass
class EmbeddingSetRows:
    """An embedding set as the rows an index is built from (indexes.faiss_build.VectorRows)."""
    parts: EmbeddingParts
    metadata: PoolMetadata
    batch_size: int = BATCH_ROWS

    @property
    def n(self) -> int:
        return self.parts.n

    @property
    def d(self) -> int:
        return self.parts.dim

    def take(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        for piece in self.parts.pieces(rows, ["embedding"]):
            yield embedding_matrix(piece)

    def read_stats(self) -> dict:
        """What take() read: row groups decoded, of how many."""
        groups = sum(m.num_row_groups for m in self.parts.footers)
        return {"row_groups_read": self.parts.groups_read, "row_groups": groups}

    def batches(self, files: range | None = None) -> Iterator[tuple[np.ndarray, pa.Table]]:
        for batch in self.parts.batches(batch_rows=self.batch_size, files=files):
            yield embedding_matrix(batch), self.metadata.rows(batch)


# --- the add step in parts, run by an engine -------------------------------------------------------------

@dataclass
class AddTask:
    """Consecutive embedding-set part files whose vectors one worker adds to a copy of the empty index."""
    name: str
    files: range  # indices into the set's part files
    first: int  # the global id of its first row
    rows: int

    def __str__(self) -> str:
        return f"add task {self.name} (part files {self.files.start}-{self.files.stop - 1}, {self.rows} vectors)"


def rows_per_task(empty_bytes: int, code_bytes: int) -> int:
    """Vectors per add task: >= 1M, and enough that the empty index every part carries (an IVF's coarse
    centroids: 512 MiB for 2^18 lists of 512 dims) is <= 10% of the part's codes and ids."""
    return max(1_000_000, math.ceil(10 * empty_bytes / (code_bytes + 8)))


def add_tasks(parts: EmbeddingParts, max_rows: int) -> list[AddTask]:
    """The set's part files in id order, grouped into tasks of up to `max_rows` vectors (or one file)."""
    groups: list[list[int]] = []
    for j, rows in enumerate(parts.rows):
        if not groups or sum(parts.rows[i] for i in groups[-1]) + rows > max_rows:
            groups.append([])
        groups[-1].append(j)
    return [AddTask(f"{t:05d}", range(g[0], g[-1] + 1), int(parts.starts[g[0]]), sum(parts.rows[i] for i in g))
            for t, g in enumerate(groups)]


@dataclass
class AddWorkerBuilder:
    """Picklable: the serialized empty trained index, the recall queries and where the filled copies go."""
    empty: np.ndarray
    normalize: bool
    rows: EmbeddingSetRows
    queries: np.ndarray
    metric: str
    out: str

    def __call__(self) -> Callable[[AddTask], None]:
        return functools.partial(add_part, self, Progress(self.rows.n, "index add", unit="vec"))


def add_part(job: AddWorkerBuilder, progress: Progress, task: AddTask) -> None:
    """Fill a copy of the empty index with one task's rows; write the part, its metadata rows (as they stream), the
    exact top-k of the recall queries over its rows, and last its done marker (each file atomically)."""
    from rakt.indexes.faiss_ops import ExactTopK
    from rakt.indexes.faiss_parts import fill_copy

    out = Path(job.out)
    exact = ExactTopK(job.queries, 10, job.metric, start=task.first)
    writer: pq.ParquetWriter | None = None
    with atomic_path(out / f"meta-{task.name}.parquet") as meta_tmp:
        count = 0

        def batches():  # one batch in memory at a time; its metadata rows written as they come
            nonlocal count, writer
            for vectors, meta in job.rows.batches(files=task.files):
                writer = writer or pq.ParquetWriter(meta_tmp, meta.schema)
                writer.write_table(meta, row_group_size=8_192)
                count += len(vectors)
                yield vectors

        def added(vectors: np.ndarray) -> None:
            exact.add(vectors)
            progress.update(len(vectors))

        try:
            blob = fill_copy(job.empty, batches(), job.normalize, each=added, first_id=task.first)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pq.write_table(job.rows.metadata.schema.empty_table(), meta_tmp)
        if count != task.rows:
            raise InputError(f"{task}: read {count} vectors, not {task.rows}; the embedding set changed during the "
                             f"build")
    with atomic_path(out / f"add-{task.name}.faiss") as tmp:
        blob.tofile(tmp)
    with atomic_path(out / f"knn-{task.name}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, scores=exact.scores, ids=exact.ids)
    write_json(out / f"add-{task.name}.json", {"rows": task.rows, "first": task.first})


@dataclass
class PartitionedAdd:
    """The add step on an engine, resumable: tasks fill copies of the trained index; merged here in task order, in
    RAM or (on_disk) into inverted lists on disk beside the index file."""
    engine: Engine
    rows: EmbeddingSetRows
    parts_dir: Path
    on_disk: bool
    metric: str
    task_rows: int = 0  # vectors per task (0 = LOCAL_TASK_ROWS in process, else rows_per_task)
    local: bool = True  # tasks run in this process: their parts' memory is this process's
    resumed: int = 0  # tasks a killed build had finished

    def takes(self, trained: faiss.Index) -> bool:
        """Whether this index is added in parts: always on an engine or on disk; in process, an IVF index (its
        lists then sized once, and a killed build resumes), not a flat or graph one (added batch by batch)."""
        import faiss

        return not self.local or self.on_disk or faiss.try_extract_index_ivf(trained) is not None

    def __call__(self, trained: faiss.Index, normalize: bool, exact: ExactTopK, out: Path) -> faiss.Index:
        import faiss

        from rakt.indexes.faiss_parts import merge_parts, merge_to_disk

        blob = faiss.serialize_index(trained)
        if not (self.parts_dir / TRAINED).exists():
            with atomic_path(self.parts_dir / TRAINED) as tmp:
                blob.tofile(tmp)
        rows = self.task_rows or (LOCAL_TASK_ROWS if self.local else rows_per_task(len(blob), trained.sa_code_size()))
        tasks = add_tasks(self.rows.parts, rows)
        todo = [t for t in tasks if not (self.parts_dir / f"add-{t.name}.json").exists()]
        self.resumed = len(tasks) - len(todo)
        log.info("index: adding %d vectors in %d tasks (%d done before)", self.rows.n, len(tasks),
                 len(tasks) - len(todo))
        with timed("index add (in parts)"):
            failed = self.engine.run(todo, AddWorkerBuilder(blob, normalize, self.rows, exact.queries, self.metric,
                                                            str(self.parts_dir)), MAX_RETRIES)
        raise_if_failed(failed, "add tasks")
        for t in tasks:
            found = np.load(self.parts_dir / f"knn-{t.name}.npz")
            exact.merge(found["scores"], found["ids"])
        _place_metadata(self.parts_dir, tasks, out)
        files = [self.parts_dir / f"add-{t.name}.faiss" for t in tasks]
        with timed("index merge" + (" on disk" if self.on_disk else "")):
            if self.on_disk:
                from rakt.indexes.faiss_build import INDEX_PART

                return merge_to_disk(trained, files, out / INDEX_PART)
            return merge_parts(trained, files)


def _place_metadata(parts_dir: Path, tasks: list[AddTask], out: Path) -> None:
    """The tasks' metadata files become metadata/part-NNNNN.parquet in task order (stale parts removed)."""
    from rakt.pipeline.formats import METADATA_DIR

    folder = out / METADATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    keep = set()
    for j, t in enumerate(tasks):
        target = folder / f"part-{j:05d}.parquet"
        shutil.copyfile(parts_dir / f"meta-{t.name}.parquet", folder / f".{target.name}.tmp")
        (folder / f".{target.name}.tmp").replace(target)
        keep.add(target)
    for stale in set(folder.glob("part-*.parquet")) - keep:
        stale.unlink()


def open_parts_dir(parts_dir: Path, state: dict) -> faiss.Index | None:
    """Keep `parts_dir` for a rerun of the same build (returns its trained index), else clear it."""
    import faiss

    if parts_dir.exists():
        before = read_json(parts_dir / STATE_JSON, "build state") if (parts_dir / STATE_JSON).exists() else None
        if before == state and (parts_dir / TRAINED).exists():
            done = len(list(parts_dir.glob("add-*.json")))
            log.info("index: resuming the killed build in %s (trained index kept, %d add tasks done)", parts_dir, done)
            return faiss.deserialize_index(np.fromfile(parts_dir / TRAINED, np.uint8))
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    write_json(parts_dir / STATE_JSON, state)
    return None
