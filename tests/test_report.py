"""report: a small but real run directory (pool shards, manifests, materialized shards, results, evals, metrics,
step records) -> report.md / report.html / PNGs; a partial run; unreadable pool shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from conftest import image_array, jpeg_bytes, write_shard
from rakt.pipeline.config import MaterializeConfig
from rakt.pipeline.io import write_json, write_parquet
from rakt.pipeline.materialize import run as materialize
from rakt.report import pool_sources, write_report
from rakt.report.plots import read_metrics

CLASSES = ["airplane", "bird", "cat"]
# pool image i: (shard, source); shard 0 is gzip, shard 1 a plain tar
POOL = [(0, "cifar10"), (0, "cifar10"), (0, "tinyimagenet"), (0, "fashion_mnist"), (1, "tinyimagenet"),
        (1, "tinyimagenet")]
SHARDS = ["pool-000000.tar.gz", "pool-000001.tar"]


def write_pool(root: Path) -> list[dict]:
    """Two real pool shards whose KEY.json carry {source, orig_label}; returns the index metadata rows."""
    rows, samples = [], {0: [], 1: []}
    for i, (s, source) in enumerate(POOL):
        key = f"pool_{i:06d}"
        samples[s].append({"__key__": key, "jpg": jpeg_bytes(image_array(i)),
                           "json": {"source": source, "orig_label": f"n{i:04d}"}})
        rows.append({"pool_id": i, "id": key, "shard": str(root / SHARDS[s]), "key": key})
    for s, name in enumerate(SHARDS):
        write_shard(root / name, samples[s])
    return rows


def write_manifest(path: Path, rows: list[dict], labels: list, scores: list) -> None:
    write_parquet(path / "manifest.parquet", pa.table({
        "pool_id": pa.array([r["pool_id"] for r in rows], pa.int64()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "shard": pa.array([r["shard"] for r in rows], pa.string()),
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "score": pa.array(scores, pa.float32()),
        "query_id": pa.array([f"q{lab}" for lab in labels], pa.string()),
        "query_label": pa.array(labels, pa.int64()),
        "rank": pa.array(list(range(len(rows))), pa.int32()),
        "query_ids": pa.array([[f"q{lab}"] for lab in labels], pa.list_(pa.string())),
    }))


def eval_json(acc: float) -> dict:
    conf = [[3, 1, 0], [1, 2, 1], [0, 1, 3]]
    return {"accuracy": acc, "classes": CLASSES, "per_class_accuracy": [0.75, 0.5, 0.75], "confusion": conf,
            "count": 12}


def step(name: str, stage: str, seconds: float, status: str = "done") -> dict:
    return {"step": name, "stage": stage, "config_hash": "abc", "status": status, "started": "2025-01-01T00:00:00",
            "finished": "2025-01-01T00:01:00", "seconds": seconds, "result": {}}


def write_steps(run: Path) -> None:
    for name, stage, secs in [("target", "embed", 12.3), ("manifest", "curate", 4.5),
                              ("arms/retrieved-task-s0/distill", "distill", 100.0)]:
        write_json(run / "steps" / f"{name}.json", step(name, stage, secs))


def write_config(run: Path) -> None:
    cfg = {"teacher": {"model": "timm:tf_efficientnet_lite0", "image_size": 96}, "target": {"per_class": 10},
           "pool": "pool-{000000..000002}.tar.gz", "curate": {"budget": 5000}, "adapt": {"image_size": 128},
           "distill": {"student": "resnet18", "image_size": 64, "epochs": 3}}
    (run / "run.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    rows = write_pool(tmp_path / "pool")
    write_parquet(run / "index" / "metadata" / "part-00000.parquet", pa.Table.from_pylist(
        [{k: r[k] for k in ("id", "shard", "key")} for r in rows]))
    write_json(run / "index" / "index.json", {"count": len(rows), "kind": "flat"})
    # retrieved: pool 0-3 -> cifar10 2 of 4 (50.0%), tinyimagenet and fashion_mnist 1 each (25.0%)
    write_manifest(run / "manifest", rows[:4], [0, 1, 2, 0], [0.9, 0.8, 0.7, 0.6])
    write_json(run / "manifest" / "manifest.json", {
        "counts": {"queries": 3, "candidates": 40, "leakage_removed": 1, "near_dup_removed": 1, "dedup_merged": 7,
                   "selected": 4, "empty_slots": 0, "per_class": {"0": 2, "1": 1, "2": 1}},
        "leakage_guard": {"enabled": True, "threshold": 0.95}})
    write_parquet(run / "manifest" / "removed.parquet", pa.table({
        "pool_id": pa.array([4, 5], pa.int64()), "id": ["pool_000004", "pool_000005"],
        "reason": ["leakage", "near_dup"], "matched_id": ["test_1", "pool_000001"],
        "matched_pool_id": pa.array([None, 1], pa.int64()), "cosine": pa.array([0.97, 0.99], pa.float32())}))
    # random: pool 1, 2, 4, 5 -> cifar10 25.0%, tinyimagenet 75.0%
    write_manifest(run / "random-manifest", [rows[i] for i in (1, 2, 4, 5)], [None] * 4, [float("nan")] * 4)
    write_json(run / "random-manifest" / "manifest.json", {"counts": {"selected": 4}})
    materialize(MaterializeConfig(manifest=str(run / "manifest"), out=str(run / "shards"),
                                 pool_root=str(tmp_path / "pool")))
    arms = [("labelled-none-s0", "labelled", "none", 0, 0.30), ("labelled-none-s1", "labelled", "none", 1, 0.32),
            ("retrieved-task-s0", "retrieved", "task", 0, 0.41), ("retrieved-task-s1", "retrieved", "task", 1, 0.43),
            ("random-task-s0", "random", "task", 0, 0.35)]
    write_json(run / "results.json", {
        "device": "cpu: test", "classes": CLASSES, "teacher": {"accuracy": 0.551, "mode": "linear", "seconds": 3.1},
        "arms": [{"arm": a, "transfer_set": t, "method": m, "seed": s, "accuracy": acc, "transfer_samples": 4,
                  "seconds": {"distill": 100.0, "finetune": 5.0, "evaluate": 20.0}} for a, t, m, s, acc in arms],
        "summary": [{"transfer_set": "retrieved", "method": "task", "seeds": 2, "mean": 0.42, "std": 0.0141,
                     "min": 0.41, "max": 0.43, "seconds_mean": 125.0},
                    {"transfer_set": "random", "method": "task", "seeds": 1, "mean": 0.35, "std": 0.0,
                     "min": 0.35, "max": 0.35, "seconds_mean": 125.0},
                    {"transfer_set": "labelled", "method": "none", "seeds": 2, "mean": 0.31, "std": 0.0141,
                     "min": 0.30, "max": 0.32, "seconds_mean": 25.0}]})
    for a, *_, acc in arms:
        write_json(run / "arms" / a / "eval.json", eval_json(acc))
    lines = [{"step": s, "epoch": 0, "kd": 1 / s, "loss": 1 / s, "lr": 1e-3} for s in (1, 2, 3, 2, 3, 4)]
    for a in ("retrieved-task-s0", "random-task-s0"):
        (run / "arms" / a / "distill").mkdir(parents=True)
        (run / "arms" / a / "distill" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (run / "arms" / "labelled-none-s0" / "finetune").mkdir(parents=True)
    (run / "arms" / "labelled-none-s0" / "finetune" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "epoch": 0, "ce": 2.0, "loss": 2.0}) + "\n")
    write_steps(run)
    write_config(run)
    return run


def table_row(md: str, first_cell: str, after: str = "") -> list[str]:
    """The cells of the first Markdown table row starting with `first_cell`, after the text `after`."""
    md = md[md.index(after):]
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return line.strip("| ").split(" | ")


def test_full_report(run_dir):
    out = write_report(run_dir)
    md, page = Path(out["markdown"]).read_text(), Path(out["html"]).read_text()
    assert out["markdown"] == str(run_dir / "report.md") and out["html"] == str(run_dir / "report.html")
    # results: mean ± std per (transfer set, method), labelled-only first, then the teacher row
    for text in (md, page):
        assert "42.0 ± 1.4%" in text and "31.0 ± 1.4%" in text and "35.0 ± 0.0%" not in text and "55.1%" in text
    assert table_row(md, "random / task")[1:4] == ["35.0%", "1", "—"]  # one seed: no spread or range shown
    assert md.index("| labelled / none |") < md.index("| random / task |") < md.index("| retrieved / task |")
    assert table_row(md, "adapted teacher (linear)")[1] == "55.1%"
    # the summary paragraph is built from the numbers
    what = md.split("## What happened", 1)[1].split("##", 1)[0]
    assert "4 images" in what and "42.0 ± 1.4%" in what and "31.0%" in what and "55.1%" in what
    # pool sources: planted in the pool shards' KEY.json
    header = table_row(md, "images of")
    share = dict(zip(header, table_row(md, "retrieved", "| images of |")))
    assert share["cifar10"] == "50.0%" and share["tinyimagenet"] == "25.0%" and share["fashion_mnist"] == "25.0%"
    random_ = dict(zip(header, table_row(md, "random", "| images of |")))
    assert random_["cifar10"] == "25.0%" and random_["tinyimagenet"] == "75.0%"
    assert dict(zip(header, table_row(md, "whole pool", "| images of |")))["cifar10"] == "33.3%"
    assert "<td>50.0%</td>" in page
    # curation counts and removed.parquet by reason
    assert table_row(md, "duplicate hits merged") == ["duplicate hits merged", "7", "—"]
    assert "| retrieved | leakage | 1 |" in md and "| retrieved | near_dup | 1 |" in md
    assert "| retrieved-task-s0 | 41.0% |" in md
    # steps table and settings
    assert "| arms/retrieved-task-s0/distill | distill | 100.0 | done |" in md
    assert "10 labelled images per class (3 classes), student resnet18." in md and "Missing" not in md
    names = {Path(p).stem for p in out["plots"]}
    assert names == {"accuracy", "per_class", "confusion", "curves", "images_per_class", "scores", "sources",
                     "samples"}
    for p in out["plots"]:
        assert Path(p).parent == run_dir / "report"
        assert f'<img src="report/{Path(p).name}"' in page and f"(report/{Path(p).name})" in md
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    leftovers = [p.name for p in run_dir.rglob(".*tmp*")]
    assert not leftovers


def test_partial_run_reports_missing_sections(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    write_config(run)
    write_steps(run)
    write_json(run / "steps" / "index.started.json", {"step": "index", "config_hash": "x", "started": "2025"})
    write_json(run / "steps" / "target.started.json", {"step": "target", "config_hash": "x", "started": "2025"})
    out = write_report(run)
    md, page = Path(out["markdown"]).read_text(), Path(out["html"]).read_text()
    assert out["plots"] == [] and not (run / "report").exists()
    assert "| index |  | 0.0 | running or interrupted |" in md and md.count("| target |") == 1
    assert "no results.json" in md and "| target | embed | 12.3 | done |" in md
    for section in ("Results", "Per-class accuracy", "Training curves", "Transfer sets"):
        body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert "_Missing:" in body, section
    assert 'class="missing"' in page and "timm:tf_efficientnet_lite0" in page


def test_a_run_without_results_json_summarizes_its_arms_evals(tmp_path):
    """Mid-run (no results.json yet) the results table comes from each arm's eval.json, seeds pooled."""
    run = tmp_path / "midrun"
    run.mkdir()
    write_config(run)
    write_steps(run)
    for name, acc in [("retrieved-task-s0", 0.50), ("retrieved-task-s1", 0.54), ("labelled-none-s0", 0.25)]:
        write_json(run / "arms" / name / "eval.json", eval_json(acc))
    md = Path(write_report(run)["markdown"]).read_text()
    results = md.split("## Results\n", 1)[1].split("\n## ", 1)[0]
    assert "52.0 ± 2.8%" in results and "25.0%" in results, results
    assert results.index("labelled") < results.index("retrieved"), results


def test_metrics_keep_last_occurrence_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "loss": v}) for s, v in [(1, 5.0), (2, 4.0), (2, 3.0)])
                    + "\n{\"step\": 3, \"lo")  # a line cut short by a kill
    df = read_metrics(path)
    assert df["step"].tolist() == [1, 2] and df["loss"].tolist() == [5.0, 3.0]


def test_pool_sources_counts_unreadable_shards(tmp_path):
    rows = write_pool(tmp_path / "pool")
    bad = tmp_path / "pool" / "broken.tar.gz"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    rows += [{"pool_id": 10, "id": "x", "shard": str(bad), "key": "pool_000010"},
             {"pool_id": 11, "id": "y", "shard": str(tmp_path / "gone.tar"), "key": "pool_000011"}]
    df = pa.Table.from_pylist(rows).to_pandas()
    src = pool_sources(df)
    assert src.attrs["unreadable_shards"] == 2
    assert src.to_dict() == {i: s for i, (_, s) in enumerate(POOL)}


def test_summary_computed_from_arms_when_results_have_none(tmp_path):
    run = tmp_path / "run"
    write_json(run / "results.json", {"classes": CLASSES, "arms": [
        {"arm": "labelled-none-s0", "accuracy": 0.2, "seconds": {"finetune": 4.0}},
        {"arm": "retrieved-agnostic-s0", "accuracy": 0.4, "seconds": {"distill": 10.0, "finetune": 2.0}},
        {"arm": "retrieved-agnostic-s1", "accuracy": 0.5, "seconds": {"distill": 12.0, "finetune": 2.0}}]})
    write_json(run / "steps" / "index.json", step("index", "index", 3.0, status="failed"))
    out = write_report(run)
    md = Path(out["markdown"]).read_text()
    assert table_row(md, "retrieved / agnostic")[1:] == ["45.0 ± 7.1%", "2", "40.0% – 50.0%", "13"]
    assert md.index("| labelled / none |") < md.index("| retrieved / agnostic |")
    assert "task-agnostic KD" in md and "Not done: index (failed)" in md and "_Missing: no run.yaml_" in md
    assert [Path(p).name for p in out["plots"]] == ["accuracy.png"]


def test_summary_keeps_the_std_unrounded_for_display():
    """The labelled arm's seeds 27.78 / 28.02 / 27.74 have a std of 0.151 points: the table prints 0.2, not the 0.1
    that a std rounded to 4 decimals of a fraction (0.0015) would print."""
    from rakt.report.results import results_text, summarize

    arms = [{"transfer_set": "labelled", "method": "none", "accuracy": a, "seconds": {"finetune": 1.0}}
            for a in (0.2778, 0.2802, 0.2774)]
    rows = summarize(arms)
    assert abs(rows[0]["std"] - 0.001514) < 1e-6
    assert "27.8 ± 0.2%" in results_text({"summary": rows})


def test_the_report_names_the_adapted_teachers_own_resolution(run_dir):
    """The adapted teacher's size comes from its checkpoint (results.json), not from the config."""
    what = lambda: Path(write_report(run_dir)["markdown"]).read_text().split("## What happened", 1)[1]  # noqa: E731
    assert "tf_efficientnet_lite0 at 96 px," in what()
    results = json.loads((run_dir / "results.json").read_text())
    for size, text in ((96, "at 96 px,"), (128, "at 96 px (adapted at 128 px),")):
        write_json(run_dir / "results.json", {**results, "teacher": {**results["teacher"], "image_size": size}})
        assert f"tf_efficientnet_lite0 {text}" in what()
