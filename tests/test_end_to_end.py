"""End to end on real images and the real teacher: a pool holding one known group near the targets.

Targets are real CIFAR-10 images; the pool holds their mirror images (the group retrieval must return),
byte-identical copies of some group images (near-duplicates curation must drop), byte-identical copies of
the eval images (leakage the guard must drop), and unrelated real images.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from conftest import jpeg_bytes, write_shard
from rakt.cli import main

N_TARGETS = 10


def _kit_images(kit, n: int) -> list[tuple[np.ndarray, int]]:
    out = []
    with tarfile.open(kit / "target/cifar10/cifar10-test-000000.tar.gz") as tar:
        members = {}
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            if len(members[key]) == 3:
                s = members.pop(key)
                out.append((np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB")), int(s["cls"])))
            if len(out) >= n:
                return out
    return out


@pytest.fixture(scope="module")
def world(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    real = _kit_images(kit, N_TARGETS + 120)
    targets, distractors = real[:N_TARGETS], real[N_TARGETS:]
    eval_arrays = [np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8) for a, _ in targets[:5]]
    eval_bytes = [jpeg_bytes(a) for a in eval_arrays]
    group = {f"g{i:03d}": jpeg_bytes(np.ascontiguousarray(a[:, ::-1])) for i, (a, _) in enumerate(targets)}
    pool = [{"__key__": k, "jpg": b, "json": {"kind": "group"}} for k, b in group.items()]
    pool += [{"__key__": f"d{i:03d}", "jpg": group[f"g{i:03d}"], "json": {"kind": "dup"}} for i in range(3)]
    pool += [{"__key__": f"l{i:03d}", "jpg": b, "json": {"kind": "leak"}} for i, b in enumerate(eval_bytes)]
    pool += [{"__key__": f"r{i:03d}", "jpg": jpeg_bytes(a), "json": {"kind": "other"}}
             for i, (a, _) in enumerate(distractors)]
    write_shard(root / "pool" / "pool-000000.tar", pool)
    (root / "classes.txt").write_text((kit / "target/cifar10/classes.txt").read_text())  # found beside the shards
    write_shard(root / "target-000000.tar", [{"__key__": f"t{i:03d}", "jpg": jpeg_bytes(a), "cls": c}
                                             for i, (a, c) in enumerate(targets)])
    write_shard(root / "eval-000000.tar", [{"__key__": f"e{i:03d}", "jpg": b, "cls": targets[i][1]}
                                           for i, b in enumerate(eval_bytes)])
    enc = ["--model", "timm:tf_efficientnet_lite0", "--image-size", "64", "--workers", "0",
           "--pretrained", str(kit / "teachers/tf_efficientnet_lite0.in1k.safetensors")]
    w = root / "work"
    assert main(["embed", str(root / "target-000000.tar"), "--split", "train", *enc, "--out", str(w / "target")]) == 0
    assert main(["embed", str(root / "eval-000000.tar"), "--split", "test", *enc, "--out", str(w / "eval")]) == 0
    assert main(["index", "build", str(root / "pool"), *enc, "--out", str(w / "index")]) == 0
    assert main(["retrieve", str(w / "target"), "--index", f"faiss:{w / 'index'}", "--k", "12",
                 "--out", str(w / "candidates")]) == 0
    assert main(["curate", str(w / "candidates"), "--budget", str(N_TARGETS * 3), "--near-dup", "0.99",
                 "--eval-embeddings", str(w / "eval"), "--leakage-threshold", "0.97", "--out", str(w / "manifest")]) == 0
    assert main(["materialize", str(w / "manifest"), "--out", str(w / "shards"), "--shard-size", "8"]) == 0
    return {"root": root, "work": w, "group": group, "labels": {c for _, c in targets}}


def test_retrieval_returns_the_group(world):
    manifest = pd.read_parquet(world["work"] / "manifest" / "manifest.parquet")
    assert len(manifest) == N_TARGETS * 2  # budget 3 per query, one of which is the query itself
    # every mirror image comes back, each as its own query's best match
    group_rows = manifest[manifest["id"].str.startswith("g")]
    assert sorted(group_rows["id"]) == sorted(world["group"])
    best = group_rows.set_index("id")["query_id"].to_dict()
    assert all(best[f"g{i:03d}"] == f"t{i:03d}" for i in range(N_TARGETS))


def test_leakage_and_near_duplicates_are_removed(world):
    manifest = pd.read_parquet(world["work"] / "manifest" / "manifest.parquet")
    info = json.loads((world["work"] / "manifest" / "manifest.json").read_text())
    assert not manifest["id"].str.startswith("l").any(), "copies of eval images leaked into the transfer set"
    assert not manifest["id"].str.startswith("d").any(), "byte-identical duplicates were kept"
    removed = pd.read_parquet(world["work"] / "manifest" / "removed.parquet")
    leaked = set(removed.loc[removed["reason"] == "leakage", "pool_id"])
    index_meta = pd.concat(pd.read_parquet(p) for p in sorted((world["work"] / "index" / "metadata").glob("*.parquet")))
    ids = index_meta["id"].tolist()
    assert {ids[i] for i in leaked} == {f"l{i:03d}" for i in range(5)}
    assert info["counts"]["leakage_removed"] >= 5
    assert info["counts"]["near_dup_removed"] >= 1


def test_materialized_shards_hold_the_original_bytes(world):
    samples = list(wds.WebDataset(str(world["work"] / "shards" / "shard-{00000..00002}.tar"), shardshuffle=False))
    assert len(samples) == N_TARGETS * 2
    by_id = {json.loads(s["json"])["id"]: s["jpg"] for s in samples}
    for key, data in world["group"].items():
        assert by_id[key] == data


def test_inspect_summarizes_the_manifest(world, capsys):
    assert main(["inspect", str(world["work"] / "manifest")]) == 0
    out = capsys.readouterr().out
    assert str(N_TARGETS * 2) in out
    names = (world["root"] / "classes.txt").read_text().split()
    assert all(f"{c} {names[c]}" in out for c in world["labels"])  # per-class rows carry the class names
