"""`rakt sample`: a uniform random transfer manifest drawn from an index's pool or from WebDataset shards.

The paper's baselines: a random pool sample as large as the retrieved transfer set (`--like`), and
target-unlabelled images (target train shards minus the labelled few-shot images, `--exclude`). The output
has the layout `rakt curate` writes (docs/formats.md, section 4), so `rakt materialize` reads it unchanged.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext

from rakt.indexes.registry import has_scheme, is_index_spec
from rakt.pipeline.config import ConfigError, SampleConfig, config_hash, to_dict
from rakt.pipeline.formats import (EMBEDDINGS_JSON, IMAGE_EXTS, LOCATOR_COLUMNS, MANIFEST_JSON, MANIFEST_PARQUET,
                                   REMOVED_SCHEMA, is_manifest_dir, manifest_size, read_embedding_set,
                                   write_manifest)
from rakt.pipeline.io import InputError, read_json, timed
from rakt.pipeline.shard_records import has_end_marker
from rakt.pipeline.source_specs import detect_source

log = logging.getLogger("rakt.sample")

SOURCES = "an index directory (index.json + metadata/) or WebDataset shards (.tar/.tar.gz files, brace patterns " \
          "like 'dir/train-{000000..000004}.tar.gz', or a folder of shards)"


@dataclass
class Pool:
    """What can be drawn: `size` rows (row i = pool_id i), their ids, and id + locator columns of chosen rows."""
    kind: str
    source: list[str]
    size: int
    ids: Callable[[], pa.Array]
    rows: Callable[[np.ndarray], pa.Table]
    counts: dict = field(default_factory=dict)


def check(cfg: SampleConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    if not cfg.n and not cfg.like:
        raise ConfigError("rakt sample: give --n (how many images to draw) or --like MANIFEST_DIR (draw as many "
                          "as that transfer manifest holds)")


def run(cfg: SampleConfig) -> dict:
    """Draw the sample and write `{out}/manifest.parquet`, `removed.parquet` (empty) and `manifest.json` (last)."""
    check(cfg)
    out, chash = Path(cfg.out), config_hash(cfg)
    if (out / MANIFEST_JSON).exists():
        meta = read_json(out / MANIFEST_JSON, "manifest metadata")
        if meta.get("config_hash") != chash:
            raise InputError(f"{out} already holds a manifest made with other settings (config_hash "
                             f"{meta.get('config_hash')} != {chash}); use a new --out or delete the directory")
        log.info("sample: %s is done already (same settings); nothing to do", out)
        return {"out": str(out), **{k: meta["counts"][k] for k in ("selected", "available", "excluded")}}
    with timed("sample"):
        n = wanted(cfg)
        pool = open_pool(cfg.source)
        excluded_ids = read_excluded(cfg.exclude)
        eligible, excluded = None, 0
        if len(excluded_ids):
            hit = pc.is_in(pool.ids(), value_set=excluded_ids).to_numpy(zero_copy_only=False)
            eligible, excluded = np.flatnonzero(~hit), int(hit.sum())
            log.info("sample: %d of %d pool rows excluded (ids in %s)", excluded, pool.size, ", ".join(cfg.exclude))
            if excluded == 0:
                log.warning("sample: no pool id matches the %d excluded ids: another source?", len(excluded_ids))
        available = pool.size - excluded
        if n > available:
            raise InputError(f"cannot draw {n} images: only {available} are available in {', '.join(pool.source)} "
                             f"({pool.size} rows, {excluded} excluded); lower --n")
        pick = np.random.default_rng(cfg.seed).choice(available, size=n, replace=False)
        pool_ids = np.sort(pick if eligible is None else eligible[pick]).astype(np.int64)
        manifest = manifest_table(pool_ids, pool.rows(pool_ids))
        counts = {"selected": n, "available": available, "excluded": excluded, "pool": pool.size, **pool.counts}
        write_manifest(out, manifest, {
            "counts": counts,
            "sampling": {"kind": "random", "source": pool.source, "source_kind": pool.kind, "seed": cfg.seed,
                         "like": str(Path(cfg.like).resolve()) if cfg.like else None,
                         "exclude": [str(Path(p).resolve()) for p in cfg.exclude]},
            "settings": to_dict(cfg),
            "config_hash": chash,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }, REMOVED_SCHEMA.empty_table())
    log.info("sample: %d of %d available images drawn (seed %d) -> %s", n, available, cfg.seed, out / MANIFEST_PARQUET)
    return {"out": str(out), "selected": n, "available": available, "excluded": excluded}


def wanted(cfg: SampleConfig) -> int:
    """How many to draw: --n, else the row count of --like's manifest."""
    if cfg.n:
        return cfg.n
    path = Path(cfg.like) / MANIFEST_PARQUET
    if not path.exists():
        raise InputError(f"{path}: transfer manifest not found (--like); pass a `rakt curate` --out directory")
    return manifest_size(path)


def open_pool(specs: list[str]) -> Pool:
    """The pool of one index directory (or 'faiss:' spec), or of the image samples in WebDataset shards."""
    if not specs:
        raise InputError(f"rakt sample: no source given; pass {SOURCES}")
    if any(is_index_spec(s) for s in specs):
        if len(specs) > 1:
            raise InputError(f"{', '.join(specs)}: an index directory must be the only source")
        return index_pool(specs[0])
    shards = []
    for spec in specs:
        if "{" not in spec and not Path(spec).exists():
            raise InputError(f"{spec}: source not found; pass {SOURCES}")
        kind, paths = detect_source(spec)
        if kind != "shards":
            raise InputError(f"{spec}: neither an index directory nor WebDataset shards; pass {SOURCES}")
        shards += paths
    return shard_pool(specs, shards)


def index_pool(spec: str) -> Pool:
    """Rows of the index metadata: pool_id = FAISS id, read through the index's own metadata reader."""
    from rakt.indexes.registry import open_index

    index = open_index(spec)
    source = spec if has_scheme(spec) else str(Path(spec).resolve())
    def ids() -> pa.ChunkedArray:
        return index.metadata(np.arange(index.size, dtype=np.int64), columns=["id"])["id"].cast(pa.string())

    return Pool("index", [source], int(index.size), ids=ids, rows=index.metadata)


def shard_pool(specs: list[str], shards: list[str]) -> Pool:
    """Image samples of the shards in shard order (tar headers only): id = key, locator shard + key."""
    locs, unreadable = [], 0
    for shard in shards:
        try:
            if not has_end_marker(shard):
                raise tarfile.ReadError("no end-of-archive blocks (truncated?)")
            locs += [(shard, key) for key in list_image_keys(shard)]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            unreadable += 1
            log.warning("%s: unreadable shard (%s); skipped", shard, e)
    if not locs:
        raise InputError(f"{', '.join(specs)}: no readable image samples ({len(shards)} shards, {unreadable} "
                         f"unreadable); pass {SOURCES}")
    shard_col, keys = (pa.array(col, pa.string()) for col in zip(*locs))
    table = pa.table({"id": keys, "shard": shard_col, "key": keys})
    return Pool("shards", [os.path.abspath(s) for s in specs], table.num_rows, ids=lambda: table["id"],
                rows=lambda ids: table.take(pa.array(ids)), counts={"shards": len(shards),
                                                                     "unreadable_shards": unreadable})


def list_image_keys(shard: str) -> list[str]:
    """Sample keys (as webdataset groups them) with an image member, in order of first appearance."""
    keys: dict[str, None] = {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if member.isfile():
                key, ext = base_plus_ext(member.name)
                if key and ext and ext.lower() in IMAGE_EXTS:
                    keys.setdefault(key)
    return list(keys)


def read_excluded(paths: list[str]) -> pa.Array:
    """Distinct image ids of embedding sets (embeddings.json) and transfer manifests (manifest.parquet)."""
    ids = []
    for spec in paths:
        path = Path(spec)
        if (path / EMBEDDINGS_JSON).exists():
            ids.append(read_embedding_set(path, columns=["id"])[1]["id"])
        elif is_manifest_dir(path):
            ids.append(pq.read_table(path / MANIFEST_PARQUET, columns=["id"])["id"])
        else:
            raise InputError(f"{path}: --exclude takes embedding sets (with {EMBEDDINGS_JSON}, from `rakt embed`) "
                             f"or transfer manifests (with {MANIFEST_PARQUET}); found neither")
    if not ids:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array([c.cast(pa.string()) for col in ids for c in col.chunks], pa.string()))


def manifest_table(pool_ids: np.ndarray, rows: pa.Table) -> pa.Table:
    """The curate manifest schema for drawn rows: no query, NaN score, rank -1."""
    n = len(pool_ids)
    cols = {"pool_id": pa.array(pool_ids, pa.int64()), "id": rows["id"].cast(pa.string())}
    cols.update({name: rows[name] for name in LOCATOR_COLUMNS if name in rows.column_names})
    cols["score"] = pa.array(np.full(n, np.nan, np.float32), pa.float32())
    cols["query_id"] = pa.nulls(n, pa.string())
    cols["query_label"] = pa.nulls(n, pa.int64())
    cols["rank"] = pa.array(np.full(n, -1, np.int32), pa.int32())
    cols["query_ids"] = pa.array([[] for _ in range(n)], pa.list_(pa.string()))
    return pa.table(cols)
