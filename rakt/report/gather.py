"""What the run report reads from a run directory: results, step records, arms, transfer sets and the pool's
sources, gathered into one context (whatever of it the run directory holds)."""
from __future__ import annotations

import json
import logging
import tarfile
import zlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from rakt.pipeline.config import ConfigError
from rakt.pipeline.config_yaml import load_yaml
from rakt.pipeline.formats import EMBEDDINGS_JSON, INDEX_JSON, MANIFEST_JSON, MANIFEST_PARQUET, REMOVED_PARQUET
from rakt.report.deliverable import export_figures
from rakt.report.results import summarize
from rakt.rundir import SET_ORDER, TRANSFER_SETS, Arm, method_order

log = logging.getLogger("rakt.report")

STEPS = ["task", "target", "eval", "index", "candidates", "manifest", "shards", "teacher", "random-manifest",
         "random-shards", "target-manifest", "target-shards"]
KEY_SETTINGS = ("model", "image_size", "per_class", "pool", "index_spec", "k", "budget", "mode", "student",
                "epochs", "batch_size", "seeds", "arms", "device")
POOL_ROWS_MAX = 200_000  # read the whole pool's sources only up to this many index rows
UNKNOWN = "unknown"


def pool_sources(manifest_df: pd.DataFrame) -> pd.Series:
    """The pool `source` of each manifest row (index = pool_id), from KEY.json in its pool shard (each shard read
    once). Rows of unreadable shards are left out; `.attrs["unreadable_shards"]` counts those shards."""
    found, bad = _read_sources(manifest_df)
    keys = zip(manifest_df["shard"], manifest_df["key"])
    series = pd.Series([found.get(k) for k in keys], index=manifest_df["pool_id"].to_numpy(), name="source")
    series = series.dropna()
    series.attrs["unreadable_shards"] = bad
    return series


def _read_sources(df: pd.DataFrame) -> tuple[dict, int]:
    """{(shard, key): source} for the rows' shard+key locators, and the count of shards that could not be read."""
    if not {"shard", "key"} <= set(df.columns):
        return {}, 0
    wanted: dict[str, set] = {}
    for shard, key in zip(df["shard"], df["key"]):
        if isinstance(shard, str) and isinstance(key, str):
            wanted.setdefault(shard, set()).add(key)
    found, bad = {}, 0
    for shard, keys in wanted.items():
        left = set(keys)
        try:
            with tarfile.open(shard, "r|*") as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext == "json" and key in left:
                        found[(shard, key)] = json.loads(tar.extractfile(m).read()).get("source")
                        left.discard(key)
                        if not left:
                            break
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            bad += 1
            log.warning("%s: unreadable pool shard (%s); its images count as '%s' source", shard, e, UNKNOWN)
    return found, bad


# --- reading the run directory -------------------------------------------------------------------------------

def _json(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (json.JSONDecodeError, OSError) as e:
        log.warning("%s: unreadable (%s); left out of the report", path, e)
        return None


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def gather(run: Path) -> dict:
    ctx = {"config": None, "results": _json(run / "results.json") or {}, "arms": [], "manifests": {}}
    if (run / "run.yaml").exists():
        try:
            ctx["config"] = load_yaml(run / "run.yaml", what="run config")
        except ConfigError as e:
            log.warning("run.yaml unreadable (%s)", e)
    ctx["steps"] = [r for p in sorted((run / "steps").rglob("*.json")) if not p.name.endswith(".started.json")
                    and (r := _json(p))]
    recorded = {r.get("step") for r in ctx["steps"]}
    for p in sorted((run / "steps").rglob("*.started.json")):  # a step that began but has no record yet
        if (r := _json(p)) and r.get("step") not in recorded:
            ctx["steps"].append({**r, "status": "running or interrupted"})
    order = {s: i for i, s in enumerate(STEPS)}
    phase = {"init": 0, "distill": 0, "finetune": 1, "evaluate": 2}

    def when(r):  # the shared steps in pipeline order, then each arm's steps in theirs
        name = str(r.get("step"))
        return (order.get(name, len(STEPS)), name.rsplit("/", 1)[0], phase.get(name.rsplit("/", 1)[-1], 3), name)
    ctx["steps"].sort(key=when)
    res = ctx["results"]
    arms = {a["arm"]: dict(a) for a in res.get("arms", []) if "arm" in a}
    for d in sorted((run / "arms").glob("*/")) if (run / "arms").exists() else []:
        arms.setdefault(d.name, {"arm": d.name})
    for name, arm in arms.items():
        for k, v in Arm.from_name(name).items():
            arm.setdefault(k, v)
        arm["eval"] = _json(run / "arms" / name / "eval.json")
        if arm.get("accuracy") is None and arm["eval"]:
            arm["accuracy"] = arm["eval"].get("accuracy")
        ctx["arms"].append(arm)
    emb = _json(run / "target" / EMBEDDINGS_JSON) or {}
    first_eval = next((a["eval"] for a in ctx["arms"] if a["eval"]), {}) or {}
    ctx["classes"] = list(res.get("classes") or emb.get("classes") or first_eval.get("classes") or [])
    for ts, tset in reversed(TRANSFER_SETS.items()):  # the retrieved set first
        mdir, sdir = tset.manifest, tset.shards
        if (run / mdir / MANIFEST_PARQUET).exists():
            df = pq.read_table(run / mdir / MANIFEST_PARQUET).to_pandas()
            removed = run / mdir / REMOVED_PARQUET
            ctx["manifests"][ts] = {"df": df, "meta": _json(run / mdir / MANIFEST_JSON) or {},
                                    "removed": pq.read_table(removed).to_pandas() if removed.exists() else None,
                                    "shards": _json(run / sdir / "materialize.json")}
    ctx["index"] = _json(run / "index" / INDEX_JSON) or {}
    ctx["export"] = export_figures(run) or res.get("export")
    return ctx


def pool_shares(run: Path, ctx: dict) -> tuple[dict, int]:
    """{row name: {source: share}} for each manifest (+ the whole pool when small), reading each shard once."""
    frames = {ts: m["df"] for ts, m in ctx["manifests"].items()}
    parts = sorted((run / "index" / "metadata").glob("part-*.parquet"))
    if parts and sum(pq.ParquetFile(p).metadata.num_rows for p in parts) <= POOL_ROWS_MAX:
        cols = [c for c in ("shard", "key") if c in pq.ParquetFile(parts[0]).schema_arrow.names]
        if cols == ["shard", "key"]:
            frames["whole pool"] = pd.concat([pq.read_table(p, columns=cols).to_pandas() for p in parts])
    found, bad = _read_sources(pd.concat([f[["shard", "key"]] for f in frames.values()
                                          if {"shard", "key"} <= set(f.columns)] or [pd.DataFrame()]))
    shares = {}
    for name, df in frames.items():
        if not len(df) or not {"shard", "key"} <= set(df.columns):
            continue
        src = pd.Series([found.get(k) or UNKNOWN for k in zip(df["shard"], df["key"])])
        shares[name] = (src.value_counts() / len(src)).to_dict()
    return shares, bad


# --- the document ---------------------------------------------------------------------------------------------

def summary_rows(ctx: dict) -> list[dict]:
    """One row per (transfer_set, method): results.json's summary, else computed from the arms; labelled first."""
    arms = [a for a in ctx["arms"] if a.get("accuracy") is not None]
    rows = [dict(r) for r in ctx["results"].get("summary", []) if r.get("mean") is not None] or \
        summarize([{**a, "seconds": a.get("seconds") or {}} for a in arms])
    for r in rows:
        r["std"] = r.get("std") or 0.0
        r["values"] = [a["accuracy"] for a in arms if (a.get("transfer_set"), a.get("method")) ==
                       (r.get("transfer_set"), r.get("method"))]

    methods = method_order()

    def rank(r):
        ts, m = r.get("transfer_set"), r.get("method")
        return (SET_ORDER.index(ts) if ts in SET_ORDER else 9, methods.index(m) if m in methods else 9, str(ts),
                str(m))
    for r in rows:
        r["label"] = f"{r.get('transfer_set')} / {r.get('method')}"
    return sorted(rows, key=rank)

