"""Transfer manifest over a local pool -> WebDataset shards (original image bytes), resumable per shard."""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from rakt.pipeline.config import ConfigError, MaterializeConfig, config_hash, to_dict
from rakt.pipeline.progress import Progress
from rakt.pipeline.formats import IMAGE_EXTS, MANIFEST_PARQUET, read_manifest
from rakt.pipeline.images import MAX_FILE_BYTES
from rakt.pipeline.io import InputError, atomic_path, file_hash, read_json, timed, write_json
from rakt.pipeline.pool_roots import PoolResolver, PoolRoots, declared_roots, image_ext, pool_file
from rakt.pipeline.shard_records import group_samples, tar_members

log = logging.getLogger("rakt.materialize")

TAR_MTIME = 946684800  # 2000-01-01: fixed member times make reruns byte-identical
MAX_LOGGED = 20  # missing images logged one by one per shard; the rest only counted


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.tar"


def stats_name(j: int) -> str:
    return f"shard-{j:05d}_stats.json"


def check(cfg: MaterializeConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    if cfg.shard_size < 1:
        raise ConfigError(f"rakt materialize: 'shard_size' must be >= 1, got {cfg.shard_size}")


def run(cfg: MaterializeConfig) -> dict:
    """Write `{out}/shard-XXXXX.tar` (+ `_stats.json` resume markers) and `{out}/materialize.json`."""
    check(cfg)
    mpath = Path(cfg.manifest) / MANIFEST_PARQUET
    out = Path(cfg.out)
    with timed("materialize"):
        rows = manifest_rows(mpath)
        mhash = file_hash(mpath)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".shard-*.tmp-*"):
            stale.unlink()
        roots = declared_roots(Path(cfg.manifest), cfg.pool_root)
        log.info("materialize: reading only inside the pool's roots (%s): %s%s", roots.origin,
                 ", ".join(map(str, roots.dirs)) or "-", f" and {len(roots.files)} pool files" if roots.files else "")
        resolver = PoolResolver(cfg.pool_root)
        n_shards = math.ceil(len(rows) / cfg.shard_size)
        shards = []
        bar = Progress(len(rows), "materialize", unit="img")
        for j in range(n_shards):
            marker = out / stats_name(j)
            if marker.exists():
                stats = read_json(marker, "shard stats")
                if stats.get("manifest_hash") != mhash or stats.get("shard_size") != cfg.shard_size:
                    raise InputError(f"{marker}: written for another manifest or shard size; materialize into a "
                                     f"new --out or delete {out}")
                log.debug("%s done already; skipped", shard_name(j))
            else:
                part = rows.iloc[j * cfg.shard_size:(j + 1) * cfg.shard_size]
                stats = write_shard(part, out / shard_name(j), resolver, roots)
                stats.update(manifest_hash=mhash, shard_size=cfg.shard_size, rows=[j * cfg.shard_size,
                                                                                   j * cfg.shard_size + len(part)])
                write_json(marker, stats)
            shards.append(stats)
            bar.update(min(cfg.shard_size, len(rows) - j * cfg.shard_size))
        bar.close()
        for extra in sorted(out.glob("shard-*_stats.json"))[n_shards:]:
            log.warning("%s: beyond this manifest's %d shards; left alone", extra, n_shards)
        missing = Counter()
        for s in shards:
            missing.update(s.get("missing_by_cause", {}))
        summary = {
            "samples": sum(s["count"] for s in shards),
            "missing": sum(s["missing"] for s in shards),
            "missing_by_cause": dict(sorted(missing.items())),
            "shards": [s["shard"] for s in shards],
            "shard_size": cfg.shard_size,
            "pool_roots": roots.describe(),
            "manifest": str(mpath.resolve()),
            "manifest_hash": mhash,
            "settings": to_dict(cfg),
            "config_hash": config_hash(cfg),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(out / "materialize.json", summary)
    if summary["missing"]:
        log.warning("materialize: %d of %d manifest rows skipped: %s", summary["missing"], len(rows),
                    summary["missing_by_cause"])
    if missing["outside_pool"]:
        log.warning("materialize: %d rows locate files outside the pool's roots and were not read; if the pool "
                    "moved, pass --pool-root DIR", missing["outside_pool"])
    log.info("materialize: %d samples in %d shards -> %s", summary["samples"], n_shards, out)
    return {"out": str(out), **{k: summary[k] for k in ("samples", "missing", "missing_by_cause", "shard_size")},
            "shards": n_shards}


def manifest_rows(path: Path) -> pd.DataFrame:
    """Manifest rows sorted by pool_id, each with its sample key and locator kind ('shard', 'path' or None)."""
    df = read_manifest(path).to_pandas()
    has_shard = df["shard"].notna() & df["key"].notna() if {"shard", "key"} <= set(df.columns) else False
    has_path = df["path"].notna() if "path" in df.columns else False
    df["locator"] = np.where(has_shard, "shard", np.where(has_path, "path", None))
    if len(df) and df["locator"].isna().all():
        if "url" in df.columns and df["url"].notna().any():
            raise InputError(f"{path}: the manifest locates its images by url only; materialize reads a local pool "
                             "(shard+key or path); fetch them with `rakt download` instead")
        raise InputError(f"{path}: no locator columns (shard+key or path) with values; rebuild the index with them")
    nth = df.groupby("pool_id", sort=False).cumcount().to_numpy()
    df["sample_key"] = [sample_key(p, n) for p, n in zip(df["pool_id"], nth)]
    return df


def sample_key(pool_id: int, nth: int = 0) -> str:
    """The WebDataset key of a pool image in materialized shards (`nth` > 0: a repeat of it in the manifest)."""
    return f"{pool_id:010d}" if nth == 0 else f"{pool_id:010d}-{nth}"


def pool_id_of(key: str) -> int:
    """The pool_id a `sample_key` names."""
    return int(key.split("-")[0])


def write_shard(rows: pd.DataFrame, dest: Path, resolver: PoolResolver, roots: PoolRoots) -> dict:
    """Read the rows' pool images (only inside the pool's roots) and write one shard atomically; returns its stats."""
    start = time.perf_counter()
    images, missing = {}, Counter()

    def miss(cause: str, row, where: str) -> None:
        missing[cause] += 1
        if sum(missing.values()) <= MAX_LOGGED:
            log.warning("%s: pool image %s (pool_id %d) skipped: %s", dest.name, where, row.pool_id, cause)

    shard_rows = rows[rows["locator"] == "shard"]
    for shard, group in (shard_rows.groupby("shard", sort=True) if len(shard_rows) else ()):
        path, error = pool_file(resolver(shard), roots, "missing_shard", "unreadable_shard")
        found, error = read_pool_shard(path, set(group["key"])) if path else ({}, error)
        for row in group.itertuples():
            got = found.get(row.key)
            bad = got if isinstance(got, str) else image_ext(got[1])[1] if got is not None else ""
            if bad:
                miss(bad, row, f"{shard}:{row.key}")
            elif found.get(row.key) is not None:
                images[row.Index] = found[row.key]
            elif row.key in found:
                miss("no_image", row, f"{shard}:{row.key}")
            else:
                miss(error or "missing_key", row, f"{shard}:{row.key}")
    for row in rows[rows["locator"] == "path"].itertuples():
        path, error = pool_file(resolver(row.path), roots, "missing_file", "unreadable_file")
        if path is not None and path.stat().st_size > MAX_FILE_BYTES:  # declared size: never read
            path, error = None, "file_too_large"
        try:
            data = path.read_bytes() if path else None
        except OSError as e:
            data, error = None, "unreadable_file"
            log.debug("%s: %s", row.path, e)
        ext, bad = image_ext(data) if data else (None, "")
        if data is None or not data or ext is None:
            miss(error if data is None else "empty_file" if not data else bad, row, row.path)
        else:
            images[row.Index] = (ext, data)
    for row in rows[rows["locator"].isna()].itertuples():
        miss("no_local_locator", row, "(url only)")
    with atomic_path(dest) as tmp:
        with TarWriter(str(tmp), encoder=False, user="rakt", group="rakt", mtime=TAR_MTIME) as sink:
            for row in rows.itertuples():
                if row.Index in images:
                    ext, data = images[row.Index]
                    sink.write({"__key__": row.sample_key, ext: data, "json": sample_json(row)})
    return {"shard": dest.name, "count": len(images), "missing": sum(missing.values()),
            "missing_by_cause": dict(sorted(missing.items())), "seconds": round(time.perf_counter() - start, 3)}


def read_pool_shard(path: Path, keys: set[str]) -> tuple[dict, str | None]:
    """Stream one pool shard once with webdataset's tar reader; {key: (ext, bytes)} for the wanted keys, and the
    cause that stopped it early (missing_shard / unreadable_shard), if any. A key without an image maps to None,
    a sample skipped for a duplicate member name or key to that cause."""
    if not path.exists():
        return {}, "missing_shard"
    def wanted(fname: str) -> bool:
        return base_plus_ext(fname)[0] in keys

    found: dict = {}

    def skip(cause: str, key: str) -> None:
        found.setdefault(key, cause)  # a repeated key keeps its first, valid sample

    try:
        with open(path, "rb") as stream:
            for sample in group_samples(tar_members(stream, wanted), skip):
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                found[sample["__key__"]] = None if ext is None else ("jpg" if ext == "jpeg" else ext, sample[ext])
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        log.warning("%s: unreadable pool shard (%s); %d of %d wanted images read before it", path, e, len(found),
                    len(keys))
        return found, "unreadable_shard"
    return found, None


def _value(row, name: str):
    """A manifest field of an itertuples row, None when absent or null."""
    value = getattr(row, name, None)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def sample_json(row) -> bytes:
    """KEY.json: the manifest row's provenance, as sorted-key JSON bytes."""
    get = functools.partial(_value, row)
    source = {"shard": get("shard"), "key": get("key")} if row.locator == "shard" else {"path": get("path")}
    if get("url") is not None:
        source["url"] = get("url")
    score, label, rank, ids = get("score"), get("query_label"), get("rank"), get("query_ids")
    obj = {"pool_id": int(row.pool_id), "id": get("id"), "source": source, "caption": get("caption"),
           "score": None if score is None else round(float(score), 6), "query_id": get("query_id"),
           "query_ids": [] if ids is None else [str(q) for q in ids],
           "query_label": None if label is None else int(label), "rank": None if rank is None else int(rank)}
    return json.dumps(obj, sort_keys=True).encode()
