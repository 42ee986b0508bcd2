"""curate over candidates read a rank window at a time (rakt/pipeline/curate/windows.py): the manifest, removed.parquet
and counts equal those of one window holding every candidate, whatever the rules and the balance."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import rakt.pipeline.curate.windows as windows
from test_curate import World, curate, unit, write_embedding_set, MODEL
from test_teacher_curation import write_scores


@pytest.fixture(scope="module")
def world_cands(tmp_path_factory):
    """Three classes of overlapping queries, planted near-duplicates and eval look-alikes, a teacher's scores."""
    root = tmp_path_factory.mktemp("windows")
    world = World(seed=21, clusters=3, per_cluster=60)
    for label in range(3):
        for i in range(3):
            world.query(f"c{label}_q{i}", label, label, )
    for j in range(4):
        base = world.near(j % 3, spread=0.2)
        world.add_pool(base)
        world.add_pool(base + 0.002 * unit(world.rng.normal(size=world.centres.shape[1])))
    for i in range(2):
        ev = world.near(i, spread=0.25)
        world.queries.append((f"test_{i}", i, "test", ev))
        world.add_pool(ev)
    cands = world.build(root, k=40)
    ranked = pq.read_table(cands / "candidates.parquet").to_pandas()
    label_of = ranked.groupby("pool_id")["query_label"].first()
    preds = {int(p): (1 if p % 3 == 0 else int(lab), 0.2 if p % 7 == 0 else 0.9) for p, lab in label_of.items()}
    del preds[int(label_of.index[0])]
    scores = write_scores(root / "scores", cands, preds, classes=["zero", "one", "two"])
    return cands, scores


SETTINGS = {
    "query": dict(budget=9 + 60, near_dup=0.99),
    "class": dict(budget=9 + 90, balance="class", near_dup=0.99, min_score=0.2),
    "no-dedup": dict(budget=9 + 45, dedup=False),
    "teacher": dict(budget=9 + 90, balance="class", teacher_agree=True, teacher_min_prob=0.5),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_windows_select_as_one_window(world_cands, tmp_path, monkeypatch, name):
    cands, scores = world_cands
    kw = dict(SETTINGS[name])
    if name == "teacher":
        kw["teacher_scores"] = str(scores)
    whole, whole_meta = curate(cands, tmp_path / "whole", **kw)
    monkeypatch.setattr(windows, "WINDOW_ROWS", 7)  # a window per rank or two: ~20 windows
    assert len(windows.CandidateWindows(cands / "candidates.parquet").bounds) > 10
    small, small_meta = curate(cands, tmp_path / "small", **kw)
    pd.testing.assert_frame_equal(small, whole)
    assert small_meta["counts"] == whole_meta["counts"] and whole_meta["counts"]["selected"] > 0
    removed = [pq.read_table(tmp_path / d / "removed.parquet").to_pandas() for d in ("whole", "small")]
    pd.testing.assert_frame_equal(removed[1], removed[0])
    assert not list((tmp_path / "small").glob(".candidates-kept*"))  # the spill is gone


def test_near_duplicates_of_a_large_selection_found_in_an_ivf(world_cands, tmp_path, monkeypatch):
    """Above EXACT_NEAR_DUP selected images the near-duplicate search runs in an IVF over them: same drops here."""
    import rakt.pipeline.curate.similarity as filters

    cands, _ = world_cands
    kw = dict(budget=9 + 150, near_dup=0.99)
    exact, exact_meta = curate(cands, tmp_path / "exact", **kw)
    monkeypatch.setattr(filters, "EXACT_NEAR_DUP", 10)
    assert isinstance(filters.range_index(np.eye(4, 32, dtype=np.float32).repeat(50, 0)), filters.faiss.IndexIVFFlat)
    ivf, ivf_meta = curate(cands, tmp_path / "ivf", **kw)
    assert exact_meta["counts"]["near_dup_removed"] == ivf_meta["counts"]["near_dup_removed"] > 0
    pd.testing.assert_frame_equal(ivf, exact)
