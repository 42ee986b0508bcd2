"""inspect: a readable summary of a manifest (counts, per class/query, histogram, removals) and of candidates."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rakt import cli
from rakt.pipeline.inspect import inspect_text
from rakt.pipeline.io import InputError, write_json, write_parquet


def manifest_dir(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 30
    labels = [i % 3 if i < 27 else None for i in range(n)]
    qids = [f"q{i % 5}" for i in range(n)]
    write_parquet(path / "manifest.parquet", pa.table({
        "pool_id": pa.array(np.arange(n) * 3, pa.int64()),
        "id": [f"pool_{i}" for i in range(n)],
        "shard": ["pool-000000.tar"] * n, "key": [f"pool_{i}" for i in range(n)],
        "score": pa.array(np.sort(rng.uniform(0.2, 0.9, n)), pa.float32()),
        "query_id": qids, "query_label": pa.array(labels, pa.int64()),
        "rank": pa.array(np.arange(n) % 6, pa.int32()),
        "query_ids": pa.array([[q, "q9"] if i < 4 else [q] for i, q in enumerate(qids)], pa.list_(pa.string())),
    }))
    write_json(path / "manifest.json", {
        "counts": {"queries": 6, "candidates": 120, "below_min_score": 4, "leakage_removed": 2, "near_dup_removed": 7,
                   "dedup_merged": 4, "selected": 30, "empty_slots": 0, "per_class": {}},
        "per_query_k": 5, "settings": {"budget": 36},
        "leakage_guard": {"enabled": False, "reason": "no rows with split == 'test'"}})
    return path


def test_manifest_summary(tmp_path, capsys):
    text = inspect_text(manifest_dir(tmp_path / "m"))
    assert "images 30" in text and "queries 6" in text and "per-query k 5" in text
    assert "leakage_removed 2" in text and "near_dup_removed 7" in text and "dedup_merged 4" in text
    assert "leakage guard OFF" in text
    assert "per class (4 classes; min 3 median 9 max 9)" in text and "unlabelled" in text
    assert "images per query (all hits) (6 queries): min 4 median 6 max 6" in text
    bars = [line for line in text.splitlines() if line.startswith("  [")]
    assert len(bars) == 10 and sum(int(re.match(r"\s+\[[^)\]]*[)\]]\s+(\d+)", b)[1]) for b in bars) == 30
    assert "▇" * 40 in text  # the fullest bin spans the whole width
    assert cli.main(["inspect", str(tmp_path / "m")]) == 0
    assert "score histogram (30 scores" in capsys.readouterr().out


def test_candidates_summary_and_bad_dir(tmp_path):
    path = tmp_path / "c"
    n_q, k = 4, 5
    write_parquet(path / "candidates.parquet", pa.table({
        "query_id": [f"q{i}" for i in range(n_q) for _ in range(k)],
        "query_label": pa.array([i % 2 for i in range(n_q) for _ in range(k)], pa.int64()),
        "rank": pa.array([r for _ in range(n_q) for r in range(k)], pa.int32()),
        "pool_id": pa.array([(i * 3 + r) if r < 4 or i else -1 for i in range(n_q) for r in range(k)], pa.int64()),
        "score": pa.array([1.0 - 0.1 * r for _ in range(n_q) for r in range(k)], pa.float32()),
    }))
    write_json(path / "candidates.json", {"k": k, "n_queries": n_q, "index": "faiss:/x"})
    text = inspect_text(path)
    assert "rows 20  valid 19" in text and "queries 4  k 5" in text
    assert "candidates per query (4 queries): min 4 median 5 max 5" in text
    assert "mean score at rank 0: 1.0000" in text and "▇" in text
    with pytest.raises(InputError, match="neither a transfer manifest"):
        inspect_text(tmp_path)
