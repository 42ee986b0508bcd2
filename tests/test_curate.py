"""curate: a real flat FAISS index over clustered random vectors, real retrieve candidates, the paper's budget rule."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rakt.indexes.faiss_index import build_faiss_index
from rakt import cli
from rakt.pipeline.config import CurateConfig, RetrieveConfig
from rakt.pipeline.curate.curate import run
from rakt.pipeline.formats import embedding_table
from rakt.pipeline.io import InputError, write_json, write_parquet
from rakt.pipeline.retrieve import run as retrieve

DIM = 32
MODEL = "rakt-test-model"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class World:
    """Pool vectors in clusters (one per class), queries near their class centre, optional eval images."""

    def __init__(self, seed: int = 0, clusters: int = 4, per_cluster: int = 40):
        self.rng = np.random.default_rng(seed)
        self.centres = unit(self.rng.normal(size=(clusters, DIM)))
        self.pool = [unit(c + 0.6 * unit(self.rng.normal(size=(per_cluster, DIM)))) for c in self.centres]
        self.pool = list(np.concatenate(self.pool))
        self.queries: list[tuple[str, int | None, str, np.ndarray]] = []

    def near(self, cluster: int, spread: float = 0.3) -> np.ndarray:
        return unit(self.centres[cluster] + spread * unit(self.rng.normal(size=DIM)))

    def add_pool(self, vector: np.ndarray) -> int:
        self.pool.append(unit(vector))
        return len(self.pool) - 1

    def query(self, qid: str, label: int | None, cluster: int, split: str = "train") -> np.ndarray:
        vec = self.near(cluster)
        self.queries.append((qid, label, split, vec))
        return vec

    def build(self, root: Path, k: int = 30) -> Path:
        """Index + query embedding set + `rakt retrieve` candidates; returns the candidates directory."""
        pool = np.stack(self.pool)
        ids = [f"pool_{i:05d}" for i in range(len(pool))]
        meta = pa.table({"id": ids, "shard": [f"/pool/pool-{i // 100:06d}.tar" for i in range(len(pool))],
                         "key": ids, "caption": [f"caption {i}" for i in range(len(pool))]})
        build_faiss_index(pool, meta, root / "index", model=MODEL, metric="ip", kind="flat")
        write_embedding_set(root / "target", self.queries, MODEL)
        retrieve(RetrieveConfig(embeddings=str(root / "target"), index=f"faiss:{root / 'index'}",
                                out=str(root / "candidates"), k=k))
        return root / "candidates"


def write_embedding_set(path: Path, rows: list, model: str) -> Path:
    qid, labels, splits, vecs = zip(*rows)
    table = embedding_table(qid, [-1 if lab is None else lab for lab in labels], splits, np.stack(vecs))
    write_parquet(path / "part-00000.parquet", table)
    write_json(path / "embeddings.json", {"model": model, "pretrained": "", "dim": DIM, "normalized": True,
                                          "count": len(rows)})
    return path


def curate(cands: Path, out: Path, **kw) -> tuple[pd.DataFrame, dict]:
    run(CurateConfig(candidates=str(cands), out=str(out), **kw))
    return pq.read_table(out / "manifest.parquet").to_pandas(), json.loads((out / "manifest.json").read_text())


def test_paper_k_rule_through_the_cli(tmp_path):
    world = World()
    for i in range(5):
        world.query(f"q{i}", i % 4, i % 4)
    cands = world.build(tmp_path)
    out = tmp_path / "manifest"
    assert cli.main(["curate", str(cands), "--budget", str(11 * 5), "--out", str(out)]) == 0
    man = pq.read_table(out / "manifest.parquet")
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["per_query_k"] == 10 and meta["counts"]["selected"] == 50 == man.num_rows
    assert meta["counts"]["empty_slots"] == 0 and meta["counts"]["queries"] == 5
    df = man.to_pandas()
    assert df["pool_id"].is_unique and df["pool_id"].is_monotonic_increasing
    assert set(man.column_names) >= {"pool_id", "id", "shard", "key", "caption", "score", "query_id", "query_label",
                                     "rank", "query_ids"}
    assert man.schema.field("query_ids").type == pa.list_(pa.string())
    assert (df["id"] == [f"pool_{p:05d}" for p in df["pool_id"]]).all()  # metadata row i describes FAISS id i
    hits = df.explode("query_ids")["query_ids"].value_counts()
    assert (hits >= 10).all() and len(hits) == 5
    assert meta["lineage"]["index_model"] == MODEL and meta["lineage"]["config_hash"]
    assert meta["leakage_guard"]["enabled"] is False
    removed = pq.read_table(out / "removed.parquet")  # empty, yet typed for tools that concatenate audits
    assert removed.num_rows == 0 and removed.schema.field("matched_id").type == pa.string()
    df3, _ = curate(cands, tmp_path / "k3", budget=55, per_query_k=3)
    assert len(df3) == 15


def test_class_balance_gives_equal_class_totals(tmp_path):
    world = World(seed=1)
    layout = {0: 1, 1: 3, 2: 2}  # class -> queries (unequal on purpose)
    for label, n in layout.items():
        for i in range(n):
            world.query(f"c{label}_q{i}", label, label)
    world.query("u_q0", None, 3)  # unlabelled: a group of its own
    cands = world.build(tmp_path)
    nq = len(world.queries)
    df, meta = curate(cands, tmp_path / "m", budget=nq + 40, balance="class")
    assert meta["quota"]["per_class"] == {"0": 10, "1": 10, "2": 10, "unlabelled": 10}
    assert meta["counts"]["per_class"] == {"0": 10, "1": 10, "2": 10, "unlabelled": 10}
    assert df["query_label"].fillna(-1).value_counts().to_dict() == {0: 10, 1: 10, 2: 10, -1: 10}
    plain, _ = curate(cands, tmp_path / "q", budget=nq + 40, balance="query")  # k = 47 // 7 - 1 = 5 per query
    assert plain["query_label"].value_counts(dropna=False).max() == 15  # class 1: 3 queries x 5


def test_dedup_merges_query_ids_and_keeps_best_score(tmp_path):
    world = World(seed=2)
    target = world.pool[7]
    for qid, spread in (("qa", 0.05), ("qb", 0.02)):  # both retrieve pool 7 first; qb scores higher
        world.queries.append((qid, 0, "train", unit(target + spread * unit(world.rng.normal(size=DIM)))))
    cands = world.build(tmp_path)
    scores = pq.read_table(cands / "candidates.parquet").to_pandas()
    first = scores[scores["rank"] == 0].set_index("query_id")
    assert (first["pool_id"] == 7).all()
    df, meta = curate(cands, tmp_path / "m", budget=100, per_query_k=2)
    row = df[df["pool_id"] == 7].iloc[0]
    assert sorted(row["query_ids"]) == ["qa", "qb"] and row["query_id"] == "qb"
    assert row["score"] == pytest.approx(first.loc["qb", "score"])
    assert meta["counts"]["dedup_merged"] >= 1 and len(df) == 4 and df["pool_id"].is_unique
    kept, meta_off = curate(cands, tmp_path / "off", budget=100, per_query_k=2, dedup=False)
    assert (kept["pool_id"] == 7).sum() == 2 and len(kept) == 4 and meta_off["counts"]["dedup_merged"] == 0


def test_near_duplicates_removed_and_refilled(tmp_path):
    world = World(seed=3)
    pairs = []
    for j in range(3):
        base = world.near(0, spread=0.2)
        a = world.add_pool(base)
        b = world.add_pool(base + 0.002 * unit(world.rng.normal(size=DIM)))
        pairs.append((a, b))
    world.query("q0", 0, 0)
    world.queries[0] = ("q0", 0, "train", unit(world.centres[0]))
    cands = world.build(tmp_path, k=40)
    ranked = pq.read_table(cands / "candidates.parquet").to_pandas()
    top = set(ranked[ranked["rank"] < 12]["pool_id"])
    assert all(a in top and b in top for a, b in pairs)  # the planted pairs compete for the budget
    plain, _ = curate(cands, tmp_path / "plain", budget=13)
    assert all(a in set(plain["pool_id"]) and b in set(plain["pool_id"]) for a, b in pairs)
    df, meta = curate(cands, tmp_path / "m", budget=13, near_dup=0.99)
    chosen = set(df["pool_id"])
    assert all(len({a, b} & chosen) == 1 for a, b in pairs)
    assert len(df) == 12 and meta["counts"]["near_dup_removed"] == 3 and meta["counts"]["empty_slots"] == 0
    removed = pq.read_table(tmp_path / "m" / "removed.parquet").to_pandas()
    assert (removed["reason"] == "near_dup").all() and len(removed) == 3
    for r in removed.itertuples():
        assert {r.pool_id, r.matched_pool_id} in [set(p) for p in pairs] and r.cosine > 0.99
        assert r.matched_pool_id in chosen and r.id == f"pool_{r.pool_id:05d}"


def test_min_score_drops_weak_candidates(tmp_path):
    world = World(seed=4)
    for i in range(3):
        world.query(f"q{i}", i, i)
    cands = world.build(tmp_path, k=20)
    scores = pq.read_table(cands / "candidates.parquet")["score"].to_numpy()
    cut = float(np.median(scores))
    df, meta = curate(cands, tmp_path / "m", budget=3 * 30, min_score=cut)
    assert meta["counts"]["below_min_score"] == int((scores < cut).sum()) > 0
    assert (df["score"] >= cut).all() and meta["counts"]["empty_slots"] > 0


def test_leakage_guard_removes_eval_lookalikes(tmp_path, caplog):
    world = World(seed=5)
    for i in range(2):
        world.query(f"q{i}", i, i)
    leaks = []
    for i in range(2):
        ev = world.near(i, spread=0.25)
        world.queries.append((f"test_{i}", i, "test", ev))
        leaks.append(world.add_pool(ev))  # the same image sits in the pool
    cands = world.build(tmp_path, k=30)
    retrieved = set(pq.read_table(cands / "candidates.parquet")["pool_id"].to_pylist())
    assert set(leaks) <= retrieved
    df, meta = curate(cands, tmp_path / "m", budget=2 * 21)
    assert not set(leaks) & set(df["pool_id"]) and meta["counts"]["leakage_removed"] >= 2
    assert meta["leakage_guard"]["enabled"] and meta["leakage_guard"]["count"] == 2
    removed = pq.read_table(tmp_path / "m" / "removed.parquet").to_pandas().set_index("pool_id")
    for i, pid in enumerate(leaks):
        assert removed.loc[pid, "reason"] == "leakage" and removed.loc[pid, "matched_id"] == f"test_{i}"
        assert removed.loc[pid, "cosine"] > 0.999
    with caplog.at_level(logging.WARNING, logger="rakt"):
        off, meta_off = curate(cands, tmp_path / "off", budget=2 * 21, eval_split="none")
    assert "leakage guard is OFF" in caplog.text and not meta_off["leakage_guard"]["enabled"]
    assert set(leaks) <= set(off["pool_id"])
    other = write_embedding_set(tmp_path / "other", world.queries[2:], "another-model")
    with pytest.raises(InputError, match="another-model"):
        curate(cands, tmp_path / "x", budget=42, eval_embeddings=str(other))
    same = write_embedding_set(tmp_path / "eval", world.queries[2:], MODEL)
    df2, meta2 = curate(cands, tmp_path / "m2", budget=42, eval_embeddings=str(same), eval_split="none")
    assert not set(leaks) & set(df2["pool_id"]) and meta2["lineage"]["eval_embeddings"] == str(same)


def test_budget_below_queries_is_refused(tmp_path):
    world = World(seed=6)
    for i in range(4):
        world.query(f"q{i}", 0, 0)
    cands = world.build(tmp_path, k=5)
    with pytest.raises(InputError, match="minimum budget is 8"):
        run(CurateConfig(candidates=str(cands), out=str(tmp_path / "m"), budget=3))
    assert cli.main(["curate", str(cands), "--budget", "3", "--out", str(tmp_path / "m")]) == 2


def test_running_out_of_candidates_warns_and_counts_empty_slots(tmp_path, caplog):
    world = World(seed=7)
    for i in range(3):
        world.query(f"q{i}", i, i)
    cands = world.build(tmp_path, k=5)
    with caplog.at_level(logging.WARNING, logger="rakt"):
        df, meta = curate(cands, tmp_path / "m", budget=100, per_query_k=8)
    assert len(df) == 15 and meta["counts"]["empty_slots"] == 9
    assert "9 of 24 slots stay empty" in caplog.text and "--k" in caplog.text


def test_a_registered_rule_is_applied_counted_and_audited(tmp_path, monkeypatch):
    from rakt.pipeline.curate import rules as curate_rules
    from rakt.pipeline.curate.rules import RuleResult, register, removed_rows, without

    monkeypatch.setattr(curate_rules, "RULES", curate_rules.RULES.copy())  # the test's rule stays in the test

    @register("odd_pool_ids", phase="candidates", count="odd_removed")
    def odd_pool_ids(cands, ctx):
        odd = np.unique(cands.loc[cands["pool_id"] % 2 == 1, "pool_id"].to_numpy())
        gone = removed_rows(odd, "odd_pool_id")
        return RuleResult(without(cands, gone), gone)

    assert list(curate_rules.RULES)[-1] == "odd_pool_ids"
    world = World(seed=8)
    for i in range(3):
        world.query(f"q{i}", i, i)
    cands = world.build(tmp_path, k=30)
    retrieved = set(pq.read_table(cands / "candidates.parquet")["pool_id"].to_pylist())
    df, meta = curate(cands, tmp_path / "m", budget=3 * 6)
    assert len(df) == 15 and (df["pool_id"] % 2 == 0).all()
    odd = sorted(p for p in retrieved if p % 2)
    assert meta["counts"]["odd_removed"] == len(odd) > 0
    removed = pq.read_table(tmp_path / "m" / "removed.parquet").to_pandas()
    assert removed["reason"].tolist() == ["odd_pool_id"] * len(odd) and removed["pool_id"].tolist() == odd
    assert removed["id"].tolist() == [f"pool_{p:05d}" for p in odd] and removed["matched_id"].isna().all()
    with pytest.raises(ValueError, match="already registered"):
        register("odd_pool_ids", phase="candidates", count="x")(odd_pool_ids)


@pytest.mark.parametrize("flags, message", [(["--per-query-k", "-3"], "'per_query_k' must be between 0"),
                                            (["--near-dup", "5"], "--near-dup is a cosine in (0, 1]"),
                                            (["--leakage-threshold", "-2"], "--leakage-threshold is a cosine in [-1, 1]"),
                                            (["--budget", "0"], "--budget must be >= 1")])
def test_settings_out_of_range_are_refused(tmp_path, capsys, flags, message):
    world = World(seed=8)
    world.query("q0", 0, 0)
    cands = world.build(tmp_path, k=5)
    assert cli.main(["curate", str(cands), "--budget", "20", *flags, "--out", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_guard_without_eval_images_says_off_or_is_refused_when_required(tmp_path, capsys):
    world = World(seed=9)
    for i in range(2):
        world.query(f"q{i}", i, i)  # train rows only: the query embedding set has no test split
    cands = world.build(tmp_path, k=10)
    assert cli.main(["curate", str(cands), "--budget", "10", "--out", str(tmp_path / "m")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["leakage_guard"].startswith("OFF: no rows with split == 'test'")
    meta = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert meta["leakage_guard"]["status"] == summary["leakage_guard"] and not meta["leakage_guard"]["enabled"]

    out = tmp_path / "req"
    assert cli.main(["curate", str(cands), "--budget", "10", "--require-leakage-guard", "--out", str(out)]) == 2
    assert "the leakage guard is required but has no eval images" in capsys.readouterr().err
    assert not out.exists()
    ev = write_embedding_set(tmp_path / "eval", [("test_0", 0, "test", world.near(0))], MODEL)
    assert cli.main(["curate", str(cands), "--budget", "10", "--require-leakage-guard", "--eval-embeddings", str(ev),
                     "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["leakage_guard"] == "on: 1 eval images, cosine > 0.95 dropped"
