"""Published (clip-retrieval / LAION-5B style) index folders: several IVF-PQ parts + parquet metadata, no index.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rakt.indexes.base import Index, IndexSpecError
from rakt.indexes.faiss_index import FaissIndex, prepare_ivfpq
from rakt.indexes.registry import open_index
from rakt.cli import main
from rakt.pipeline.formats import embedding_table

N, D, NLIST, NPROBE = 3000, 32, 16, 4
PART_SIZES = (1000, 1200, 800)  # the FAISS parts
META_SIZES = (700, 1100, 900, 300)  # the metadata files: a different split
META_NAMES = ("metadata_0", "metadata_1", "metadata_2", "metadata_10")  # natural order != lexicographic order
MODEL = "open_clip:test:random"


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).normal(size=(20, d))
    x = centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def trained_ivfpq(x: np.ndarray) -> faiss.Index:
    """An empty, trained IVF-PQ (inner product) that visits NPROBE of NLIST lists."""
    index = faiss.index_factory(x.shape[1], f"IVF{NLIST},PQ8", faiss.METRIC_INNER_PRODUCT)
    prepare_ivfpq(index)  # no polysemous training: seconds, not tens of seconds
    index.train(x)
    faiss.extract_index_ivf(index).nprobe = NPROBE
    return index


def write_published(root: Path, x: np.ndarray, trained: faiss.Index) -> Path:
    """root/image.index/knn.index0{0,1,2} (disjoint id ranges, the same quantizer) + root/metadata/*.parquet."""
    (root / "image.index").mkdir(parents=True)
    start = 0
    for j, size in enumerate(PART_SIZES):
        part = faiss.clone_index(trained)
        part.add(x[start:start + size])
        faiss.write_index(part, str(root / "image.index" / f"knn.index{j:02d}"))
        start += size
    (root / "metadata").mkdir()
    start = 0
    for name, size in zip(META_NAMES, META_SIZES):
        rows = range(start, start + size)
        table = pa.table({"url": [f"https://img.example/{i}.jpg" for i in rows],
                          "caption": [f"photo {i}" for i in rows]})
        pq.write_table(table, root / "metadata" / f"{name}.parquet", row_group_size=250)
        start += size
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    x = clustered(N, D, 0)
    trained = trained_ivfpq(x)
    reference = faiss.clone_index(trained)
    reference.add(x)
    root = write_published(tmp_path_factory.mktemp("published") / "laion", x, trained)
    return {"x": x, "trained": trained, "reference": reference, "root": root}


@pytest.fixture()
def copy(world, tmp_path) -> Path:
    """A private copy of the published folder, to break."""
    return Path(shutil.copytree(world["root"], tmp_path / "laion"))


def test_search_equals_one_index(world):
    index = open_index(f"faiss:{world['root']}")
    assert isinstance(index, Index) and isinstance(index, FaissIndex)
    assert (index.size, index.dim, index.metric, index.model) == (N, D, "ip", "unknown")
    queries = clustered(40, D, 1)
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = world["reference"].search(queries, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids, ref_ids)
    assert {int(i) // 1000 for i in ids.ravel()} >= {0, 1, 2}  # hits come from every part
    info = index.info()
    assert info["kind"] == "published" and info["count"] == N and len(info["parts"]) == 3
    assert info["parts"][0] == "image.index/knn.index00" and info["factory"] == f"IndexIVFPQ(nlist={NLIST}, M=8)"


def test_metadata_rows_follow_faiss_ids(world):
    index = open_index(str(world["root"]))  # a plain path opens it too
    ids = np.array([2999, 0, 1799, 1800, 699, 700, 1234, 1234, 2700])  # across part and metadata-file bounds
    table = index.metadata(ids)
    assert table["url"].to_pylist() == [f"https://img.example/{i}.jpg" for i in ids]
    assert table["caption"].to_pylist() == [f"photo {i}" for i in ids]
    assert table["id"].to_pylist() == [str(i) for i in ids]  # no id column: the FAISS id stands in
    assert index.metadata(ids[:2], columns=["id", "url"]).column_names == ["id", "url"]
    _, found = index.search(clustered(5, D, 2), 3)
    urls = index.metadata(found.ravel())["url"].to_pylist()
    assert urls == [f"https://img.example/{i}.jpg" for i in found.ravel()]


def test_parts_are_memory_mapped(world):
    mapped = FaissIndex.open(world["root"])
    assert mapped.mapped and mapped.info()["ivf_lists"] == "ondisk"
    in_ram = FaissIndex.open(world["root"], mmap=False)
    assert not in_ram.mapped and in_ram.info()["ivf_lists"] == "ram"
    queries = clustered(10, D, 3)
    np.testing.assert_array_equal(mapped.search(queries, 5)[1], in_ram.search(queries, 5)[1])
    ids = np.array([5, 1500, 2999])
    vectors = mapped.embeddings(ids)  # decoded PQ codes, read through the mapped lists
    np.testing.assert_allclose(vectors, in_ram.embeddings(ids), atol=1e-6)
    assert vectors.shape == (3, D) and np.abs(vectors).sum() > 0


def test_dim_mismatch_names_the_part(copy):
    other = trained_ivfpq(clustered(1000, D // 2, 4))
    faiss.write_index(other, str(copy / "image.index" / "knn.index01"))
    with pytest.raises(IndexSpecError, match=r"knn\.index01: part has dim 16 but .*knn\.index00 has dim 32"):
        open_index(f"faiss:{copy}")


def test_metric_mismatch_names_the_part(copy):
    flat = faiss.IndexFlatL2(D)
    flat.add(clustered(1200, D, 5))
    faiss.write_index(flat, str(copy / "image.index" / "knn.index01"))
    with pytest.raises(IndexSpecError, match=r"knn\.index01: part metric differs"):
        open_index(f"faiss:{copy}")


def test_fewer_metadata_rows_is_an_error(copy):
    (copy / "metadata" / "metadata_10.parquet").unlink()
    with pytest.raises(IndexSpecError, match="metadata has 2700 rows but the index holds 3000"):
        open_index(f"faiss:{copy}")


def test_missing_listed_part_is_an_error(copy):
    (copy / "rakt.json").write_text(json.dumps({"parts": ["image.index/knn.index00", "image.index/knn.index07"]}))
    with pytest.raises(IndexSpecError, match=r"knn\.index07: index part listed in .* is missing"):
        open_index(f"faiss:{copy}")


def test_sidecar_part_list_and_model(copy):
    (copy / "rakt.json").write_text(json.dumps({"model": MODEL, "nprobe": NLIST, "parts": ["image.index/knn.index00",
                                                                                         "image.index/knn.index01"]}))
    (copy / "metadata" / "metadata_10.parquet").unlink()  # 2700 rows >= 2200 vectors: allowed
    index = open_index(f"faiss:{copy}")
    assert index.model == MODEL and index.size == 2200
    assert index.info()["model_source"] == "rakt.json" and index.nprobe == NLIST


def test_model_from_spec_option(world):
    index = open_index(f"faiss:{world['root']}?model={MODEL}")
    assert index.model == MODEL and index.info()["model_source"] == "spec"
    with pytest.raises(IndexSpecError, match="unknown option"):
        open_index(f"faiss:{world['root']}?modle={MODEL}")


def test_retrieve_refuses_unknown_model_unless_forced(world, copy, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    queries = clustered(12, D, 6)
    pq.write_table(embedding_table([f"q{i}" for i in range(12)], [i % 2 for i in range(12)], ["train"] * 12, queries),
                   target / "part-00000.parquet")
    (target / "embeddings.json").write_text(json.dumps({"model": MODEL, "dim": D, "count": 12, "normalized": True}))
    args = ["retrieve", str(target), "--index", f"faiss:{copy}", "--k", "5"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "'unknown'" in err and "rakt.json" in err and f"?model={MODEL}" in err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--force", "--out", str(tmp_path / "forced")]) == 0
    cand = pd.read_parquet(tmp_path / "forced" / "candidates.parquet")  # rows by query, then rank
    cand = cand.assign(q=cand["query_id"].str[1:].astype(int)).sort_values(["q", "rank"], kind="mergesort")
    _, ref_ids = world["reference"].search(queries, 5)
    np.testing.assert_array_equal(cand["pool_id"].to_numpy().reshape(12, 5), ref_ids)
    (copy / "rakt.json").write_text(json.dumps({"model": MODEL}))  # declared: no --force needed
    assert main([*args, "--out", str(tmp_path / "declared")]) == 0
    assert json.loads((tmp_path / "declared" / "candidates.json").read_text())["index_model"] == MODEL
    capsys.readouterr()
    assert main(["index", "info", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "published"


def test_merged_on_disk_index_opens_where_it_lies(tmp_path):
    """clip-retrieval's merged layout (populated.index + merged_index.ivfdata, made by faiss's merge_ondisk, whose
    lists file path is recorded inside the index) opens from wherever the folder was moved to."""
    from faiss.contrib.ondisk import merge_ondisk

    x = clustered(N, D, seed=0)
    trained = trained_ivfpq(x)
    built = tmp_path / "built"
    write_published(built, x, trained)
    merged = faiss.clone_index(trained)
    merge_ondisk(merged, [str(built / "image.index" / f"knn.index{j:02d}") for j in range(3)],
                 str(built / "merged_index.ivfdata"), shift_ids=True)
    faiss.write_index(merged, str(built / "populated.index"))
    expected = merged.search(x[::100], 5)[1]
    del merged
    shutil.rmtree(built / "image.index")
    moved = tmp_path / "moved"
    shutil.move(built, moved)  # the recorded path of the lists file now points nowhere
    index = FaissIndex.open(moved, model=MODEL)
    assert index.size == N and index.info()["ivf_lists"] == "ondisk" and index.mapped
    scores, ids = index.search(x[::100], 5)
    np.testing.assert_array_equal(ids, expected)
    assert index.metadata(ids[:2, 0])["url"].to_pylist() == [f"https://img.example/{i}.jpg" for i in ids[:2, 0]]
