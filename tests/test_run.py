"""`rakt run` / `rakt status`: the whole pipeline from one config on a tiny real world (tiny open_clip teacher,
WebDataset shards, a FAISS index, timm students), step skipping by config hash, reruns, and kill-resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import image_array, jpeg_bytes, write_shard
from rakt import cli
from rakt.pipeline.config import ConfigError
from rakt.distill.teacher.inputs import load_images
from rakt.run import KILL_BEFORE_RECORD, execute, load_run_config, status

CLASSES = ["ant", "bee", "cat", "dog"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Target train/test shards (4 classes) and a 60-image pool with per-image source metadata."""
    root = tmp_path_factory.mktemp("world")
    bases = [image_array(100 + c) for c in range(len(CLASSES))]

    def samples(prefix, n, split, seed):
        return [{"__key__": f"{prefix}{c}_{i:03d}", "cls": c, "json": {"split": split},
                 "jpg": jpeg_bytes(image_array(seed + 50 * c + i, base=bases[c], noise=25))}
                for c in range(len(CLASSES)) for i in range(n)]

    write_shard(root / "target" / "train-000000.tar", samples("tr", 6, "train", 0))
    write_shard(root / "target" / "test-000000.tar", samples("te", 4, "test", 1000))
    (root / "target" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    pool = [{"__key__": f"pool_{i:04d}", "json": {"source": "near" if i % 2 else "far", "orig_label": i % 4},
             "jpg": jpeg_bytes(image_array(5000 + i, base=bases[i % 4] if i % 2 else None, noise=30))}
            for i in range(60)]
    write_shard(root / "pool" / "pool-000000.tar", pool)
    return root


def config(world: Path, tiny_clip: str, run_dir: Path, arms=("labelled", "retrieved/task"), **sets) -> dict:
    over = [f"run_dir={run_dir}", f"data={world}", f"teacher.model={tiny_clip}", "teacher.pretrained=''",
            "teacher.image_size=32", "teacher.workers=0", "teacher.batch_size=16",
            "target.train=['${data}/target/train-000000.tar']", "target.test=['${data}/target/test-000000.tar']",
            "target.per_class=3", "pool=['${data}/pool/pool-000000.tar']", "retrieve.k=8", "adapt={mode: linear}",
            "curate={budget: 36, balance: class, leakage_threshold: 1.0}", "distill.student=resnet10t", "distill.image_size=32",
            "distill.epochs=1", "distill.batch_size=16", "distill.warmup=0",
            "distill.cache_views=2", "finetune.epochs=1",
            "experiment.labelled={epochs: 2, lr: 0.001}", f"experiment.arms={list(arms)}",
            "experiment.report=false", *[f"{k}={v}" for k, v in sets.items()]]
    return load_run_config(None, over)


def test_run_skips_finished_steps_and_reruns_changed_ones(world, tiny_clip, tmp_path, one_torch_thread):
    cfg = config(world, tiny_clip, tmp_path / "run")
    first = execute(cfg)
    names = [r["step"] for r in status(tmp_path / "run")]
    assert names[:8] == ["labelled", "target", "eval", "index", "candidates", "manifest", "shards", "teacher"]
    # the few-shot draw is read once and written as one shard; the arms train on exactly those images
    labelled = load_images([str(tmp_path / "run/labelled/labelled-000000.tar")], size=32)
    drawn = load_images([str(world / "target/train-000000.tar")], size=32, per_class=3, seed=0)
    assert torch.equal(labelled.x, drawn.x) and torch.equal(labelled.y, drawn.y)
    assert labelled.classes == CLASSES and len(labelled.y) == 3 * len(CLASSES)
    assert set(first["ran"]) == set(names) and all(r["state"] == "done" for r in status(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [a["arm"] for a in results["arms"]] == ["labelled-none-s0", "retrieved-task-s0"]
    assert all(0.0 <= a["accuracy"] <= 1.0 for a in results["arms"]) and results["teacher"]["accuracy"] is not None
    assert results["arms"][1]["transfer_samples"] == pq.read_metadata(tmp_path / "run/manifest/manifest.parquet").num_rows

    again = execute(cfg)
    assert again["ran"] == [] and set(again["skipped"]) == set(names)
    (tmp_path / "run" / "results.json").unlink()
    assert cli.main(["report", str(tmp_path / "run")]) == 0  # refreshes results.json, writes the report
    report = (tmp_path / "run" / "report.md").read_text()
    assert "retrieved / task" in report and "| ONNX (onnxruntime): CPU ms per image (batch 1) |" in report
    exported = json.loads((tmp_path / "run/arms/retrieved-task-s0/export/export.json").read_text())
    assert exported["check"]["ok"] and set(exported["teacher"]["runtimes"]) == set(exported["student"]["runtimes"])
    assert exported["teacher"]["runtimes"]["onnx"]["latency_ms"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["arms"] == results["arms"]

    changed = execute(config(world, tiny_clip, tmp_path / "run", **{"distill.epochs": 2}))
    assert changed["ran"] == ["arms/retrieved-task-s0/distill", "arms/retrieved-task-s0/finetune",
                              "arms/retrieved-task-s0/evaluate", "arms/retrieved-task-s0/export"]
    summary = json.loads((tmp_path / "run/arms/retrieved-task-s0/distill/summary.json").read_text())
    assert summary["epochs"] == 2

    changed = execute(config(world, tiny_clip, tmp_path / "run", **{"curate": "{budget: 24, balance: class, leakage_threshold: 1.0}",
                                                                    "distill.epochs": 2}))
    assert changed["ran"][0] == "manifest" and "shards" in changed["ran"] and "teacher" not in changed["ran"]
    assert pq.read_metadata(tmp_path / "run/manifest/manifest.parquet").num_rows == 24 - 12

    # a step run again with the same settings (here: its record deleted) reruns every step that read its output
    (tmp_path / "run/steps/manifest.json").unlink()
    again = execute(config(world, tiny_clip, tmp_path / "run", **{"curate": "{budget: 24, balance: class, leakage_threshold: 1.0}",
                                                                  "distill.epochs": 2}))
    assert again["ran"][:2] == ["manifest", "shards"] and "teacher" not in again["ran"]
    assert {"arms/retrieved-task-s0/distill", "arms/retrieved-task-s0/evaluate"} <= set(again["ran"])
    assert "arms/labelled-none-s0/finetune" not in again["ran"]


def test_status_command_and_config_errors(world, tiny_clip, tmp_path, capsys, one_torch_thread):
    cfg = config(world, tiny_clip, tmp_path / "run", adapt="{mode: finetune, epochs: 1, batch_size: 8}")
    execute(cfg, only="teacher")
    assert json.loads((tmp_path / "run/teacher.pt.json").read_text())["mode"] == "finetune"
    rows = {r["step"]: r["state"] for r in status(tmp_path / "run")}
    assert rows["teacher"] == "done" and rows["arms/retrieved-task-s0/distill"] == "pending"
    assert cli.main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "pending" in out and "steps done" in out

    with pytest.raises(ConfigError, match="did you mean 'distill'"):
        load_run_config(None, ["distil.epochs=3"])
    with pytest.raises(ConfigError, match="experiment arm 'retrieved/fancy'"):
        load_run_config(None, ["experiment.arms=[retrieved/fancy]"])
    with pytest.raises(ConfigError, match="KEY.SUB=VALUE"):
        load_run_config(None, ["distill.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"distill": {"epoks": 3}}))
    assert cli.main(["run", str(bad), "--run-dir", str(tmp_path / "bad")]) == 2
    assert "unknown key 'epoks'" in capsys.readouterr().err


def _all_files_whole(run_dir: Path) -> None:
    """No half-written file under a final name: every JSON parses, every parquet and tar reads."""
    import tarfile
    for path in run_dir.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                tar.getmembers()


def test_killed_in_every_stage_then_rerun_finishes_with_the_same_results(world, tiny_clip, tmp_path):
    """SIGKILL the real `rakt run` process once inside each step; rerunning finishes with the results of an
    uninterrupted run."""
    runs = {}
    for name in ("whole", "killed"):
        cfg = config(world, tiny_clip, tmp_path / name)
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        runs[name] = cfg_path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rakt.cli", "run"]
    subprocess.run(cmd + [str(runs["whole"])], check=True, env=env, capture_output=True, cwd=ROOT)

    steps_dir = tmp_path / "killed" / "steps"

    def started_steps() -> list[str]:
        found = sorted(steps_dir.rglob("*.started.json")) if steps_dir.exists() else []
        return [p.relative_to(steps_dir).as_posix().removesuffix(".started.json") for p in found]

    # Kill from outside 0.1 s into each step; a step too fast for that (manifest, shards on this tiny world) is
    # killed by the run itself after its work and before its record (run.KILL_BEFORE_RECORD).
    must_kill = {"target", "index", "candidates", "manifest", "shards", "teacher"}
    kills = []
    for _ in range(40):
        fault = {KILL_BEFORE_RECORD: ",".join(sorted(must_kill - set(kills)))}
        proc = subprocess.Popen(cmd + [str(runs["killed"])], env={**env, **fault}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        victim = None
        while proc.poll() is None and victim is None:
            fresh = [name for name in started_steps() if name not in kills]
            if fresh:
                victim = fresh[0]
                time.sleep(0.1)  # inside the stage's work
            else:
                time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        elif proc.returncode == 0:
            break
        else:  # killed itself before a step's record: that step's marker is the one left
            assert proc.returncode == -signal.SIGKILL, proc.returncode
            victim = next(name for name in started_steps() if name not in kills)
        kills.append(victim)
        _all_files_whole(tmp_path / "killed")
    assert must_kill <= set(kills), kills
    assert any(k.endswith("/distill") for k in kills) and any(k.endswith("/evaluate") for k in kills)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    killed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert [a["arm"] for a in killed["arms"]] == [a["arm"] for a in whole["arms"]]
    assert killed["teacher"]["accuracy"] == whole["teacher"]["accuracy"]
    for a, b in zip(killed["arms"], whole["arms"]):
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.0625 + 1e-9, (a, b)  # one of 16 test images
    for name in ("manifest/manifest.parquet", "shards/shard-00000.tar"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert np.all([r["state"] == "done" for r in status(tmp_path / "killed")])


HOLD = "import sys, time\nfrom rakt.pipeline.io import output_lock\nwith output_lock(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(120)\n"


def test_one_run_per_directory_and_config_checked_before_writing(world, tiny_clip, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = config(world, tiny_clip, run_dir)
    execute(cfg, only="labelled")  # the run's lock and the stage's own do not refuse each other
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    recorded = (run_dir / "run.yaml").read_bytes()

    assert cli.main(["run", str(cfg_path), "--set", "distill.epoks=3"]) == 2  # a typo: nothing is written
    assert "unknown key 'epoks'" in capsys.readouterr().err
    assert cli.main(["run", str(cfg_path), "--set", "curate={budget: ["]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert (run_dir / "run.yaml").read_bytes() == recorded
    assert cli.main(["status", str(run_dir)]) == 0 and "labelled" in capsys.readouterr().out

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == b"held\n"
        record = (run_dir / "steps" / "labelled.json").read_bytes()
        assert cli.main(["run", str(cfg_path), "--only", "labelled"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "run directory" in err
        assert (run_dir / "steps" / "labelled.json").read_bytes() == record
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run leaves no stale lock
        holder.wait()
    assert cli.main(["run", str(cfg_path), "--only", "labelled"]) == 0


def test_a_symlink_to_the_run_directory_takes_the_same_lock(world, tiny_clip, tmp_path, capsys):
    """The lock is keyed by the real path: while a run holds the directory through a symlink, a run on the
    directory itself is refused (and the other way round), and nothing is cleared or rerun."""
    run_dir, link = tmp_path / "run", tmp_path / "link"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(world, tiny_clip, run_dir)))
    assert cli.main(["run", str(cfg_path), "--only", "labelled"]) == 0
    link.symlink_to(run_dir, target_is_directory=True)
    record = (run_dir / "steps" / "labelled.json").read_bytes()
    for held, other in ((link, run_dir), (run_dir, link)):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], cwd=ROOT, stdout=subprocess.PIPE,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert holder.stdout.readline() == b"held\n"
            assert cli.main(["run", str(cfg_path), "--run-dir", str(other), "--only", "labelled"]) == 2
            assert f"pid {holder.pid}" in capsys.readouterr().err
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert (run_dir / "steps" / "labelled.json").read_bytes() == record


def test_the_plan_always_requires_the_leakage_guard(world, tiny_clip, tmp_path):
    from rakt.run.plan import plan

    cfg = config(world, tiny_clip, tmp_path / "run", **{"curate.require_leakage_guard": "false",
                                                        "curate.eval_embeddings": "''"})
    step = next(s for s in plan(cfg) if s.stage == "curate")
    assert step.config.require_leakage_guard is True and step.config.eval_embeddings == str(tmp_path / "run/eval")
    assert "eval" in step.deps


def test_teacher_aware_curation_scores_candidates_before_curate(world, tiny_clip, tmp_path, one_torch_thread):
    run = tmp_path / "run"
    cfg = config(world, tiny_clip, run, arms=("retrieved/task",), **{"curate.teacher_agree": "true",
                                                                     "experiment.report": "true"})
    execute(cfg)
    names = [r["step"] for r in status(run)]
    assert names.index("teacher") < names.index("scores") < names.index("manifest")
    scores = pq.read_table(run / "scores/scores.parquet").to_pandas()
    candidates = pq.read_table(run / "candidates/candidates.parquet").to_pandas()
    assert set(scores["pool_id"]) == set(candidates["pool_id"])  # every distinct candidate, once
    logits = np.stack(scores["logits"].to_numpy())
    assert logits.shape == (len(scores), len(CLASSES)) and (scores["pred"] == logits.argmax(1)).all()
    meta = json.loads((run / "manifest/manifest.json").read_text())
    manifest = pq.read_table(run / "manifest/manifest.parquet").to_pandas()
    pred = scores.set_index("pool_id")["pred"]
    disagree = pred.reindex(manifest["pool_id"]).to_numpy() != manifest["query_label"].to_numpy()
    assert disagree.sum() == meta["counts"]["teacher_disagree_selected"] < len(manifest) / 2
    assert sum(meta["counts"]["teacher_predicted"].values()) == len(manifest)
    assert meta["settings"]["teacher_scores"] == str(run / "scores")
    assert "Teacher-aware curation" in (run / "report.md").read_text()
    assert (run / "report/teacher_predicted.png").stat().st_size > 0


def test_the_adapted_teacher_may_see_its_own_resolution(world, tiny_clip, tmp_path):
    """adapt.image_size raises the finetuned teacher's input size; embed and index keep teacher.image_size; a linear
    teacher is fitted on those embeddings, so the size (e.g. the default's, inherited) does not apply to it."""
    from rakt.run.plan import plan

    steps = {s.name: s for s in plan(config(world, tiny_clip, tmp_path / "run",
                                           adapt="{mode: finetune, epochs: 1, image_size: 48}"))}
    assert steps["teacher"].config.image_size == 48
    assert {steps[name].config.image_size for name in ("index", "target", "eval")} == {32}
    for adapt in ("{mode: finetune, epochs: 1}", "{mode: finetune, epochs: 1, image_size: 24}"):  # never lowered
        same = {s.name: s for s in plan(config(world, tiny_clip, tmp_path / "run", adapt=adapt))}
        assert same["teacher"].config.image_size == 32
    with pytest.raises(ConfigError, match="step 'teacher': 'image_size' must be int"):
        plan(config(world, tiny_clip, tmp_path / "run", adapt="{mode: finetune, image_size: big}"))
    linear = {s.name: s for s in plan(config(world, tiny_clip, tmp_path / "run",
                                             adapt="{mode: linear, image_size: 48}"))}
    assert linear["teacher"].config.embeddings == str(tmp_path / "run" / "target")
    assert linear["teacher"].config.image_size == 32
