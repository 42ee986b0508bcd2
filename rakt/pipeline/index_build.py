"""`rakt index build`: a pool (images or an embedding set) -> a FAISS index directory, in bounded memory, resumable.

Pool images are first embedded into `{out}/embeddings/` (resumable per partition, so a killed build picks up
where it stopped); an existing embedding set is used as is. The index is skipped when `index.json` records
the same config hash and embeddings hash. The embedding set is never read whole: the training sample is read as
just its rows, and the add step streams the set batch by batch (in process), or in parts run by the engine and
merged here (--on-disk, --engine ray: rakt/pipeline/index_parts.py), so the build needs the index's memory, not the
pool's. `--memory-budget` is checked against the build's peak before anything is read.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from rakt.pipeline.config import ConfigError, EmbedConfig, EncoderConfig, EngineConfig, IndexBuildConfig, to_dict
from rakt.pipeline.engines import EngineOptions, get_engine
from rakt.pipeline.formats import EMBEDDINGS_JSON, EMBEDDING_PARTS, EmbeddingParts
from rakt.pipeline.index_parts import (ADD_PARTS_SUBDIR, LOCAL_TASK_ROWS, EmbeddingSetRows, PartitionedAdd,
                                       PoolMetadata, open_parts_dir)
from rakt.pipeline.io import InputError, json_hash, read_json, timed
from rakt.pipeline.progress import LazyProgress

log = logging.getLogger("rakt")

EMBEDDINGS_SUBDIR = "embeddings"
# what decides the index; encoder run settings (batch size, workers, device) do not, and the embedding set's
# own hash covers the vectors
_INDEX_KEYS = ("kind", "memory_budget", "metric", "metadata", "train_size", "nprobe", "seed", "on_disk")


def run(cfg: IndexBuildConfig) -> dict:
    """Build (or reuse) the index at `cfg.out`; returns kind, factory, count, dim, recall_at_10, seconds."""
    from rakt.indexes.faiss_index import INDEX_JSON, build_faiss_index  # faiss only when building

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
    parts = EmbeddingParts(emb_dir)
    if parts.n == 0:
        raise InputError(f"{emb_dir}: the embedding set holds no rows; the pool is empty")
    metadata = PoolMetadata.of(parts, cfg.metadata)
    with timed("index metadata check"):
        metadata.check(parts)
    rows = EmbeddingSetRows(parts, metadata)
    extra = {**hashes, "embeddings": str(emb_dir.resolve()), "config": to_dict(cfg)}
    add_step, trained, parts_dir = None, None, out.resolve() / ADD_PARTS_SUBDIR
    trained = open_parts_dir(parts_dir, {**hashes, "task_rows": cfg.task_rows})  # a killed build's, kept
    add_step = PartitionedAdd(engine, rows, parts_dir, cfg.on_disk, cfg.metric, cfg.task_rows,
                              local=cfg.engine == "local")
    bar = LazyProgress(parts.n, "index add", unit="vec")  # from the first vector added, not from the training
    with timed("index build"), bar:
        info = build_faiss_index(rows, None, out, model=str(emb_meta.get("model", "")), metric=cfg.metric,
                                 kind=cfg.kind, memory_budget=cfg.memory_budget, train_size=cfg.train_size,
                                 nprobe=cfg.nprobe, seed=cfg.seed, on_disk=cfg.on_disk, extra_info=extra,
                                 add_step=add_step, trained=trained, progress=bar.update,
                                 part_rows=cfg.task_rows or LOCAL_TASK_ROWS)
    shutil.rmtree(parts_dir, ignore_errors=True)
    resumed = {"resumed_tasks": add_step.resumed} if info["add"] != "in process" else {}
    return {**_summary(info, out, time.perf_counter() - start, skipped=False), **resumed}


def _summary(info: dict, out: Path, seconds: float, skipped: bool) -> dict:
    keys = ("kind", "factory", "model", "count", "dim", "metric", "recall_at_10", "memory_bytes", "ivf_lists",
            "sample_read")
    return {**{k: info.get(k) for k in keys}, "out": str(out), "skipped": skipped, "seconds": round(seconds, 2)}


def _index_config_hash(cfg: IndexBuildConfig) -> str:
    values = {k: getattr(cfg, k) for k in _INDEX_KEYS}
    if cfg.metadata:  # the joined file's content, not only its name
        from rakt.pipeline.io import file_hash
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
    from rakt.pipeline.embed import run as embed_run

    enc = {f.name: getattr(cfg, f.name) for c in (EncoderConfig, EngineConfig) for f in dataclasses.fields(c)}
    emb_cfg = EmbedConfig(**enc, source=list(cfg.source), out=str(out / EMBEDDINGS_SUBDIR), split="pool",
                          partition_size=cfg.partition_size, dtype=cfg.dtype)
    log.info("index: embedding the pool into %s (resumable: done partitions are kept)", emb_cfg.out)
    embed_run(emb_cfg)
    return Path(emb_cfg.out)
