"""Every pool kind (image folder, CSV manifest, WebDataset shards) through index build -> retrieve -> curate ->
materialize with the CLI and the tiny open_clip model: the shards hold the pool's original bytes, and a row
tampered into the manifest that points outside the pool's declared roots is a counted skip."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from conftest import image_array, jpeg_bytes, write_folder, write_shard
from rakt.cli import main

KINDS = ("folder", "csv", "shards")


def make_pool(root: Path, kind: str) -> tuple[str, dict]:
    """A 12-image pool of `kind`; returns (the source spec, {locator: original bytes})."""
    arrays = [image_array(100 + i) for i in range(12)]
    if kind == "folder":
        write_folder(root / "pool", {"a": arrays[:6], "b": arrays[6:]})
        files = sorted((root / "pool").rglob("*.jpg"))
        return str(root / "pool"), {str(f.resolve()): f.read_bytes() for f in files}
    if kind == "csv":
        (root / "images").mkdir(parents=True)
        rows = []
        for i, arr in enumerate(arrays):
            (root / "images" / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(arr))
            rows.append({"path": f"images/p{i:02d}.jpg", "caption": f"picture {i}"})
        pd.DataFrame(rows).to_csv(root / "pool.csv", index=False)
        (root / "images" / "unlisted.jpg").write_bytes(jpeg_bytes(image_array(7)))  # beside the pool, not in it
        return str(root / "pool.csv"), {str((root / r["path"]).resolve()): (root / r["path"]).read_bytes()
                                        for r in rows}
    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(arr)} for i, arr in enumerate(arrays)]
    shard = write_shard(root / "pool" / "pool-000000.tar", samples)
    return str(root / "pool"), {f"{shard.resolve()}:{s['__key__']}": s["jpg"] for s in samples}


def locator(source: dict) -> str:
    return f"{source['shard']}:{source['key']}" if "shard" in source else source["path"]


@pytest.mark.parametrize("kind", KINDS)
def test_pool_kind_end_to_end(tmp_path, kind, tiny_clip, one_torch_thread, caplog):
    enc = ["--model", tiny_clip, "--pretrained", "", "--workers", "0", "--device", "cpu", "--batch-size", "8"]
    pool, originals = make_pool(tmp_path, kind)
    target = write_shard(tmp_path / "target-000000.tar", [{"__key__": f"t{i}", "jpg": jpeg_bytes(image_array(i)),
                                                             "cls": i % 2} for i in range(4)])
    w = tmp_path / "work"
    assert main(["embed", str(target), "--split", "train", *enc, "--out", str(w / "target")]) == 0
    assert main(["index", "build", pool, *enc, "--kind", "flat", "--out", str(w / "index")]) == 0
    assert main(["retrieve", str(w / "target"), "--index", f"faiss:{w / 'index'}", "--k", "6",
                 "--out", str(w / "candidates")]) == 0
    assert main(["curate", str(w / "candidates"), "--budget", "12", "--out", str(w / "manifest")]) == 0
    assert main(["materialize", str(w / "manifest"), "--out", str(w / "shards"), "--shard-size", "3"]) == 0

    manifest = pd.read_parquet(w / "manifest" / "manifest.parquet")
    summary = json.loads((w / "shards" / "materialize.json").read_text())
    assert len(manifest) >= 4 and summary["samples"] == len(manifest) and summary["missing"] == 0
    assert summary["pool_roots"]["origin"] == "lineage"
    shards = sorted(str(p) for p in (w / "shards").glob("shard-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert len(samples) == len(manifest)
    for s in samples:
        where = locator(json.loads(s["json"])["source"])
        assert s["jpg"] == originals[where], where  # the pool's own bytes, never re-encoded

    # a manifest from someone else: the same lineage, one row pointing outside the pool's declared roots
    outside = {"folder": {"path": "/etc/passwd"}, "csv": {"path": str(tmp_path / "images" / "unlisted.jpg")},
               "shards": {"shard": str(target), "key": "t0"}}[kind]
    tampered = w / "tampered"
    shutil.copytree(w / "manifest", tampered)
    extra = {**manifest.iloc[0].to_dict(), "pool_id": 10**6, "shard": None, "key": None, "path": None, **outside}
    pd.concat([manifest, pd.DataFrame([extra])[manifest.columns.union(list(outside), sort=False)]]).to_parquet(
        tampered / "manifest.parquet", index=False)
    assert main(["materialize", str(tampered), "--out", str(w / "shards-tampered")]) == 0
    summary = json.loads((w / "shards-tampered" / "materialize.json").read_text())
    assert summary["samples"] == len(manifest) and summary["missing_by_cause"] == {"outside_pool": 1}
    assert "1 rows locate files outside the pool's roots" in caplog.text
