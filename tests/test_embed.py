"""`rakt embed` end to end: the embedding-set contract, skips, resume after a kill, refusals, engines."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rakt.cli import main
from rakt.pipeline.config import ConfigError, EmbedConfig
from rakt.pipeline.embed import EmbedWorkerBuilder
from rakt.pipeline.engines import LocalEngine, TasksFailedError, get_engine, raise_if_failed
from rakt.pipeline.formats import embedding_matrix, read_embedding_set
from rakt.pipeline.io import InputError
from rakt.pipeline.sources import open_source

ROOT = Path(__file__).resolve().parents[1]


def embed(*args: str) -> int:
    return main(["embed", *args])


def tiny(model: str) -> list[str]:
    return ["--model", model, "--pretrained", ""]


def parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


@pytest.fixture
def messy_folder(tmp_path, make_folder, make_images, to_jpeg) -> Path:
    """3 classes x 4 images, one loose image, 2 undecodable and 2 unreadable image files."""
    root = make_folder(tmp_path / "imgs", {c: [make_images(10 * k + i, size=40) for i in range(4)]
                                           for k, c in enumerate(["ant", "bee", "cat"])})
    (root / "loose.jpg").write_bytes(to_jpeg(make_images(99)))
    (root / "ant" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    whole = to_jpeg(make_images(98, size=64))
    (root / "bee" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    os.symlink(root / "missing.jpg", root / "cat" / "dangling.jpg")
    (root / "cat" / "folder.jpg").mkdir()
    return root


def test_cli_folder_end_to_end(messy_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "emb"
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--batch-size", "3", "--workers", "2",
                 "--partition-size", "5") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 13 and summary["dim"] == 32 and summary["partitions"] == 4
    assert summary["skipped"] == {"undecodable_image": 2, "unreadable_file": 2}

    meta, table = read_embedding_set(out)
    assert meta["model"] == "open_clip:rakt-tiny-clip:random" and meta["model_name"] == tiny_clip
    assert meta["dim"] == 32 and meta["normalized"] is True and meta["count"] == 13
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["partitions"] == ["00000", "00001", "00002", "00003"]
    assert meta["skipped"] == summary["skipped"] and len(meta["config_hash"]) == 16
    assert table.column_names == ["id", "label", "split", "embedding", "path"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert all(table.schema.field(c).type == pa.string() for c in ("id", "split", "path"))
    vectors = embedding_matrix(table)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    ids = table["id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 13 and "bee/truncated.jpg" not in ids
    labels = dict(zip(ids, table["label"].to_pylist()))
    assert labels["ant/ant_0003.jpg"] == 0 and labels["cat/cat_0000.jpg"] == 2 and labels["loose.jpg"] is None
    assert set(table["split"].to_pylist()) == {"train"}
    assert table["path"].to_pylist()[0] == str(messy_folder / "ant" / "ant_0000.jpg")
    for name in meta["partitions"]:
        stats = json.loads((out / f"part-{name}.stats.json").read_text())
        assert stats["count"] == pq.read_metadata(out / f"part-{name}.parquet").num_rows

    # in process, other batches: the same rows in the same order
    out0 = tmp_path / "emb0"
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out0), "--batch-size", "4", "--workers", "0",
                 "--partition-size", "5", "--split", "target") == 0
    _, table0 = read_embedding_set(out0)
    assert table0["id"].to_pylist() == ids and set(table0["split"].to_pylist()) == {"target"}
    assert np.allclose(embedding_matrix(table0), vectors, atol=1e-5)


def test_cli_kit_shard_few_shot(kit, tiny_clip, tmp_path, capsys):
    shard = kit / "target" / "cifar10" / "cifar10-test-000000.tar.gz"
    out = tmp_path / "emb"
    assert embed(str(shard), *tiny(tiny_clip), "--per-class", "5", "--out", str(out), "--workers", "0") == 0
    assert json.loads(capsys.readouterr().out)["count"] == 50
    meta, table = read_embedding_set(out)
    assert meta["classes"] == (kit / "target" / "cifar10" / "classes.txt").read_text().split()
    assert meta["per_class"] == 5 and meta["sources"] == [str(shard)] and meta["count"] == 50
    assert table.column_names == ["id", "label", "split", "embedding", "shard", "key"]
    assert collections.Counter(table["label"].to_pylist()) == {c: 5 for c in range(10)}
    assert set(table["split"].to_pylist()) == {"test"}  # from each sample's .json
    assert table["id"].to_pylist() == table["key"].to_pylist()
    assert all(i.startswith(f"test_{meta['classes'][lab]}_") for i, lab in zip(table["id"].to_pylist(),
                                                                                 table["label"].to_pylist()))
    assert set(table["shard"].to_pylist()) == {str(shard.resolve())}
    assert np.allclose(np.linalg.norm(embedding_matrix(table), axis=1), 1, atol=1e-5)


def test_shard_workers_keep_order_and_count_skips_once(tmp_path, tiny_clip, make_shard, make_images, to_jpeg):
    samples = [{"__key__": f"k{i:03d}", "jpg": to_jpeg(make_images(i)), "cls": i % 2} for i in range(23)]
    samples[5]["jpg"] = b"not a jpeg"
    samples[9]["cls"] = "nine"  # a reader skip in the middle of the stream
    whole = make_shard(tmp_path / "whole.tar.gz", samples).read_bytes()
    shard = tmp_path / "cut.tar.gz"
    shard.write_bytes(whole[:len(whole) * 8 // 10])
    tables = {}
    for workers in ("0", "2"):
        out = tmp_path / f"emb{workers}"
        assert embed(str(shard), *tiny(tiny_clip), "--out", str(out), "--batch-size", "4", "--workers", workers) == 0
        meta, tables[workers] = read_embedding_set(out)
        assert meta["skipped"] == {"bad_label": 1, "truncated_shard": 1, "undecodable_image": 1}
    assert tables["0"].equals(tables["2"])
    ids = tables["0"]["id"].to_pylist()
    assert ids == [s["__key__"] for s in samples[:len(ids) + 2] if s["__key__"] not in ("k005", "k009")]
    assert len(ids) >= 10


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_clip, make_folder, make_images, capsys):
    folder = make_folder(tmp_path / "imgs", {c: [make_images(10 * k + i, size=128) for i in range(8)]
                                             for k, c in enumerate("abc")})
    flags = [*tiny(tiny_clip), "--partition-size", "2", "--batch-size", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # a DataLoader worker per partition makes each take long enough to kill the run half way
    proc = subprocess.Popen([sys.executable, "-m", "rakt.cli", "embed", str(folder), *flags, "--workers", "1",
                             "--out", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(killed.glob("part-*.stats.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    done = len(list(killed.glob("part-*.stats.json")))
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert 1 <= done < 12, f"{done} of 12 partitions done when killed; cannot test resuming"
    assert not (killed / "embeddings.json").exists()

    capsys.readouterr()
    assert embed(str(folder), *flags, "--workers", "0", "--out", str(killed)) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] == done  # only the rest was embedded
    whole = tmp_path / "whole"
    assert embed(str(folder), *flags, "--workers", "0", "--out", str(whole)) == 0
    assert parts(killed) == parts(whole) and len(parts(whole)) == 12  # byte-identical parquet files
    meta, table = read_embedding_set(killed)
    assert meta["count"] == 24 and table.num_rows == 24 and len(set(table["id"].to_pylist())) == 24
    assert table.equals(read_embedding_set(whole)[1])
    assert not list(killed.glob(".part-*"))  # no temp files left behind


def test_refuses_another_model_or_draw_in_the_same_out(messy_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "emb"
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--workers", "0") == 0
    ckpt = tmp_path / "other.pt"
    weights = {k: v + 0.01 for k, v in torch.load(_save_tiny(tiny_clip, tmp_path)).items()}
    torch.save(weights, ckpt)
    capsys.readouterr()
    assert embed(str(messy_folder), "--model", tiny_clip, "--pretrained", str(ckpt), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "model: 'open_clip:rakt-tiny-clip:random' there" in err and "use another --out or delete it" in err
    assert embed(str(messy_folder), *tiny(tiny_clip), "--per-class", "1", "--out", str(out)) == 2
    assert "per_class: 0 there, 1 now" in capsys.readouterr().err
    before = parts(out)
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--workers", "0") == 0  # same: all done
    assert json.loads(capsys.readouterr().out)["resumed"] == 1 and parts(out) == before


def _save_tiny(tiny_clip: str, tmp_path: Path) -> Path:
    from rakt.pipeline.encoders import load_image_encoder
    path = tmp_path / "tiny.pt"
    torch.save(load_image_encoder(EmbedConfig(model=tiny_clip, pretrained="")).model.state_dict(), path)
    return path


def test_nothing_readable_is_an_input_error(tmp_path, tiny_clip, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"garbage")
    assert embed(str(tmp_path / "imgs"), *tiny(tiny_clip), "--out", str(tmp_path / "emb"), "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "no image could be read (3 undecodable_image)" in err and str(tmp_path / "imgs") in err


def test_failed_partitions_are_returned_not_dropped(tmp_path, tiny_clip, make_shard, make_images, to_jpeg, caplog):
    for i in range(2):
        make_shard(tmp_path / "s" / f"p-{i:06d}.tar", [{"__key__": f"k{i}", "jpg": to_jpeg(make_images(i))}])
    cfg = EmbedConfig(source=[str(tmp_path / "s")], out=str(tmp_path / "emb"), model=tiny_clip, pretrained="",
                      workers=0)
    source = open_source(cfg.source)
    (tmp_path / "s" / "p-000001.tar").unlink()  # vanishes after listing
    failed = LocalEngine().run(source.partitions, EmbedWorkerBuilder(cfg, source, cfg.out), max_retries=2)
    assert failed == [source.partitions[1]]
    assert (tmp_path / "emb" / "part-00000.stats.json").exists()
    assert not (tmp_path / "emb" / "part-00001.stats.json").exists()
    tries = [r.getMessage() for r in caplog.records if "partition 00001" in r.getMessage()]
    assert len(tries) == 3 and "p-000001.tar" in tries[0] and "FileNotFoundError" in tries[0]
    with pytest.raises(TasksFailedError, match="1 partitions failed after retries: partition 00001"):
        raise_if_failed(failed, "partitions")


def test_local_engine_retries_and_engine_names(caplog):
    calls = collections.Counter()

    def builder():
        def work(task: int) -> None:
            calls[task] += 1
            if task == 3 or (task == 2 and calls[task] == 1):
                raise RuntimeError(f"boom {task}")
        return work

    assert get_engine("local").run([1, 2, 3], builder, max_retries=2) == [3]
    assert calls == {1: 1, 2: 2, 3: 3}
    assert any("task 2 failed (attempt 1 of 3): RuntimeError: boom 2" in r.getMessage() for r in caplog.records)
    assert get_engine("local").run([], builder, 1) == []
    with pytest.raises(ConfigError, match="unknown engine 'spark'; choose one of: local"):
        get_engine("spark")


def test_rerun_after_the_source_changed_redoes_what_changed(tmp_path, tiny_clip, make_folder, make_images, to_jpeg,
                                                             capsys):
    """Files added to or removed from a folder between runs: every image once, none missing, as a fresh run."""
    folder = make_folder(tmp_path / "imgs", {"a": [make_images(i) for i in range(3)],
                                             "b": [make_images(10 + i) for i in range(3)]})
    flags = [*tiny(tiny_clip), "--partition-size", "2", "--workers", "0"]
    out, fresh = tmp_path / "emb", tmp_path / "fresh"

    def ids(path: Path) -> list[str]:
        return read_embedding_set(path)[1]["id"].to_pylist()

    def files() -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))

    assert embed(str(folder), *flags, "--out", str(out)) == 0
    (folder / "a" / "0a.jpg").write_bytes(to_jpeg(make_images(50)))  # sorts first: every later partition shifts
    capsys.readouterr()
    assert embed(str(folder), *flags, "--out", str(out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 7 and summary["redone"] == 3 and summary["partitions"] == 4
    assert sorted(ids(out)) == files()  # one of each: no duplicate, none missing
    assert embed(str(folder), *flags, "--out", str(fresh)) == 0
    assert parts(out) == parts(fresh)

    for name in ("a/0a.jpg", "a/a_0001.jpg"):  # back to 5 images: the last partition is no longer in the source
        (folder / name).unlink()
    capsys.readouterr()
    assert embed(str(folder), *flags, "--out", str(out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 5 and summary["dropped"] == 1 and summary["partitions"] == 3
    assert sorted(ids(out)) == files() and len(parts(out)) == 3
    assert json.loads((out / "embeddings.json").read_text())["count"] == 5


def test_damaged_part_file_is_named_and_redone(messy_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "emb"
    flags = [str(messy_folder), *tiny(tiny_clip), "--partition-size", "5", "--workers", "0", "--out", str(out)]
    assert embed(*flags) == 0
    part = sorted(out.glob("part-*.parquet"))[1]
    whole = part.read_bytes()
    part.write_bytes(whole[:len(whole) // 2])  # truncated, e.g. a disk that filled up
    with pytest.raises(InputError) as e:
        read_embedding_set(out)
    assert str(part) in str(e.value) and "rerun `rakt embed`" in str(e.value)
    capsys.readouterr()
    assert main(["index", "build", str(out), "--out", str(tmp_path / "index")]) == 2  # not a pyarrow traceback
    assert str(part) in capsys.readouterr().err
    assert embed(*flags) == 0
    assert json.loads(capsys.readouterr().out)["redone"] == 1 and part.read_bytes() == whole


def test_failed_first_run_does_not_block_the_corrected_one(messy_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "emb"
    missing = tmp_path / "no-such-weights.pt"
    assert embed(str(messy_folder), "--model", tiny_clip, "--pretrained", str(missing), "--out", str(out),
                 "--workers", "0") == 2
    assert str(missing) in capsys.readouterr().err
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--workers", "0") == 0
    assert json.loads(capsys.readouterr().out)["count"] == 13


HOLD = "import sys, time\nfrom rakt.pipeline.io import output_lock\nwith output_lock(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(120)\n"


def test_one_writer_per_output_and_no_stale_lock(messy_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "emb"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == b"held\n"
        assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--workers", "0") == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "being written by" in err
        assert not out.exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed writer leaves no stale lock
        holder.wait()
    assert embed(str(messy_folder), *tiny(tiny_clip), "--out", str(out), "--workers", "0") == 0
