"""materialize: a manifest over real JPEG pool shards (tar, tar.gz) and files -> WebDataset shards; kill + resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds

from conftest import image_array, jpeg_bytes, write_shard
from rakt.pipeline.config import MaterializeConfig
from rakt.pipeline.io import InputError, write_parquet
from rakt.cli import main
from rakt.pipeline.materialize import run

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A transfer manifest in the contract's format (as `rakt curate` writes it)."""
    cols = {
        "pool_id": pa.array([r["pool_id"] for r in rows], pa.int64()),
        "id": pa.array([r.get("id", f"img{r['pool_id']}") for r in rows], pa.string()),
    }
    for name in ("shard", "key", "path", "url", "caption"):
        if any(name in r for r in rows):
            cols[name] = pa.array([r.get(name) for r in rows], pa.string())
    cols["score"] = pa.array([0.5 + r["pool_id"] / 1000 for r in rows], pa.float32())
    cols["query_id"] = pa.array([f"q{r['pool_id'] % 3}" for r in rows], pa.string())
    cols["query_label"] = pa.array([r["pool_id"] % 3 if r["pool_id"] % 4 else None for r in rows], pa.int64())
    cols["rank"] = pa.array([r["pool_id"] % 7 for r in rows], pa.int32())
    cols["query_ids"] = pa.array([[f"q{r['pool_id'] % 3}", "qx"] for r in rows], pa.list_(pa.string()))
    write_parquet(path / "manifest.parquet", pa.table(cols))
    return path


@pytest.fixture
def pool(tmp_path):
    """Two pool shards (tar and tar.gz) and a folder of files; returns (dir, {pool_id: (locator, jpeg bytes)})."""
    root = tmp_path / "pool"
    originals, rows = {}, []
    for s, name in enumerate(["pool-000000.tar", "pool-000001.tar.gz"]):
        samples = []
        for i in range(6):
            pid = s * 10 + i
            data = jpeg_bytes(image_array(pid), quality=80 + i)
            samples.append({"__key__": f"pool_{pid:06d}", "jpg": data, "json": {"caption": f"c{pid}"}})
            originals[pid] = data
            rows.append({"pool_id": pid, "shard": str(root / name), "key": f"pool_{pid:06d}", "caption": f"c{pid}"})
        write_shard(root / name, samples)
    (root / "files").mkdir(parents=True)
    for i in range(4):
        pid = 100 + i
        data = jpeg_bytes(image_array(pid))
        (root / "files" / f"img{i}.jpg").write_bytes(data)
        originals[pid] = data
        rows.append({"pool_id": pid, "path": str(root / "files" / f"img{i}.jpg")})
    return root, originals, rows


def read_back(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_shards_hold_original_bytes_and_provenance(tmp_path, pool):
    root, originals, rows = pool
    manifest = write_manifest(tmp_path / "manifest", rows[::-1])  # unsorted on purpose
    summary = run(MaterializeConfig(manifest=str(manifest), out=str(tmp_path / "out"), shard_size=4,
                                    pool_root=str(root)))
    assert summary["samples"] == 16 and summary["missing"] == 0 and summary["shards"] == 4
    samples = read_back(tmp_path / "out")
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{p:010d}" for p in sorted(originals)]  # pool_id order, stable keys
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == originals[meta["pool_id"]]  # never re-encoded
        assert meta["query_ids"][1] == "qx" and meta["rank"] == meta["pool_id"] % 7
        assert meta["query_label"] == (meta["pool_id"] % 3 if meta["pool_id"] % 4 else None)
        if meta["pool_id"] < 100:
            assert meta["source"]["key"] == f"pool_{meta['pool_id']:06d}" and meta["caption"] == f"c{meta['pool_id']}"
        else:
            assert meta["source"]["path"].endswith(".jpg")
    sizes = [len(list(wds.WebDataset(str(p), shardshuffle=False))) for p in sorted((tmp_path / "out").glob("*.tar"))]
    assert sizes == [4, 4, 4, 4]
    stats = json.loads((tmp_path / "out" / "shard-00003_stats.json").read_text())
    assert stats["count"] == 4 and stats["missing"] == 0
    final = json.loads((tmp_path / "out" / "materialize.json").read_text())
    assert final["shards"] == [f"shard-{j:05d}.tar" for j in range(4)] and final["samples"] == 16


def test_missing_pool_images_are_counted_skips(tmp_path, pool, caplog):
    root, originals, rows = pool
    rows = rows + [
        {"pool_id": 7, "shard": str(root / "pool-000000.tar"), "key": "pool_no_such"},
        {"pool_id": 8, "shard": str(root / "pool-gone.tar"), "key": "pool_000008"},
        {"pool_id": 200, "path": str(root / "files" / "gone.jpg")},
    ]
    manifest = write_manifest(tmp_path / "manifest", rows)
    summary = run(MaterializeConfig(manifest=str(manifest), out=str(tmp_path / "out"), shard_size=5,
                                    pool_root=str(root)))
    assert summary["samples"] == 16 and summary["missing"] == 3
    assert summary["missing_by_cause"] == {"missing_file": 1, "missing_key": 1, "missing_shard": 1}
    assert "pool_no_such" in caplog.text and "gone.jpg" in caplog.text
    assert {s["__key__"] for s in read_back(tmp_path / "out")} == {f"{p:010d}" for p in originals}


def test_url_only_manifest_points_to_download(tmp_path):
    manifest = write_manifest(tmp_path / "m", [{"pool_id": 1, "url": "http://example.invalid/1.jpg"}])
    with pytest.raises(InputError, match="rakt download"):
        run(MaterializeConfig(manifest=str(manifest), out=str(tmp_path / "out")))


def test_pool_root_remaps_a_moved_pool(tmp_path, pool):
    root, originals, rows = pool
    manifest = write_manifest(tmp_path / "manifest", rows)
    moved = tmp_path / "elsewhere" / "pool2"
    shutil.move(str(root), str(moved))
    with pytest.raises(InputError, match="--pool-root"):  # no lineage: nothing tells where the pool is
        run(MaterializeConfig(manifest=str(manifest), out=str(tmp_path / "a"), shard_size=100))
    found = run(MaterializeConfig(manifest=str(manifest), out=str(tmp_path / "b"), shard_size=100,
                                  pool_root=str(moved)))
    assert found["samples"] == 16
    rel = [{**r, **({"shard": Path(r["shard"]).name} if "shard" in r else {"path": "files/" + Path(r["path"]).name})}
           for r in rows]
    manifest_rel = write_manifest(tmp_path / "manifest_rel", rel)
    assert run(MaterializeConfig(manifest=str(manifest_rel), out=str(tmp_path / "c"), shard_size=100,
                                 pool_root=str(moved)))["samples"] == 16


def test_hostile_locators_are_never_copied(tmp_path, pool, caplog):
    """System files, `../` escapes, symlinks out of the pool, non-images and a FIFO: counted skips, never bytes."""
    root, originals, rows = pool
    outside = tmp_path / "private"
    outside.mkdir()
    secret_jpeg = jpeg_bytes(image_array(999))  # a real image, but not the pool's
    (outside / "holiday.jpg").write_bytes(secret_jpeg)
    shutil.copy(root / "pool-000000.tar", outside / "stolen-000000.tar")  # a real shard, but not the pool's
    (root / "files" / "link.jpg").symlink_to(outside / "holiday.jpg")
    (root / "files" / "notes.jpg").write_text("SECRET=1\n")
    os.mkfifo(root / "files" / "pipe.jpg")  # reading it would block forever
    (root / "pool-evil.tar").symlink_to(outside / "stolen-000000.tar")
    absolute = [
        {"pool_id": 500, "path": "/etc/passwd"},
        {"pool_id": 501, "path": "/proc/self/environ"},
        {"pool_id": 502, "path": str(outside / "holiday.jpg")},
        {"pool_id": 503, "path": str(root / "files" / "link.jpg")},
        {"pool_id": 504, "shard": str(outside / "stolen-000000.tar"), "key": "pool_000000"},
        {"pool_id": 505, "shard": str(root / "pool-evil.tar"), "key": "pool_000001"},
        {"pool_id": 506, "path": str(root / "files" / "notes.jpg")},
        {"pool_id": 507, "path": str(root / "files" / "pipe.jpg")},
        {"pool_id": 508, "path": str(root / "files" / "nothing-here.jpg")},
    ]
    relative = [  # resolved under --pool-root
        {"pool_id": 600, "path": "../../../../../../../../etc/passwd"},
        {"pool_id": 601, "path": "files/../../private/holiday.jpg"},
        {"pool_id": 602, "path": "files/link.jpg"},
        {"pool_id": 603, "shard": "../private/stolen-000000.tar", "key": "pool_000002"},
    ]
    manifest = write_manifest(tmp_path / "manifest", rows + absolute + relative)
    (manifest / "manifest.json").write_text(json.dumps({"sampling": {"source": [str(root)]}}))  # the pool's lineage
    expected = {f"{p:010d}" for p in originals}
    for name, flags, causes in [
            # without --pool-root, relative locators resolve against the working directory: outside too
            ("lineage", [], {"missing_file": 1, "not_a_file": 1, "not_an_image": 1, "outside_pool": 10}),
            # --pool-root maps a moved pool's absolute locators into it (/etc/passwd -> ROOT/passwd: not there)
            ("pool-root", ["--pool-root", str(root)], {"missing_file": 4, "missing_shard": 1, "not_a_file": 1,
                                                       "not_an_image": 1, "outside_pool": 6})]:
        out = tmp_path / name
        assert main(["materialize", str(manifest), "--out", str(out), *flags]) == 0
        samples = read_back(out)
        assert {s["__key__"] for s in samples} == expected, name
        leaked = [s["__key__"] for s in samples for k, v in s.items() if isinstance(v, bytes) and k != "json"
                  and (b"root:" in v or v == secret_jpeg or b"SECRET" in v)]
        assert not leaked and len(samples) == 16
        summary = json.loads((out / "materialize.json").read_text())
        assert summary["samples"] == 16 and summary["missing_by_cause"] == causes, name
        assert summary["pool_roots"]["dirs"] == [str(root.resolve())]
        assert f"{causes['outside_pool']} rows locate files outside the pool's roots" in caplog.text
        caplog.clear()


def test_without_lineage_or_pool_root_nothing_is_read(tmp_path, pool, capsys):
    _, _, rows = pool
    manifest = write_manifest(tmp_path / "manifest", rows + [{"pool_id": 500, "path": "/etc/passwd"}])
    assert main(["materialize", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "--pool-root" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_kill_and_resume_gives_identical_shards(tmp_path):
    """SIGKILL `rakt materialize` after its first shard, rerun: the shards equal an uninterrupted run's bytes."""
    root = tmp_path / "pool"
    rng = np.random.default_rng(0)
    rows = []
    for s in range(4):
        samples = []
        for i in range(100):
            pid = s * 100 + i
            noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            samples.append({"__key__": f"k{pid:05d}", "jpg": jpeg_bytes(noise)})
            if i % 2 == 0:
                rows.append({"pool_id": pid, "shard": f"pool-{s:06d}.tar.gz", "key": f"k{pid:05d}"})
        write_shard(root / f"pool-{s:06d}.tar.gz", samples)
    manifest = write_manifest(tmp_path / "manifest", rows)
    cmd = [sys.executable, "-m", "rakt.cli", "materialize", str(manifest), "--shard-size", "4",
           "--pool-root", str(root), "--out"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(out.glob("*_stats.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "materialize finished before it could be killed"
    done = {p.name: p.read_bytes() for p in out.glob("*_stats.json")}
    assert 0 < len(done) < 50, len(done)
    print(f"killed after {len(done)} of 50 shards; temp files: {[p.name for p in out.glob('.shard-*')]}")
    # what a kill at other moments leaves: a half-written temp file, a renamed shard whose stats file is missing
    (out / ".shard-00040.tar.tmp-99999").write_bytes(b"partial")
    (out / "shard-00041.tar").write_bytes(b"renamed, stats not yet written")
    cfg = dict(manifest=str(manifest), shard_size=4, pool_root=str(root))
    assert run(MaterializeConfig(out=str(out), **cfg))["samples"] == 200  # the rerun resumes
    assert all((out / name).read_bytes() == data for name, data in done.items())  # done shards were skipped
    ref = tmp_path / "uninterrupted"
    run(MaterializeConfig(out=str(ref), **cfg))
    names = sorted(p.name for p in ref.glob("shard-*.tar"))
    assert len(names) == 50 and sorted(p.name for p in out.glob("shard-*.tar")) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not list(out.glob(".shard-*"))  # no temp files left behind
