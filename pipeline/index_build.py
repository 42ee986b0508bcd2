"""`rakt index build`: a pool (images or an embedding set) -> a FAISS index directory, resumable.

Pool images are first embedded into `{out}/embeddings/` (resumable per partition, so a killed build picks up
where it stopped); an existing embedding set is used as is. The index is skipped when `index.json` records
the same config hash and embeddings hash.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, EmbedConfig, EncoderConfig, IndexBuildConfig, to_dict
from pipeline.io import EMBEDDINGS_JSON, InputError, embedding_matrix, json_hash, read_embedding_set, read_json, timed

log = logging.getLogger("rakt")

EMBEDDINGS_SUBDIR = "embeddings"
# what decides the index; encoder run settings (batch size, workers, device) do not, and the embedding set's
# own hash covers the vectors
_INDEX_KEYS = ("kind", "memory_budget", "metric", "metadata", "train_size", "nprobe", "seed")


def run(cfg: IndexBuildConfig) -> dict:
    """Build (or reuse) the index at `cfg.out`; returns kind, factory, count, dim, recall_at_10, seconds."""
    from indexes.faiss_index import INDEX_JSON, build_faiss_index  # faiss only when building

    start = time.perf_counter()
    out = Path(cfg.out)
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
    with timed("index build"):
        info = build_faiss_index(vectors, metadata, out, model=str(emb_meta.get("model", "")), metric=cfg.metric,
                                 kind=cfg.kind, memory_budget=cfg.memory_budget, train_size=cfg.train_size,
                                 nprobe=cfg.nprobe, seed=cfg.seed, extra_info=extra)
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
    parts = [(p.name, p.stat().st_size) for p in sorted(emb_dir.glob("part-*.parquet"))]
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

    enc = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EncoderConfig)}
    emb_cfg = EmbedConfig(**enc, source=list(cfg.source), out=str(out / EMBEDDINGS_SUBDIR), split="pool",
                          partition_size=cfg.partition_size)
    log.info("index: embedding the pool into %s (resumable: done partitions are kept)", emb_cfg.out)
    embed_run(emb_cfg)
    return Path(emb_cfg.out)


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
