"""`rakt index build`: a pool (images or an embedding set) -> a FAISS index directory, resumable.

Pool images are first embedded into `{out}/embeddings/` (resumable per partition, so a killed build picks up
where it stopped); an existing embedding set is used as is. The index is skipped when `index.json` records
the same config hash and embeddings hash. With `--engine ray` both embedding and the add step run on the
cluster: after training on a sample (here), each group of embedding-set partitions is added to a copy of the
empty trained index by a worker, which writes it to `{out}/.add-parts/`; the parts are merged here in
partition order, so the index searches exactly as one built in process.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, EmbedConfig, EncoderConfig, EngineConfig, IndexBuildConfig, to_dict
from pipeline.engines import Engine, EngineOptions, get_engine, raise_if_failed
from pipeline.progress import Progress
from pipeline.formats import EMBEDDINGS_JSON, EMBEDDING_PARTS, embedding_matrix, read_embedding_set
from pipeline.io import InputError, atomic_path, json_hash, parquet_rows, read_json, timed

if TYPE_CHECKING:
    import faiss

log = logging.getLogger("rakt")

EMBEDDINGS_SUBDIR = "embeddings"
# what decides the index; encoder run settings (batch size, workers, device) do not, and the embedding set's
# own hash covers the vectors
_INDEX_KEYS = ("kind", "memory_budget", "metric", "metadata", "train_size", "nprobe", "seed")
ADD_PARTS_SUBDIR = ".add-parts"
# consecutive partitions are grouped into add tasks of about this many vectors; 0 = automatic (rows_per_task)
ADD_ROWS_PER_TASK = 0
MAX_RETRIES = 1


def run(cfg: IndexBuildConfig) -> dict:
    """Build (or reuse) the index at `cfg.out`; returns kind, factory, count, dim, recall_at_10, seconds."""
    from indexes.faiss_index import INDEX_JSON, build_faiss_index  # faiss only when building

    start = time.perf_counter()
    out = Path(cfg.out)
    # add workers take a GPU where the cluster has them (faiss-gpu adds, as in process); an unusable engine fails here
    engine = get_engine(cfg.engine, EngineOptions(address=cfg.ray_address, use_gpu=cfg.device != "cpu"))
    emb_dir = _embedding_set(cfg, out)
    emb_meta = read_json(emb_dir / EMBEDDINGS_JSON, "embedding set metadata")
    hashes = {"config_hash": _index_config_hash(cfg), "embeddings_hash": _embeddings_hash(emb_dir, emb_meta)}
    previous = out / INDEX_JSON
    if previous.exists():
        info = read_json(previous, "index description")
        if all(info.get(k) == v for k, v in hashes.items()):
            log.info("index: %s is up to date (same config and embeddings); skipping the build", out)
            return _summary(info, out, time.perf_counter() - start, skipped=True)
        log.info("index: %s was built from other settings or embeddings; rebuilding", out)
    _, table = read_embedding_set(emb_dir)
    if table.num_rows == 0:
        raise InputError(f"{emb_dir}: the embedding set holds no rows; the pool is empty")
    with timed("index metadata"):
        metadata = _metadata(table, cfg.metadata)
    vectors = embedding_matrix(table)
    del table
    extra = {**hashes, "embeddings": str(emb_dir.resolve()), "config": to_dict(cfg)}
    add_step = None
    if cfg.engine != "local":  # else the add step runs in process, in batches
        add_step = PartitionedAdd(engine, emb_dir.resolve(), out.resolve() / ADD_PARTS_SUBDIR)
    with timed("index build"), Progress(len(vectors), "index add", unit="vec") as bar:
        info = build_faiss_index(vectors, metadata, out, model=str(emb_meta.get("model", "")), metric=cfg.metric,
                                 kind=cfg.kind, memory_budget=cfg.memory_budget, train_size=cfg.train_size,
                                 nprobe=cfg.nprobe, seed=cfg.seed, extra_info=extra, add_step=add_step,
                                 progress=bar.update)
    return _summary(info, out, time.perf_counter() - start, skipped=False)


def _summary(info: dict, out: Path, seconds: float, skipped: bool) -> dict:
    keys = ("kind", "factory", "model", "count", "dim", "metric", "recall_at_10", "memory_bytes")
    return {**{k: info.get(k) for k in keys}, "out": str(out), "skipped": skipped, "seconds": round(seconds, 2)}


def _index_config_hash(cfg: IndexBuildConfig) -> str:
    values = {k: getattr(cfg, k) for k in _INDEX_KEYS}
    if cfg.metadata:  # the joined file's content, not only its name
        from pipeline.io import file_hash
        values["metadata_file_hash"] = file_hash(cfg.metadata) if Path(cfg.metadata).exists() else None
    return json_hash(values)


def _embeddings_hash(emb_dir: Path, meta: dict) -> str:
    """embeddings.json (less its timestamp: embed rewrites it on every run) plus every part file's name and size."""
    parts = [(p.name, p.stat().st_size) for p in sorted(emb_dir.glob(EMBEDDING_PARTS))]
    return json_hash({"meta": {k: v for k, v in meta.items() if k != "created"}, "parts": parts})


def _embedding_set(cfg: IndexBuildConfig, out: Path) -> Path:
    """The pool's embedding set: the single source if it is one, else pool images embedded into out/embeddings."""
    if not cfg.source:
        raise ConfigError("rakt index: give the pool (image folder, manifest, shards) or an embedding set directory")
    sets = [s for s in cfg.source if (Path(s) / EMBEDDINGS_JSON).exists()]
    if sets:
        if len(cfg.source) > 1:
            raise ConfigError(f"rakt index: {sets[0]} is an embedding set; pass it alone (one embedding set "
                              f"per index), not with other sources")
        log.info("index: using the embedding set %s", sets[0])
        return Path(sets[0])
    from pipeline.embed import run as embed_run

    enc = {f.name: getattr(cfg, f.name) for c in (EncoderConfig, EngineConfig) for f in dataclasses.fields(c)}
    emb_cfg = EmbedConfig(**enc, source=list(cfg.source), out=str(out / EMBEDDINGS_SUBDIR), split="pool",
                          partition_size=cfg.partition_size)
    log.info("index: embedding the pool into %s (resumable: done partitions are kept)", emb_cfg.out)
    embed_run(emb_cfg)
    return Path(emb_cfg.out)


# --- the add step in parts, run by an engine -------------------------------------------------------------

@dataclass
class AddTask:
    """Consecutive embedding-set part files whose vectors one worker adds to a copy of the empty index."""
    name: str
    files: list[str]
    rows: int

    def __str__(self) -> str:
        more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"add task {self.name} ({Path(self.files[0]).name}{more}, {self.rows} vectors)"


def rows_per_task(empty_bytes: int, code_bytes: int) -> int:
    """Vectors per add task: >= 1M, and enough that the empty index every part carries (an IVF's coarse
    centroids: 512 MiB for 2^18 lists of 512 dims) is <= 10% of the part's codes and ids."""
    return max(1_000_000, math.ceil(10 * empty_bytes / (code_bytes + 8)))


def add_tasks(emb_dir: Path, max_rows: int) -> list[AddTask]:
    """The embedding set's part files in id order, grouped into tasks of up to `max_rows` vectors (or one file)."""
    groups: list[tuple[list[str], int]] = []
    for path in sorted(emb_dir.glob(EMBEDDING_PARTS)):  # the order read_embedding_set gives ids in
        rows = parquet_rows(path, f"rerun `rakt embed` with --out {emb_dir}: it embeds a damaged partition again")
        if not groups or groups[-1][1] + rows > max_rows:
            groups.append(([], 0))
        groups[-1] = (groups[-1][0] + [str(path)], groups[-1][1] + rows)
    return [AddTask(f"{j:05d}", files, rows) for j, (files, rows) in enumerate(groups)]


@dataclass
class AddWorkerBuilder:
    """Picklable: the serialized empty trained index and where the filled copies go."""
    empty: np.ndarray
    normalize: bool
    out: str

    def __call__(self) -> Callable[[AddTask], None]:
        return functools.partial(add_part, self.empty, self.normalize, Path(self.out))


def add_part(empty: np.ndarray, normalize: bool, out: Path, task: AddTask) -> None:
    """Add one task's vectors to a copy of the empty index; write it to `out/add-NAME.faiss` atomically."""
    from indexes.faiss_build import fill_copy

    count = 0

    def batches():  # one part file in memory at a time
        nonlocal count
        for path in task.files:
            vectors = embedding_matrix(pq.read_table(path, columns=["embedding"]))
            count += len(vectors)
            yield vectors

    blob = fill_copy(empty, batches(), normalize)
    if count != task.rows:
        raise InputError(f"{task}: read {count} vectors, not {task.rows}; the embedding set changed during the build")
    with atomic_path(out / f"add-{task.name}.faiss") as tmp:
        blob.tofile(tmp)


@dataclass
class PartitionedAdd:
    """The add step on an engine: every task fills a copy of the empty index; merged here in task order."""
    engine: Engine
    emb_dir: Path
    parts_dir: Path

    def __call__(self, empty: faiss.Index, normalize: bool) -> faiss.Index:
        import faiss

        from indexes.faiss_build import merge_parts

        blob = faiss.serialize_index(empty)
        tasks = add_tasks(self.emb_dir, ADD_ROWS_PER_TASK or rows_per_task(len(blob), empty.sa_code_size()))
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # parts of an earlier, killed build
        self.parts_dir.mkdir(parents=True)
        log.info("index: adding %d vectors in %d tasks", sum(t.rows for t in tasks), len(tasks))
        with timed("index add (in parts)"):
            failed = self.engine.run(tasks, AddWorkerBuilder(blob, normalize, str(self.parts_dir)), MAX_RETRIES)
        raise_if_failed(failed, "add tasks")
        with timed("index merge"):
            index = merge_parts(empty, (np.fromfile(self.parts_dir / f"add-{t.name}.faiss", np.uint8)
                                        for t in tasks))
        shutil.rmtree(self.parts_dir)
        return index


def _metadata(table: pa.Table, extra_path: str) -> pa.Table:
    """Row i = FAISS id i: the embedding set's columns but `embedding` (all-null ones dropped), + joined extra."""
    cols = [c for c in table.column_names if c != "embedding"]
    meta = table.select(cols)
    meta = meta.select([c for c in cols if c == "id" or meta[c].null_count < meta.num_rows])
    if not extra_path:
        return meta
    path = Path(extra_path)
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
    extra_ids = pd.Index(extra["id"].to_pandas())
    if extra_ids.has_duplicates:
        dup = extra_ids[extra_ids.duplicated()][:3].tolist()
        raise InputError(f"{path}: ids appear more than once (e.g. {dup}); give one metadata row per pool image")
    rows = extra_ids.get_indexer(pd.Index(meta["id"].to_pandas()))
    if (rows < 0).any():
        missing = meta["id"].to_numpy(zero_copy_only=False)[rows < 0]
        raise InputError(f"{path}: {len(missing)} of {meta.num_rows} pool ids have no metadata row (e.g. "
                         f"{missing[:3].tolist()}); add them or drop --metadata")
    joined = extra.take(pa.array(rows.astype(np.int64)))
    for name in joined.column_names:
        if name == "id":
            continue
        if name in meta.column_names:
            log.info("index metadata: column '%s' from %s replaces the embedding set's", name, path)
            meta = meta.set_column(meta.column_names.index(name), name, joined[name])
        else:
            meta = meta.append_column(name, joined[name])
    return meta
