"""`rakt index build` at scale, on small data: the training sample read as just its rows, lists on disk equal to
lists in RAM, float16 embedding sets, a memory budget refused up front, a killed on-disk build resumed."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyarrow.parquet as pq

from conftest import image_array, kill_rakt_when, write_folder
import rakt.indexes.faiss_index as faiss_index
import rakt.indexes.faiss_ops as faiss_ops
from rakt.indexes.faiss_index import FaissIndex
from rakt.indexes.faiss_files import ListLocations, reconstruct_by_scan
from rakt.cli import main
from rakt.indexes.helpers import release_mapped
from rakt.pipeline.formats import EmbeddingParts, embedding_matrix, embedding_table, read_embedding_set



def clustered_set(root: Path, n: int, d: int = 16, per_part: int = 5000, row_group: int = 100,
                  dtype: str = "float32", seed: int = 0, separable: bool = False) -> np.ndarray:
    """An embedding set of clustered unit vectors: parts of `per_part` rows in row groups of `row_group`.
    `separable`: clusters of exactly 10 tight points, so a point's top-10 is its cluster, far from the rest."""
    rng = np.random.default_rng(seed)
    if separable:
        x = rng.normal(size=(n // 10, d)).repeat(10, axis=0) + 0.02 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(40, d))[rng.integers(0, 40, n)] + 0.25 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    root.mkdir(parents=True)
    for j, begin in enumerate(range(0, n, per_part)):
        ids = [f"img{i:06d}" for i in range(begin, min(n, begin + per_part))]
        table = embedding_table(ids, [None] * len(ids), ["pool"] * len(ids), x[begin:begin + len(ids)],
                                {"url": [f"http://pool.example/{i}.jpg" for i in ids]}, dtype=dtype)
        pq.write_table(table, root / f"part-{j:05d}.parquet", row_group_size=row_group)
    (root / "embeddings.json").write_text(json.dumps({"model": "open_clip:test:random", "dim": d, "count": n,
                                                      "dtype": dtype}))
    return x


def test_training_reads_only_the_sampled_rows(tmp_path, capsys):
    clustered_set(tmp_path / "emb", n=50_000, d=8)  # 500 row groups of 100 rows
    assert main(["index", "build", str(tmp_path / "emb"), "--kind", "IVF8,Flat", "--out", str(tmp_path / "ix")]) == 0
    read = json.loads(capsys.readouterr().out)["sample_read"]
    # 8 lists x 39 training vectors + 1000 recall queries, taken from the row groups that hold them, no others
    assert read["rows"] == 8 * 39 + 1000 and read["row_groups"] == 500
    assert 300 < read["row_groups_read"] < 500


def test_take_reads_only_the_row_groups_holding_the_rows(tmp_path):
    x = clustered_set(tmp_path / "emb", n=3000, per_part=1000)  # 3 files x 10 row groups
    parts = EmbeddingParts(tmp_path / "emb")
    rows = np.array([5, 7, 1500, 2999])
    np.testing.assert_array_equal(embedding_matrix(parts.take(rows, ["embedding"])), x[rows])
    assert parts.groups_read == 3  # groups 0 of file 0, 5 of file 1, 9 of file 2


def test_on_disk_lists_search_as_the_in_ram_index(tmp_path, capsys, monkeypatch):
    x = clustered_set(tmp_path / "emb", n=20_000, per_part=3000)  # parts of unequal sizes: 6 x 3000 + 2000
    outs = {"ram": [], "disk": ["--on-disk", "--task-rows", "5000"]}
    for name, flags in outs.items():
        assert main(["index", "build", str(tmp_path / "emb"), "--kind", "IVF64,PQ8", "--nprobe", "8", *flags,
                     "--out", str(tmp_path / name)]) == 0
        assert json.loads(capsys.readouterr().out)["ivf_lists"] == name.replace("disk", "ondisk")
    assert (tmp_path / "disk" / "index-000.ivfdata").exists() and not (tmp_path / "ram" / "index-000.ivfdata").exists()
    assert not (tmp_path / "disk" / ".add-parts").exists()
    shutil.move(tmp_path / "disk", tmp_path / "moved")  # the lists are found beside the index, wherever it is
    ram, disk = FaissIndex.open(tmp_path / "ram"), FaissIndex.open(tmp_path / "moved")
    assert disk.info()["ivf_lists"] == "ondisk" and disk.mapped
    (sa, ia), (sb, ib) = ram.search(x[::97], 10), disk.search(x[::97], 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert pd.read_parquet(tmp_path / "moved" / "metadata").equals(pd.read_parquet(tmp_path / "ram" / "metadata"))
    info = {n: json.loads((tmp_path / p / "index.json").read_text()) for n, p in (("ram", "ram"), ("disk", "moved"))}
    assert info["ram"]["recall_at_10"] == info["disk"]["recall_at_10"] > 0.5
    by_nprobe = info["ram"]["recall_at_10_by_nprobe"]  # the lists to visit, chosen from measured recall
    assert set(by_nprobe) == {"1", "4", "8", "16", "64"} and by_nprobe["8"] == info["ram"]["recall_at_10"]
    assert by_nprobe["1"] < by_nprobe["64"]
    lists = tmp_path / "moved" / "index-000.ivfdata"
    assert mapped_kib(lists) == 0  # what the search read of the mapped lists is page cache, not the process's
    ids = np.array([0, 19_999, 777, 0])  # stored vectors, looked up without a direct map too
    np.testing.assert_allclose(disk.embeddings(ids), ram.embeddings(ids), atol=1e-6)
    np.testing.assert_allclose(reconstruct_by_scan(ivf_of(disk), ids), ram.embeddings(ids), atol=1e-6)
    monkeypatch.setattr(faiss_index, "DIRECT_MAP_MAX", 0)  # as an index too large for a direct map
    scanned = FaissIndex.open(tmp_path / "moved")
    scanned.prefetch(np.arange(0, 20_000, 3))
    np.testing.assert_allclose(scanned.embeddings(ids), ram.embeddings(ids), atol=1e-6)
    assert not scanned._direct_maps and len(scanned._located[0].ids) == len(np.union1d(np.arange(0, 20_000, 3), ids))
    many = np.arange(19_999, 0, -7)  # ids from most lists, decoded together
    np.testing.assert_allclose(scanned.embeddings(many), ram.embeddings(many), atol=1e-6)
    assert mapped_kib(lists) == 0
    released = []  # lookups walk the lists in order, releasing the mapped pages as they go
    located = ListLocations(ivf_of(disk), release=lambda: released.append(1), release_bytes=1)
    np.testing.assert_allclose(located.reconstruct(many), ram.embeddings(many), atol=1e-6)
    assert len(released) > 64
    monkeypatch.setattr(faiss_ops, "MAPPED_BYTES_PER_SEARCH", 1)  # one query per search call on mapped lists
    assert faiss_ops.mapped_rows(disk._parts[0], 8) == 1
    assert main(["index", "build", str(tmp_path / "emb"), "--kind", "IVF64,PQ8", "--nprobe", "8", *outs["disk"],
                 "--out", str(tmp_path / "chunked")]) == 0  # its recall check, one query per call too
    assert json.loads((tmp_path / "chunked" / "index.json").read_text())["recall_at_10_by_nprobe"] == by_nprobe
    (sc, ic) = disk.search(x[::97], 10)
    np.testing.assert_array_equal(ic, ia)
    np.testing.assert_allclose(sc, sa, atol=1e-6)


def mapped_kib(file: Path) -> int | None:
    """KiB of `file` resident in this process through its memory mappings (/proc/self/smaps); None: not mapped."""
    target, found, rss = os.path.realpath(file), False, 0
    with open("/proc/self/smaps") as f:
        mapping = None
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                mapping = head[5] if len(head) > 5 else None
                found = found or mapping == target
            elif head[0] == "Rss:" and mapping == target:
                rss += int(head[1])
    return rss if found else None


def test_mapped_pages_leave_the_process_and_keep_their_data(tmp_path):
    file = tmp_path / "lists.bin"
    np.arange(4 << 20, dtype=np.int32).tofile(file)  # 16 MiB
    view = np.memmap(file, np.int32, "r")
    assert view.sum() == (4 << 20) * ((4 << 20) - 1) // 2 and mapped_kib(file) >= 15 << 10
    assert release_mapped([tmp_path]) >= 16 << 20 and mapped_kib(file) == 0
    written = np.memmap(file, np.int32, "r+")  # written shared pages are released too, and reach the file
    written[:] = 7
    assert mapped_kib(file) > 0 and release_mapped([file]) > 0 and mapped_kib(file) == 0
    del written
    assert np.all(view == 7) and np.all(np.fromfile(file, np.int32) == 7)


def test_on_disk_merge_leaves_no_page_resident(tmp_path):
    """No page of the parts merged into on-disk lists (mapped for the life of the process, as faiss's merge_ondisk
    leaves them) nor of the merged lists stays in the process's memory."""
    import faiss
    from rakt.indexes.faiss_parts import fill_copy, merge_to_disk

    x = clustered_set(tmp_path / "emb", n=6000, d=16)
    empty = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    empty.train(x)
    blob = faiss.serialize_index(empty)
    files = []
    for j, begin in enumerate(range(0, 6000, 2000)):
        files.append(tmp_path / f"add-{j}.faiss")
        fill_copy(blob, [x[begin:begin + 2000]], normalize=True, first_id=begin).tofile(files[-1])
    merged = merge_to_disk(empty, files, tmp_path / "index-000.faiss")
    assert merged.ntotal == 6000 and all(mapped_kib(f) in (None, 0) for f in files)
    assert mapped_kib(tmp_path / "index-000.ivfdata") == 0
    faiss.extract_index_ivf(merged).nprobe = 16
    np.testing.assert_array_equal(merged.search(x[:50], 1)[1][:, 0], np.arange(50))


def ivf_of(index: FaissIndex):
    from rakt.indexes.faiss_ops import ivf_of as extract

    return extract(index._parts[0])


def test_float16_and_float32_sets_find_the_same_neighbours(tmp_path, capsys):
    x = clustered_set(tmp_path / "f32", n=4000, per_part=1000, row_group=1000, separable=True)
    clustered_set(tmp_path / "f16", n=4000, per_part=1000, row_group=1000, dtype="float16", separable=True)
    assert pq.read_schema(tmp_path / "f16" / "part-00000.parquet").field("embedding").type.value_type == "halffloat"
    size = {k: sum(p.stat().st_size for p in (tmp_path / k).glob("*.parquet")) for k in ("f16", "f32")}
    assert size["f16"] < 0.7 * size["f32"]
    found = {}
    for name in ("f32", "f16"):
        assert main(["index", "build", str(tmp_path / name), "--kind", "flat", "--out", str(tmp_path / f"ix-{name}")]) == 0
        found[name] = np.sort(FaissIndex.open(tmp_path / f"ix-{name}").search(x[::7], 10)[1], axis=1)
    assert np.array_equal(found["f16"], found["f32"])
    assert np.array_equal(found["f32"][:, 0] // 10, np.arange(0, 4000, 7) // 10)  # the top-10 is the cluster


def test_embed_writes_float16_sets(tmp_path, tiny_clip, capsys):
    pool = write_folder(tmp_path / "pool", {"cat": [image_array(i) for i in range(3)]})
    enc = ["--model", tiny_clip, "--pretrained", "", "--workers", "0", "--device", "cpu"]
    for dtype in ("float32", "float16"):
        assert main(["embed", str(pool), *enc, "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
    meta, table = read_embedding_set(tmp_path / "float16")
    assert meta["dtype"] == "float16" and str(table.schema.field("embedding").type.value_type) == "halffloat"
    half, full = embedding_matrix(table), embedding_matrix(read_embedding_set(tmp_path / "float32")[1])
    assert half.dtype == np.float32 and np.abs(half - full).max() < 1e-3
    capsys.readouterr()  # the same folder cannot be continued in another dtype
    assert main(["embed", str(pool), *enc, "--dtype", "float32", "--out", str(tmp_path / "float16")]) == 2
    assert "dtype: 'float16' there, 'float32' now" in capsys.readouterr().err


def test_a_budget_that_cannot_fit_is_refused_with_figures(tmp_path, capsys):
    clustered_set(tmp_path / "emb", n=20_000, d=64)
    assert main(["index", "build", str(tmp_path / "emb"), "--kind", "ivfpq", "--memory-budget", "2M",
                 "--out", str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert "cannot be built within --memory-budget 2.0M: it needs ~" in err and "(coarse quantizer" in err
    assert "raise --memory-budget" in err and not (tmp_path / "ix" / "index.json").exists()


@pytest.mark.parametrize("lists", ["--on-disk", "in RAM"])
def test_killed_build_resumes(tmp_path, capsys, lists):
    """SIGKILL a build once its first add task is done; the rerun keeps the done tasks and the trained index, and
    its index searches as a clean build's (lists on disk, or in RAM: an IVF index is added in parts either way)."""
    x = clustered_set(tmp_path / "emb", n=60_000, d=32, per_part=500)
    args = ["index", "build", str(tmp_path / "emb"), "--kind", "IVF64,PQ8", "--task-rows", "500",
            *([lists] if lists.startswith("--") else [])]
    killed = tmp_path / "killed"
    parts = killed / ".add-parts"
    assert kill_rakt_when([*args, "--out", killed], lambda: parts.exists() and any(parts.glob("add-*.json"))) == \
        -signal.SIGKILL
    assert not (killed / "index.json").exists()
    assert (killed / ".add-parts" / "trained.faiss").exists()
    assert main([*args, "--out", str(killed)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 1 <= summary["resumed_tasks"] < 120 and summary["count"] == 60_000  # done tasks kept (so the trained index)
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    a, b = FaissIndex.open(killed), FaissIndex.open(tmp_path / "clean")
    np.testing.assert_array_equal(a.search(x[::301], 10)[1], b.search(x[::301], 10)[1])
    assert pd.read_parquet(killed / "metadata").equals(pd.read_parquet(tmp_path / "clean" / "metadata"))
