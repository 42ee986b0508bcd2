"""`rakt inspect`: a terminal summary of a transfer manifest or candidates directory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rakt.pipeline.formats import (CANDIDATES_JSON, CANDIDATES_PARQUET, EMBEDDINGS_JSON, MANIFEST_JSON, MANIFEST_PARQUET,
                                   is_manifest_dir)
from rakt.pipeline.io import InputError, read_json, read_parquet

BAR = "▇"
BAR_WIDTH = 40
UNLABELLED = "unlabelled"


def inspect_text(path: str | Path) -> str:
    """Counts, per-class and per-query tables, a score histogram and removal counts, as text."""
    path = Path(path)
    if is_manifest_dir(path):
        return _manifest_text(path)
    if (path / CANDIDATES_PARQUET).exists():
        return _candidates_text(path)
    raise InputError(f"{path}: neither a transfer manifest (manifest.parquet) nor a candidates directory "
                     "(candidates.parquet); pass the --out directory of `rakt curate` or `rakt retrieve`")


def _manifest_text(path: Path) -> str:
    df = read_parquet(path / MANIFEST_PARQUET, "rerun `rakt curate` (or `rakt sample`) into a fresh --out").to_pandas()
    meta = read_json(path / MANIFEST_JSON, "manifest metadata") if (path / MANIFEST_JSON).exists() else {}
    counts = meta.get("counts", {})
    lines = [f"transfer manifest {path}",
             f"  images {len(df)}  unique pool ids {df['pool_id'].nunique()}  queries {counts.get('queries', '?')}"
             f"  per-query k {meta.get('per_query_k', '?')}  budget {meta.get('settings', {}).get('budget', '?')}"]
    if counts:
        keys = ("candidates", "below_min_score", "leakage_removed", "near_dup_removed", "dedup_merged", "selected",
                "empty_slots")
        lines.append("  " + "  ".join(f"{k} {counts[k]}" for k in keys if k in counts))
    guard = meta.get("leakage_guard")
    if guard is not None and not guard.get("enabled"):
        lines.append(f"  leakage guard OFF: {guard.get('reason', '')}")
    hits = df[["query_id", "query_label", "query_ids"]].explode("query_ids") if "query_ids" in df else df
    per_query = hits.groupby("query_ids" if "query_ids" in hits else "query_id").size()
    names = _class_names(meta.get("lineage", {}).get("embeddings"), meta)
    lines += _per_class(df, names), _spread("images per query (all hits)", per_query), _histogram(df["score"])
    return "\n".join(lines)


def _candidates_text(path: Path) -> str:
    df = read_parquet(path / CANDIDATES_PARQUET, "rerun `rakt retrieve` into a fresh --out").to_pandas()
    meta = read_json(path / CANDIDATES_JSON, "candidates metadata") if (path / CANDIDATES_JSON).exists() else {}
    valid = df[df["pool_id"] >= 0]
    lines = [f"candidates {path}",
             f"  rows {len(df)}  valid {len(valid)}  unique pool ids {valid['pool_id'].nunique()}"
             f"  queries {df['query_id'].nunique()}  k {meta.get('k', '?')}  index {meta.get('index', '?')}"]
    by_rank = valid.groupby("rank")["score"].mean()
    if len(by_rank):
        lines.append(f"  mean score at rank 0: {by_rank.iloc[0]:.4f}  at rank {by_rank.index[-1]}: "
                     f"{by_rank.iloc[-1]:.4f}")
    lines += _per_class(valid.drop_duplicates("query_id"), _class_names(meta.get("embeddings"), meta)), _spread(
        "candidates per query", valid.groupby("query_id").size()), _histogram(valid["score"])
    return "\n".join(lines)


def _class_names(embeddings_dir: str | None, meta: dict) -> list[str]:
    """Class names recorded with the queries (text-query classes, or the query embedding set's), if any."""
    if meta.get("classes"):
        return list(meta["classes"])
    emb_json = Path(embeddings_dir) / EMBEDDINGS_JSON if embeddings_dir else None
    if emb_json is not None and emb_json.exists():
        return list(read_json(emb_json).get("classes") or [])
    return []


def _per_class(df: pd.DataFrame, names: list[str] | None = None, top: int = 12) -> str:
    labels = df["query_label"].astype("Int64")
    labels = labels.astype(object).where(labels.notna(), UNLABELLED).map(str)
    counts = labels.value_counts()
    if counts.empty:
        return "per class: (none)"
    order = sorted(counts.index, key=lambda s: (s == UNLABELLED, int(s) if s != UNLABELLED else 0))
    shown = order[:top]
    names = names or []

    def label(s: str) -> str:
        return f"{s} {names[int(s)]}" if s != UNLABELLED and int(s) < len(names) else s

    rows = [f"    {label(name):>16}  {counts[name]:>8}" for name in shown]
    if len(order) > top:
        rows.append(f"    ... {len(order) - top} more classes")
    return "\n".join([f"per class ({len(order)} classes; min {counts.min()} median {int(counts.median())} "
                      f"max {counts.max()}):", f"    {'class':>16}  {'rows':>8}", *rows])


def _spread(title: str, per: pd.Series, show: int = 3) -> str:
    if per.empty:
        return f"{title}: (none)"
    per = per.sort_values(kind="mergesort")
    head = f"{title} ({len(per)} queries): min {per.min()} median {per.median():g} max {per.max()}"
    low = ", ".join(f"{q} {n}" for q, n in per.head(show).items())
    high = ", ".join(f"{q} {n}" for q, n in per.tail(show).iloc[::-1].items())
    return f"{head}\n    fewest: {low}\n    most:   {high}"


def _histogram(scores: pd.Series, bins: int = 10) -> str:
    values = scores.dropna().to_numpy(np.float64)
    if values.size == 0:
        return "score histogram: (no scores)"
    lo, hi = float(values.min()), float(values.max())
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1e-6))
    scale = BAR_WIDTH / max(int(counts.max()), 1)
    rows = [f"  [{edges[i]:7.4f}, {edges[i + 1]:7.4f}{']' if i == bins - 1 else ')'} {counts[i]:>8} "
            f"{BAR * int(round(counts[i] * scale))}" for i in range(bins)]
    return "\n".join([f"score histogram ({values.size} scores, mean {values.mean():.4f}):", *rows])
