"""Hostile or clumsy use through the CLI (issue 27): a full disk, a read-only run directory and out-of-range settings
end as `rakt: error: ...` naming the file or key (exit 2), never as a traceback. Full and read-only filesystems are
real: a tiny tmpfs or a read-only bind mount in a user + mount namespace (conftest.run_rakt)."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import image_array, jpeg_bytes, run_rakt, write_shard
from rakt import cli
from test_run import config, world  # noqa: F401  (the tiny run world: target and pool shards)

TEACHER_CLASSES = ["ant", "bee", "cat"]


def assert_rakt_error(proc, *texts: str) -> None:
    """Exit 2, a one-line `rakt: error:` naming `texts`, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("rakt: error: "))
    for text in texts:
        assert text in error, (text, error)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A labelled pool shard (40 images, 4 classes) with classes.txt, and a transfer manifest over it."""
    from test_materialize import write_manifest

    root = tmp_path_factory.mktemp("hostile")
    shard = root / "pool" / "pool-000000.tar"
    write_shard(shard, [{"__key__": f"pool_{i:06d}", "jpg": jpeg_bytes(image_array(i, size=64)), "cls": i % 4,
                         "json": {"split": "train"}} for i in range(40)])
    (root / "pool" / "classes.txt").write_text("a\nb\nc\nd\n")
    write_manifest(root / "manifest", [{"pool_id": i, "shard": str(shard), "key": f"pool_{i:06d}"}
                                       for i in range(40)])
    (root / "manifest" / "manifest.json").write_text(json.dumps({"counts": {}}))
    return root


@pytest.fixture(scope="module")
def teacher(tiny_clip, tmp_path_factory) -> Path:
    """A linear teacher over the tiny open_clip config (3 classes)."""
    from rakt.distill.teacher.checkpoint import save_teacher
    from rakt.distill.teacher.modes import build_teacher
    from rakt.pipeline.config import EncoderConfig

    torch.manual_seed(0)
    model = build_teacher(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"), len(TEACHER_CLASSES),
                          "linear", logit_scale=10.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_teacher(path, model, {"encoder": {"model": tiny_clip, "pretrained": "", "image_size": 0},
                               "model_id": model.model_id, "mode": "linear", "classes": TEACHER_CLASSES})
    return path


DISTILL = ["--student", "resnet10t", "--small-input", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
           "--device", "cpu", "--threads", "1"]


@pytest.mark.parametrize("stage", ["materialize", "labelled", "distill", "embed", "index"])
def test_a_full_disk_is_a_rakt_error_naming_the_file(stage, shards, teacher, tiny_clip, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    model = ["--model", tiny_clip, "--pretrained", "", "--workers", "0"]
    args = {"materialize": ["materialize", shards / "manifest", "--pool-root", shards / "pool", "--out", full / "shards"],
            "labelled": ["labelled", shards / "pool" / "pool-000000.tar", "--out", full / "labelled"],
            "distill": ["distill", shards / "pool" / "pool-000000.tar", "--teacher", teacher, *DISTILL,
                        "--out", full / "distill"],
            "embed": ["embed", shards / "pool" / "pool-000000.tar", *model, "--out", full / "emb"],
            "index": ["index", "build", shards / "pool" / "pool-000000.tar", *model, "--out", full / "index"]}[stage]
    proc = run_rakt(args, tmpfs=(full, 16))
    assert_rakt_error(proc, str(full), "No space left on device", "free space")


def test_a_full_disk_under_the_decoded_copy_is_a_rakt_error_not_a_crash(shards, teacher, tmp_path):
    """distill decodes the transfer images once beside their shards (a memory map): on a full disk the space is
    reserved first, so the error names images.npy instead of the process dying of SIGBUS."""
    full = tmp_path / "full"
    full.mkdir()
    shard = shards / "pool" / "pool-000000.tar"
    copy = f"cp {shlex.quote(str(shard))} {shlex.quote(str(full))}/"
    proc = run_rakt(["distill", full / shard.name, "--teacher", teacher, *DISTILL, "--out", tmp_path / "out"],
                    tmpfs=(full, shard.stat().st_size // 1024 + 24), before=copy)
    assert_rakt_error(proc, "images.npy", "No space left on device")


def test_run_on_a_full_disk_and_on_a_read_only_run_directory(world, tiny_clip, tmp_path):  # noqa: F811
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(world, tiny_clip, tmp_path / "unused")))
    full = tmp_path / "full"
    full.mkdir()
    proc = run_rakt(["run", cfg_path, "--run-dir", full / "run", "--only", "labelled"], tmpfs=(full, 8))
    assert_rakt_error(proc, str(full / "run"), "No space left on device")

    run_dir = tmp_path / "run"
    assert cli.main(["run", str(cfg_path), "--run-dir", str(run_dir), "--only", "labelled"]) == 0
    proc = run_rakt(["run", cfg_path, "--run-dir", run_dir, "--only", "labelled"], read_only=tmp_path)
    assert_rakt_error(proc, str(tmp_path), "Read-only file system", "writable")
    proc = run_rakt(["report", run_dir], read_only=run_dir)
    assert_rakt_error(proc, str(run_dir), "Read-only file system", "writable")


@pytest.mark.parametrize("args,texts", [
    (["run", "--set", "distill=3"], ["'distill' is a section", "--set distill.KEY=VALUE"]),
    (["run", "--set", "teacher=[1]"], ["'teacher' is a section"]),
    (["run", "--set", "experiment.arms=3"], ["'experiment.arms' must be a list"]),
    (["run", "--set", "target={per_class: 3}"], ["'target.train' is missing"]),
    (["run", "--set", "data=[1]"], ["'data' must be a string"]),
    (["run", "--set", "curate.budget=1e23"], ["'budget' must be between", "1e23"]),
    (["run", "--set", "experiment.seeds=[-1]"], ["'seed' must be between 0 and 4294967295, got -1"]),
    (["run", "--set", "distill.lr=0"], ["step 'arms/retrieved-task-s0/distill'", "'lr' must be > 0, got 0.0"]),
    (["run", "--set", "retrieve.max_k=10"], ["step 'candidates'", "--max-k >= --k"]),
    (["sample", "pool.tar", "--n", "3", "--seed", "-1", "--out", "x"], ["'seed' must be between 0", "got -1"]),
    (["embed", "x", "--seed", str(2**40), "--out", "x"], ["'seed' must be between 0 and 4294967295"]),
    (["retrieve", "x", "--k", "-5", "--out", "x"], ["'k' must be between 0"]),
    (["distill", "x", "--epochs", "-1", "--out", "x"], ["'epochs' must be between 0"]),
])
def test_settings_out_of_shape_or_range_are_refused_before_any_work(args, texts, tmp_path, capsys, monkeypatch):
    """Each refused while the config is built -- for `rakt run`, every step's settings before the first step
    (here even with --only labelled) -- so nothing is written and no work is lost."""
    monkeypatch.chdir(tmp_path)
    if args[0] == "run":
        args = [*args, "--run-dir", str(tmp_path / "run"), "--only", "labelled"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rakt: error: ") and all(t in err for t in texts), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists()


def test_a_budget_beyond_any_integer_in_a_stage_config_file(tmp_path, capsys):
    (tmp_path / "curate.yaml").write_text("budget: 1e23\n")
    assert cli.main(["curate", str(tmp_path), "--config", str(tmp_path / "curate.yaml"), "--out",
                     str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "curate.yaml: 'budget' must be between" in err and "1e23" in err


# --- inputs that explode work or memory, or hang a reader (issue 27, item 3) ------------------------------------

def alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML value whose last anchor stands for width**levels leaves (a "billion laughs"), all inside one key."""
    anchors = [f"&a0 [{', '.join(['x'] * width)}]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(anchors)}]"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(world, tiny_clip, tmp_path, capsys):  # noqa: F811
    """9 levels of 9 aliases (387 million leaves) in a run config, a stage config or a --set value: refused
    while parsing, naming the file and the alias."""
    cfg = config(world, tiny_clip, tmp_path / "run")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(yaml.safe_dump(cfg).replace("name: CIFAR-10", f"name: {alias_bomb(9)}"))
    assert alias_bomb(9) in bomb.read_text()
    assert cli.main(["run", str(bomb), "--only", "labelled"]) == 2
    err = capsys.readouterr().err
    assert f"rakt: error: {bomb}: not valid YAML: found the alias *a0" in err and "no YAML aliases" in err
    stage = tmp_path / "curate.yaml"
    stage.write_text(f"budget: 10\nnear_dup: {alias_bomb(9)}\n")
    assert cli.main(["curate", str(tmp_path), "--config", str(stage), "--out", str(tmp_path / "m")]) == 2
    assert "found the alias *a0" in capsys.readouterr().err
    assert cli.main(["run", "--set", "target.name=[&a [x, x, x], *a, *a]", "--run-dir", str(tmp_path / "run"),
                     "--only", "labelled"]) == 2
    assert "found the alias *a" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_readers_decide_on_file_type_and_declared_size_before_reading(tmp_path, tiny_clip):
    """An image folder with a FIFO named like an image and two strips (1 x 2,000 and 3,000 x 1 px): embed skips
    all three, counted by cause, and embeds the rest; nothing blocks on the FIFO. A FIFO as --config or --classes
    is an error naming it."""
    root = tmp_path / "imgs"
    for k, cls in enumerate(("ant", "bee")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(jpeg_bytes(image_array(10 * k + i, size=40)))
    (root / "ant" / "strip.png").write_bytes(png_bytes(1, 2000))
    (root / "bee" / "wide.png").write_bytes(png_bytes(3000, 1))
    os.mkfifo(root / "bee" / "pipe.jpg")
    flags = ["--model", tiny_clip, "--pretrained", "", "--workers", "0", "--batch-size", "4"]
    proc = run_rakt(["embed", root, *flags, "--out", tmp_path / "emb"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["count"] == 6 and summary["skipped"] == {"extreme_aspect_ratio": 2, "not_a_regular_file": 1}
    assert "pipe.jpg: a FIFO, not a regular file; skipped" in proc.stderr

    os.mkfifo(tmp_path / "stage.yaml")
    os.mkfifo(tmp_path / "classes.txt")
    for extra, name in ((["--config", tmp_path / "stage.yaml"], "stage.yaml"),
                        (["--classes", tmp_path / "classes.txt"], "classes.txt")):
        proc = run_rakt(["embed", root, *flags, *extra, "--out", tmp_path / "other"], timeout=180)
        assert_rakt_error(proc, str(tmp_path / name), "a FIFO")


def test_materialize_and_distill_skip_an_image_of_extreme_shape(shards, teacher, tmp_path):
    from rakt.pipeline.materialize import run as materialize
    from rakt.pipeline.config import MaterializeConfig
    from test_materialize import write_manifest

    pool = tmp_path / "pool" / "pool-000000.tar"
    write_shard(pool, [{"__key__": f"p{i}", "jpg": jpeg_bytes(image_array(i, size=40))} for i in range(5)]
                + [{"__key__": "strip", "png": png_bytes(1, 2000)}])
    keys = [f"p{i}" for i in range(5)] + ["strip"]
    write_manifest(tmp_path / "manifest", [{"pool_id": i, "shard": str(pool), "key": k} for i, k in enumerate(keys)])
    summary = materialize(MaterializeConfig(manifest=str(tmp_path / "manifest"), out=str(tmp_path / "shards"),
                                            pool_root=str(tmp_path / "pool")))
    assert summary["samples"] == 5 and summary["missing_by_cause"] == {"extreme_aspect_ratio": 1}
    assert cli.main(["distill", str(pool), "--teacher", str(teacher), *DISTILL, "--out", str(tmp_path / "d")]) == 0
    read_errors = json.loads((tmp_path / "d" / "summary.json").read_text())["read_errors"]
    assert read_errors == {"extreme_aspect_ratio": 1}


# --- one bad item costs one item, and never shapes the rest (issue 27, item 4) --------------------------------

def tar_with_duplicates(path: Path, n: int = 20) -> Path:
    """A shard of n labelled samples where sample 4 holds its .jpg twice and sample 9's key comes again at the end
    (tarfile writes both; webdataset stops the shard at the first)."""
    import io
    import tarfile

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            add(tar, f"s{i:03d}.jpg", jpeg_bytes(image_array(i, size=32)))
            if i == 4:
                add(tar, f"s{i:03d}.jpg", jpeg_bytes(image_array(100 + i, size=32)))
            add(tar, f"s{i:03d}.cls", str(i % 2).encode())
        add(tar, "s009.jpg", jpeg_bytes(image_array(99, size=32)))
    (path.parent / "classes.txt").write_text("a\nb\n")
    return path


def test_a_duplicate_member_name_or_key_costs_that_sample_only(tmp_path, capsys):
    """labelled (via the shard reader) and materialize keep the 18 good samples around a duplicated member name
    and a repeated key, each counted; before, the shard ended at the duplicate (truncated_shard)."""
    from test_materialize import write_manifest

    shard = tar_with_duplicates(tmp_path / "pool" / "dup.tar")
    assert cli.main(["labelled", str(shard), "--out", str(tmp_path / "labelled")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"duplicate_key": 1, "duplicate_member": 1}
    assert summary["images"] == 19 and summary["per_class"] == {"a": 9, "b": 10}
    rows = [{"pool_id": i, "shard": str(shard), "key": f"s{i:03d}"} for i in range(20)]
    write_manifest(tmp_path / "manifest", rows)
    assert cli.main(["materialize", str(tmp_path / "manifest"), "--pool-root", str(tmp_path / "pool"),
                     "--out", str(tmp_path / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 19 and summary["missing_by_cause"] == {"duplicate_member": 1}


def test_one_odd_image_never_sets_the_size_of_the_decoded_set(teacher, tmp_path, caplog):
    """A transfer shard whose first image is 1x1 and the rest 24x24: distill decodes them at 24 px (the side of
    most), the 1x1 resized to it with a warning; before, the first image set the side of all (1 px). The teacher's
    labelled images follow the same rule."""
    from rakt.distill.teacher.inputs import load_images

    samples = [{"__key__": "first", "png": png_bytes(1, 1), "cls": 0}]
    samples += [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(image_array(i, size=24)), "cls": i % 3} for i in range(15)]
    shard = write_shard(tmp_path / "transfer" / "shard-00000.tar", samples)
    assert cli.main(["distill", str(shard), "--teacher", str(teacher), *DISTILL, "--out", str(tmp_path / "d")]) == 0
    banks = [json.loads(p.read_text()) for p in (tmp_path / "transfer" / "decoded").glob("*/bank.json")]
    assert [(b["side"], b["count"]) for b in banks] == [(24, 16)]
    assert "1 of 16 images were not 24x24" in caplog.text
    labelled = load_images([str(shard)], size=32)
    assert tuple(labelled.x.shape) == (16, 3, 24, 24)


def test_an_image_over_the_size_cap_is_skipped_unread(tmp_path, monkeypatch, capsys):
    """A tar member or image file whose declared size is over pipeline.images.MAX_FILE_BYTES (256 MiB; lowered to
    64 KiB here, so that the test writes no such file) is skipped on its header alone, one sample counted."""
    from test_materialize import write_manifest

    for module in ("rakt.pipeline.shard_records.MAX_MEMBER_BYTES", "rakt.pipeline.sources.MAX_FILE_BYTES",
                   "rakt.pipeline.materialize.MAX_FILE_BYTES"):
        monkeypatch.setattr(module, 64 << 10)
    big = png_bytes(300, 300)  # ~270 KB of noise
    assert len(big) > 64 << 10
    shard = write_shard(tmp_path / "pool" / "pool.tar", [
        {"__key__": f"s{i}", "jpg": jpeg_bytes(image_array(i, size=32)), "cls": i % 2} for i in range(3)]
        + [{"__key__": "big", "png": big, "cls": 0}, {"__key__": "s9", "jpg": jpeg_bytes(image_array(9)), "cls": 1}])
    (tmp_path / "pool" / "classes.txt").write_text("a\nb\n")
    (tmp_path / "pool" / "big.png").write_bytes(big)
    assert cli.main(["labelled", str(shard), "--out", str(tmp_path / "labelled")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["skipped"] == {"member_too_large": 1}
    write_manifest(tmp_path / "manifest", [{"pool_id": 0, "shard": str(shard), "key": "big"},
                                           {"pool_id": 1, "shard": str(shard), "key": "s1"},
                                           {"pool_id": 2, "path": str(tmp_path / "pool" / "big.png")}])
    assert cli.main(["materialize", str(tmp_path / "manifest"), "--pool-root", str(tmp_path / "pool"),
                     "--out", str(tmp_path / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 1 and summary["missing_by_cause"] == {"file_too_large": 1, "member_too_large": 1}
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        (tmp_path / "imgs" / cls / "small.jpg").write_bytes(jpeg_bytes(image_array(1)))
    (tmp_path / "imgs" / "b" / "big.png").write_bytes(big)
    assert cli.main(["labelled", str(tmp_path / "imgs"), "--out", str(tmp_path / "from-folder")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 and summary["skipped"] == {"file_too_large": 1}


def test_a_full_disk_under_a_library_writer_is_a_rakt_error(tmp_path):
    """FAISS writes the index file itself (a RuntimeError, not an OSError, when the disk is full): the error
    still names the file and the cause."""
    from rakt.pipeline.formats import embedding_table
    from rakt.pipeline.io import write_json, write_parquet

    n, dim = 8000, 64
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = tmp_path / "emb"
    write_parquet(emb / "part-00000.parquet", embedding_table([f"p{i}" for i in range(n)], [None] * n,
                                                             ["train"] * n, vectors))
    write_json(emb / "embeddings.json", {"model": "test", "dim": dim, "count": n, "normalized": True})
    full = tmp_path / "full"
    full.mkdir()
    proc = run_rakt(["index", "build", emb, "--kind", "flat", "--out", full / "index"], tmpfs=(full, 1024))
    assert_rakt_error(proc, str(full / "index" / "index-000.faiss"), "No space left on device")
