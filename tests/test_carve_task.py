"""`rakt carve`: a labelled target task (train + test shards) carved out of a pool by its KEY.json source and
orig_label, and the pool without those images; and `rakt run` with the carve step (the fashion config's shape)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import image_array, jpeg_bytes, write_shard
from rakt import cli
from rakt.run import execute, load_run_config, status
from rakt.run.plan import plan

CLASSES = ["boot", "coat", "sock"]


def members(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    """Two pool shards (a .tar.gz and a .tar): 8 'fash' images per class (orig_label a class name, one given as
    its index) among 'other' images, keys and KEY.json as in the kit's pool."""
    root = tmp_path_factory.mktemp("pool")
    samples = []
    for i in range(40):
        if i < 24:
            meta = {"source": "fash", "orig_label": CLASSES[i % 3] if i != 5 else 2}
        else:
            meta = {"source": "other", "orig_label": f"n{i:04d}"}
        samples.append({"__key__": f"pool_{i:06d}", "jpg": jpeg_bytes(image_array(i)), "json": meta})
    return [str(write_shard(root / "pool-000000.tar.gz", samples[:20])),
            str(write_shard(root / "pool-000001.tar", samples[20:]))]


def carve(pool, out, *extra) -> int:
    return cli.main(["carve", *pool, "--source", "fash", "--classes", *CLASSES, "--train-per-class", "2",
                     "--test-per-class", "3", "--out", str(out), *extra])


def test_carve_draws_per_class_and_takes_the_task_out_of_the_pool(pool, tmp_path, capsys):
    assert carve(pool, tmp_path / "a") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == {c: 2 for c in CLASSES} and summary["test"] == {c: 3 for c in CLASSES}
    assert summary["removed_from_pool"] == 15 and summary["pool_images"] == 25 and not summary["skipped"]
    assert summary["left_in_pool"] == {c: 3 for c in CLASSES}
    train, test = members(tmp_path / "a/train/train-000000.tar"), members(tmp_path / "a/test/test-000000.tar")
    for split in ("train", "test"):
        assert (tmp_path / "a" / split / "classes.txt").read_text().split("\n")[:3] == CLASSES
    pooled = {**members(Path(pool[0])), **members(Path(pool[1]))}
    for key, m in {**train, **test}.items():  # the pool's image bytes, its class as KEY.cls
        assert m["jpg"] == pooled[key]["jpg"]
        assert json.loads(pooled[key]["json"])["source"] == "fash"
        label = json.loads(pooled[key]["json"])["orig_label"]
        assert int(m["cls"]) == (label if isinstance(label, int) else CLASSES.index(label))
    assert not set(train) & set(test)
    carved_pool = {}
    for shard in sorted((tmp_path / "a/pool").iterdir()):
        carved_pool.update(members(shard))
    assert sorted(carved_pool) == sorted(set(pooled) - set(train) - set(test))  # test images never indexed
    assert all(carved_pool[k] == pooled[k] for k in carved_pool)  # every other sample byte for byte

    # seeded: the same seed draws the same images (same bytes); another seed others; more train keeps the test set
    assert carve(pool, tmp_path / "b") == 0
    assert (tmp_path / "b/test/test-000000.tar").read_bytes() == (tmp_path / "a/test/test-000000.tar").read_bytes()
    assert carve(pool, tmp_path / "c", "--seed", "1") == 0
    assert set(members(tmp_path / "c/test/test-000000.tar")) != set(test)
    assert cli.main(["carve", *pool, "--source", "fash", "--classes", *CLASSES, "--train-per-class", "4",
                     "--test-per-class", "3", "--out", str(tmp_path / "d")]) == 0
    assert set(members(tmp_path / "d/test/test-000000.tar")) == set(test)
    assert set(members(tmp_path / "d/train/train-000000.tar")) > set(train)


def test_carve_rerun_skips_and_other_settings_redo(pool, tmp_path, capsys):
    assert carve(pool, tmp_path) == 0
    capsys.readouterr()
    shard = tmp_path / "test/test-000000.tar"
    before = shard.stat().st_mtime_ns
    assert carve(pool, tmp_path) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True and shard.stat().st_mtime_ns == before
    assert carve(pool, tmp_path, "--seed", "7") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] is False and json.loads((tmp_path / "carve.json").read_text())["config"]["seed"] == 7
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["pool-000000.tar", "pool-000001.tar"]


def test_carve_errors_are_clear(pool, tmp_path, capsys):
    assert cli.main(["carve", *pool, "--source", "mnist", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no image of source 'mnist'" in err and "fash (24)" in err and "other (16)" in err
    assert carve(pool, tmp_path / "y", "--test-per-class", "7") == 2
    assert "too few images for 7 test + 2 train per class: boot has 8" in capsys.readouterr().err
    assert cli.main(["carve", *pool, "--source", "fash", "--classes", "boot", "coat", "--out", str(tmp_path)]) == 2
    assert "orig_label 'sock', not one of --classes" in capsys.readouterr().err
    folder = tmp_path / "folder" / "boot"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(image_array(0)))
    assert cli.main(["carve", str(tmp_path / "folder"), "--out", str(tmp_path / "z")]) == 2
    assert "reads WebDataset shards" in capsys.readouterr().err


def test_run_with_a_carved_task(tiny_clip, tmp_path, one_torch_thread):
    """The fashion config's shape on a tiny world: the task carved out of the pool, then the usual run."""
    bases = [image_array(100 + c) for c in range(4)]
    samples = [{"__key__": f"pool_{i:04d}", "jpg": jpeg_bytes(image_array(5000 + i, base=bases[i % 4], noise=25)),
                "json": {"source": "toy", "orig_label": i % 4}} for i in range(40)]
    samples += [{"__key__": f"pool_{i:04d}", "jpg": jpeg_bytes(image_array(5000 + i)), "json": {"source": "far"}}
                for i in range(40, 64)]
    write_shard(tmp_path / "data/pool/pool-000000.tar", samples)
    over = [f"run_dir={tmp_path / 'run'}", f"data={tmp_path / 'data'}", f"teacher.model={tiny_clip}",
            "teacher.pretrained=''", "teacher.image_size=32", "teacher.workers=0", "teacher.batch_size=16",
            "target.name=Toy", "target.per_class=3", "carve={source: toy, classes: [a, b, c, d], test_per_class: 3}",
            "pool=['${data}/pool/pool-000000.tar']", "retrieve.k=8", "adapt={mode: linear}",
            "curate={budget: 36, balance: class, leakage_threshold: 1.0}", "distill.student=resnet10t", "distill.image_size=32",
            "distill.epochs=1", "distill.batch_size=16", "distill.warmup=0", "distill.cache_views=2",
            "finetune.epochs=1", "experiment.arms=[retrieved/task]", "experiment.report=true"]
    cfg = load_run_config(None, over)
    steps = plan(cfg)
    assert [s.name for s in steps][:2] == ["task", "labelled"] and steps[0].config.train_per_class == 3
    out = execute(cfg)
    run = tmp_path / "run"
    assert all(r["state"] == "done" for r in status(run)) and "task" in out["ran"]
    test_keys = set(members(run / "task/test/test-000000.tar"))
    labelled_keys = set(members(run / "labelled/labelled-000000.tar"))
    assert len(test_keys) == 12 and labelled_keys == set(members(run / "task/train/train-000000.tar"))
    indexed = pq.read_table(run / "index/metadata").column("key").to_pylist()
    assert len(indexed) == 64 - 24 and not (test_keys | labelled_keys) & set(indexed)
    manifest = pq.read_table(run / "manifest/manifest.parquet")
    assert not test_keys & set(manifest.column("key").to_pylist())
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "Toy" and results["classes"] == ["a", "b", "c", "d"]
    assert "Target task: Toy, carved out of the pool" in (run / "report.md").read_text()
    assert execute(cfg)["ran"] == []
