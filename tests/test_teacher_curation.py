"""Teacher-aware curation and budget filling: `rakt retrieve --fill-per-class`, class slot sharing in `rakt curate`,
and the teacher rules reading `rakt score` output (real FAISS indexes and candidates; the scores table is written
here with chosen predictions, the score stage itself runs in tests/test_run.py)."""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rakt import cli
from rakt.pipeline.io import file_hash, write_json, write_parquet
from test_curate import World, curate

CLASS_NAMES = ["zero", "one", "two", "three"]


def twin_queries(world: World, label: int, n: int = 2) -> None:
    """n queries of one class with the same vector: their neighbourhoods overlap completely."""
    vec = world.near(label)
    for i in range(n):
        world.queries.append((f"c{label}_q{i}", label, "train", vec))


def test_a_class_shares_the_slots_its_overlapping_queries_cannot_fill(tmp_path):
    world = World(seed=11)
    twin_queries(world, 0)  # c0_q0 takes the twins' first 5 neighbours, c0_q1 is left 3 of its 8
    world.query("c0_q2", 0, 2)  # a third query of the class, elsewhere: 3 neighbours to spare
    cands = world.build(tmp_path, k=8)
    per_query, meta_q = curate(cands, tmp_path / "query", budget=3 + 15, balance="query")  # 5 per query
    assert meta_q["counts"]["empty_slots"] == 2 and len(per_query) == 13
    df, meta = curate(cands, tmp_path / "class", budget=3 + 15, balance="class")
    assert meta["counts"]["empty_slots"] == 0 and len(df) == 15
    ranked = pq.read_table(cands / "candidates.parquet").to_pandas()
    top = {q: g.sort_values("rank")["pool_id"].tolist() for q, g in ranked.groupby("query_id")}
    assert set(df["pool_id"]) == set(top["c0_q0"]) | set(top["c0_q2"][:7])  # the spare ones rank by rank


def test_retrieve_requeries_a_class_with_too_few_distinct_neighbours(tmp_path, caplog):
    world = World(seed=12, per_cluster=40)
    twin_queries(world, 0, n=3)
    for i in range(3):
        world.query(f"c1_q{i}", 1, 1 + i)  # apart: 15 distinct neighbours, not re-queried
    cands = world.build(tmp_path, k=5)
    out = tmp_path / "filled"
    args = ["retrieve", str(tmp_path / "target"), "--index", f"faiss:{tmp_path / 'index'}", "--k", "5",
            "--fill-per-class", "12", "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="rakt"):
        assert cli.main(args) == 0
    info = json.loads((out / "candidates.json").read_text())
    assert info["k"] == 5 and info["fill_per_class"] == 12 and info["k_per_class"] == {"0": 20}
    table = pq.read_table(out / "candidates.parquet").to_pandas()
    twins = table[table["query_label"] == 0]
    assert twins.groupby("query_id").size().tolist() == [20, 20, 20] and twins["pool_id"].nunique() == 20
    plain = pq.read_table(cands / "candidates.parquet").to_pandas()
    others = table[table["query_label"] == 1].sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert others.equals(plain[plain["query_label"] == 1].sort_values(["query_id", "rank"]).reset_index(drop=True))
    assert "re-queried 1 class(es)" in caplog.text
    with caplog.at_level(logging.WARNING, logger="rakt"):  # a pool too small for the fill: said, not hidden
        assert cli.main([*args[:-1], str(tmp_path / "short"), "--max-k", "10"]) == 0
    assert "fewer than --fill-per-class 12" in caplog.text


def write_scores(folder, cands, preds: dict[int, tuple[int, float]], classes=CLASS_NAMES):
    """A `rakt score` output for these candidates with the given (pred, prob) per pool_id."""
    ids = sorted(preds)
    write_parquet(folder / "scores.parquet", pa.table({
        "pool_id": pa.array(ids, pa.int64()), "id": [f"pool_{i:05d}" for i in ids],
        "pred": pa.array([preds[i][0] for i in ids], pa.int32()),
        "prob": pa.array([preds[i][1] for i in ids], pa.float32())}))
    write_json(folder / "scores.json", {"classes": classes, "candidates_hash": file_hash(cands / "candidates.parquet")})
    return folder


@pytest.fixture
def scored(tmp_path):
    """Two classes, two queries each; the teacher calls every third candidate class 1 and every fifth unsure."""
    world = World(seed=13)
    for label in (0, 1):
        for i in range(2):
            world.query(f"c{label}_q{i}", label, label)
    cands = world.build(tmp_path, k=30)
    ranked = pq.read_table(cands / "candidates.parquet").to_pandas()
    label_of = ranked.groupby("pool_id")["query_label"].first()
    preds = {int(p): (1 if p % 3 == 0 else int(lab), 0.2 if p % 5 == 0 else 0.9) for p, lab in label_of.items()}
    unscored = int(label_of.index[0])
    del preds[unscored]
    return cands, write_scores(tmp_path / "scores", cands, preds), preds, unscored


def test_teacher_agreement_fills_each_class_with_the_teachers_class_first(tmp_path, scored):
    cands, scores, preds, unscored = scored
    df, meta = curate(cands, tmp_path / "m", budget=4 + 20, balance="class", teacher_scores=str(scores),
                      teacher_agree=True)
    assert meta["counts"]["empty_slots"] == 0 and unscored not in set(df["pool_id"])
    assert all(preds[p][0] == lab for p, lab in zip(df["pool_id"], df["query_label"]))
    assert meta["counts"]["teacher_predicted"] == {"zero": 10, "one": 10, "two": 0, "three": 0}
    assert meta["counts"]["teacher_unscored"] == 1 and meta["counts"]["teacher_disagree_deferred"] > 0
    assert meta["counts"]["teacher_disagree_selected"] == 0
    removed = pq.read_table(tmp_path / "m" / "removed.parquet").to_pandas()
    assert removed["reason"].tolist() == ["teacher_unscored"]  # deferred candidates are not removed
    plain, plain_meta = curate(cands, tmp_path / "plain", budget=4 + 20, balance="class")
    assert "teacher_predicted" not in plain_meta["counts"]
    assert any(preds.get(p, (lab,))[0] != lab for p, lab in zip(plain["pool_id"], plain["query_label"]))

    # a budget beyond what the teacher assigns to class 0: its agreeing candidates all go in, then the others
    big, big_meta = curate(cands, tmp_path / "big", budget=4 + 80, balance="class", teacher_scores=str(scores),
                           teacher_agree=True)
    ranked = pq.read_table(cands / "candidates.parquet").to_pandas()
    agreeing = {int(p) for p, lab in zip(ranked["pool_id"], ranked["query_label"])
                if p in preds and preds[p][0] == lab == 0}
    zero = big[big["query_label"] == 0]
    late = [p for p in zero["pool_id"] if preds[p][0] != 0]
    assert late and big_meta["counts"]["teacher_disagree_selected"] >= len(late)
    assert agreeing - set(big[big["query_label"] == 1]["pool_id"]) <= set(zero["pool_id"])


def test_teacher_min_prob_drops_out_of_domain_candidates(tmp_path, scored):
    cands, scores, preds, _ = scored
    df, meta = curate(cands, tmp_path / "m", budget=4 + 20, balance="class", teacher_scores=str(scores),
                      teacher_min_prob=0.5)
    assert len(df) == 20 and all(preds[p][1] > 0.5 for p in df["pool_id"])
    removed = pq.read_table(tmp_path / "m" / "removed.parquet").to_pandas()
    ood = removed[removed["reason"] == "teacher_ood"]
    assert len(ood) == meta["counts"]["teacher_ood_removed"] > 0 and (ood["cosine"] < 0.5).all()


def test_teacher_scores_of_other_candidates_or_missing_are_refused(tmp_path, scored, capsys):
    cands, scores, preds, _ = scored
    other = World(seed=14)
    other.query("q", 0, 0)
    stale = write_scores(tmp_path / "stale", other.build(tmp_path / "other", k=5), preds)
    base = ["curate", str(cands), "--budget", "24", "--out", str(tmp_path / "m")]
    assert cli.main([*base, "--teacher-scores", str(stale)]) == 2
    assert "computed for other candidates" in capsys.readouterr().err
    assert cli.main([*base, "--teacher-agree"]) == 2
    assert "need --teacher-scores" in capsys.readouterr().err
    assert cli.main([*base, "--teacher-scores", str(tmp_path / "nowhere")]) == 2
    assert "run `rakt score" in capsys.readouterr().err
    assert cli.main([*base, "--teacher-scores", str(scores), "--teacher-min-prob", "2"]) == 2
    assert "--teacher-min-prob is a probability" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
