"""FAISS index build/open/search on clustered random vectors, multi-part indexes, errors, and the registry."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rakt.indexes.base import Index, IndexSpecError
from rakt.indexes.faiss_index import FaissIndex, build_faiss_index, choose_index, parse_memory, recall_at
from rakt.indexes.registry import list_index_schemes, open_index, register_index

N, D = 6000, 64


def clustered(n: int, d: int, seed: int = 0, centers: int = 30, noise: float = 0.6, latent: int = 8) -> np.ndarray:
    """Unit vectors like image embeddings: clustered, of low intrinsic dimension (`latent`) spread over d dims."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1000).normal(size=(centers, latent))  # the same clusters for every seed
    x = c[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, latent))
    x = x @ np.random.default_rng(1001).normal(size=(latent, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries: np.ndarray, x: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    if metric == "ip":
        s = queries @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((queries[:, None, :] - x[None]) ** 2).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def meta_table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"id": [f"img{i:05d}" for i in range(offset, offset + n)],
                     "path": [f"/pool/{i:05d}.jpg" for i in range(offset, offset + n)]})


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(N, D)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("flat")
    build_faiss_index(data, meta_table(N), out, model="test:model", kind="auto", memory_budget="4G")
    return out


@pytest.fixture(scope="module")
def ivfpq_dir(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("ivfpq")
    build_faiss_index(data, meta_table(N), out, model="test:model", kind="ivfpq", train_size=3000, nprobe=8)
    return out


def test_parse_memory_and_choice():
    assert parse_memory("500M") == 500 * 2**20
    assert parse_memory("16G") == 16 * 2**30
    assert parse_memory("1.5K") == 1536
    assert parse_memory("4GB") == 4 * 2**30
    with pytest.raises(IndexSpecError, match="500M"):
        parse_memory("lots")
    assert choose_index(N, D, memory_budget="1G").factory == "Flat"
    assert choose_index(N, D, memory_budget="1M").kind == "ivfpq"  # 6000 x 64 float32 = 1.5M: over a 1M budget
    assert choose_index(3_000_000, D, memory_budget="1T").kind == "ivfpq"  # too many vectors to scan
    small = choose_index(1_000_000, 512, memory_budget="200M", train_size=100_000)
    assert small.kind == "ivfpq" and small.memory_bytes <= 200 * 2**20
    assert small.factory == "IVF2048,PQ64"  # 4*sqrt(1M)=4000 -> 4096, clamped to 100k/39 -> 2048; 96 does not divide 512
    assert choose_index(1_000_000, 512, memory_budget="50M").factory.endswith(",PQ32")  # 1M * (32 + 8) bytes + centroids
    with pytest.raises(IndexSpecError, match="memory-budget"):
        choose_index(1_000_000, 512, memory_budget="1M")


def test_flat_equals_brute_force(flat_dir, data):
    info = json.loads((flat_dir / "index.json").read_text())
    assert info["kind"] == "flat" and info["factory"] == "Flat" and info["recall_at_10"] == 1.0
    assert info["count"] == N and info["dim"] == D and info["model"] == "test:model"
    index = open_index(f"faiss:{flat_dir}")
    queries = clustered(50, D, seed=1)
    scores, ids = index.search(queries, 10)
    exact_s, exact_i = brute_force(queries, data, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (50, 10)
    np.testing.assert_array_equal(ids, exact_i)
    np.testing.assert_allclose(scores, exact_s, atol=1e-5)


def test_l2_flat(tmp_path, data):
    build_faiss_index(data[:1000] * 3, meta_table(1000), tmp_path, model="m", metric="l2", kind="flat")
    index = FaissIndex.open(tmp_path)
    queries = clustered(20, D, seed=2)
    scores, ids = index.search(queries, 5)
    exact_s, exact_i = brute_force(queries, data[:1000] * 3, 5, metric="l2")
    np.testing.assert_array_equal(ids, exact_i)
    np.testing.assert_allclose(scores, exact_s, rtol=1e-4, atol=1e-4)


def test_ivfpq_recall_is_measured_and_recorded(ivfpq_dir, data):
    info = json.loads((ivfpq_dir / "index.json").read_text())
    assert info["kind"] == "ivfpq" and info["factory"] == "IVF64,PQ8"  # 4*sqrt(6000) -> 256, clamped to 3000/39 -> 64
    assert info["memory_bytes"] < N * D * 4 / 2  # compressed
    index = FaissIndex.open(ivfpq_dir)
    queries = data[::30]
    _, exact = brute_force(queries, data, 10)
    measured = recall_at(index.search(queries, 10)[1], exact)
    assert 0.5 <= info["recall_at_10"] <= 1.0
    assert abs(measured - info["recall_at_10"]) < 0.15
    low = recall_at(index.search(queries, 10, nprobe=1)[1], exact)
    high = recall_at(index.search(queries, 10, nprobe=64)[1], exact)
    assert high > low  # the nprobe override reaches the index


def test_mmap_open(flat_dir, ivfpq_dir, data):
    for path in (flat_dir, ivfpq_dir):
        mapped = FaissIndex.open(path, mmap=True)
        loaded = FaissIndex.open(path, mmap=False)
        assert mapped.info()["mmap"] is True and loaded.info()["mmap"] is False
        maps = Path("/proc/self/maps")
        if maps.exists():
            assert str(path / "index-000.faiss") in maps.read_text()
        q = data[:20]
        np.testing.assert_array_equal(mapped.search(q, 10)[1], loaded.search(q, 10)[1])


def _two_part_dir(root: Path, data: np.ndarray, split: int = 2500, dims: tuple[int, int] = (D, D)) -> Path:
    """A hand-made LAION-style index: two FAISS parts and two metadata files (several row groups each)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir()
    for j, (chunk, offset) in enumerate(((data[:split], 0), (data[split:], split))):
        part = faiss.IndexFlatIP(dims[j])
        part.add(np.ascontiguousarray(chunk[:, :dims[j]]))
        faiss.write_index(part, str(root / f"part-{j}.faiss"))
        pq.write_table(meta_table(len(chunk), offset), root / "metadata" / f"part-{j:05d}.parquet", row_group_size=700)
    info = {"kind": "flat", "factory": "Flat", "model": "test:model", "dim": D, "metric": "ip", "count": len(data),
            "parts": ["part-0.faiss", "part-1.faiss"], "nprobe": 0}
    (root / "index.json").write_text(json.dumps(info))
    return root


def test_two_part_index_matches_single_part(tmp_path, flat_dir, data):
    two = FaissIndex.open(_two_part_dir(tmp_path / "two", data))
    one = FaissIndex.open(flat_dir)
    assert two.size == one.size == N
    queries = clustered(40, D, seed=3)
    s2, i2 = two.search(queries, 10)
    s1, i1 = one.search(queries, 10)
    assert (i2 >= 2500).any() and (i2 < 2500).any()  # results come from both parts
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    ids = np.array([5999, 0, 2500, 2499, 0, 700, 3201])
    assert two.metadata(ids)["id"].to_pylist() == [f"img{i:05d}" for i in ids]
    np.testing.assert_allclose(two.embeddings(ids), data[ids], atol=1e-6)


def test_metadata_rows_align_with_ids(flat_dir, ivfpq_dir):
    for path in (flat_dir, ivfpq_dir):
        index = FaissIndex.open(path)
        ids = np.array([17, 3, 17, N - 1, 0])
        meta = index.metadata(ids)
        assert meta["id"].to_pylist() == [f"img{i:05d}" for i in ids]
        assert meta["path"].to_pylist() == [f"/pool/{i:05d}.jpg" for i in ids]
        assert index.metadata(np.array([], np.int64)).num_rows == 0
        with pytest.raises(ValueError, match="out of range"):
            index.metadata(np.array([N]))


def test_embeddings_reconstruct(flat_dir, ivfpq_dir, data):
    ids = np.array([4, 100, 4, 5999])
    np.testing.assert_allclose(FaissIndex.open(flat_dir).embeddings(ids), data[ids], atol=1e-6)
    approx = FaissIndex.open(ivfpq_dir).embeddings(ids)  # PQ codes decoded: close, not equal
    cos = (approx * data[ids]).sum(1) / np.linalg.norm(approx, axis=1)
    assert cos.min() > 0.9 and not np.allclose(approx, data[ids], atol=1e-6)


def test_normalizes_vectors_for_ip(tmp_path, data):
    info = build_faiss_index(data[:500] * 7.0, meta_table(500), tmp_path, model="m", kind="flat")
    assert info["normalized"] is True
    np.testing.assert_allclose(FaissIndex.open(tmp_path).embeddings(np.arange(3)), data[:3], atol=1e-5)


def test_pool_too_small_for_ivf(tmp_path, data):
    with pytest.raises(IndexSpecError, match="kind=flat"):
        build_faiss_index(data[:2000], meta_table(2000), tmp_path, model="m", kind="IVF1024,PQ8")
    with pytest.raises(IndexSpecError, match="kind=flat"):
        build_faiss_index(data[:500], meta_table(500), tmp_path, model="m", kind="ivfpq")
    assert not (tmp_path / "index.json").exists()


def test_mismatched_part_dim_is_refused(tmp_path, data):
    root = _two_part_dir(tmp_path / "bad", data, dims=(D, 16))
    with pytest.raises(IndexSpecError, match=r"part-1\.faiss.*dim 16"):
        FaissIndex.open(root)


def test_metadata_row_count_mismatch_is_refused(tmp_path, data):
    root = _two_part_dir(tmp_path / "bad", data)
    pq.write_table(meta_table(10, 2500), root / "metadata" / "part-00001.parquet")
    with pytest.raises(IndexSpecError, match="2510 rows but the index holds 6000"):
        FaissIndex.open(root)


def test_missing_files_are_named(tmp_path, data):
    root = _two_part_dir(tmp_path / "bad", data)
    (root / "part-1.faiss").unlink()
    with pytest.raises(IndexSpecError, match=r"part-1\.faiss.*missing"):
        FaissIndex.open(root)
    (root / "index.json").unlink()
    with pytest.raises(IndexSpecError, match=r"index\.json not found.*rakt index build"):
        open_index(str(root))


# --- registry ----------------------------------------------------------------------------------------

class TinyIndex:
    """A minimal exact index over a matrix, enough to satisfy the protocol."""

    def __init__(self, vectors: np.ndarray, model: str = "test:model") -> None:
        self.vectors, self.dim, self.metric, self.size, self.model = vectors, vectors.shape[1], "ip", len(vectors), model

    def search(self, queries, k):
        s = queries @ self.vectors.T
        i = np.argsort(-s, axis=1)[:, :k]
        return np.take_along_axis(s, i, 1).astype(np.float32), i.astype(np.int64)

    def metadata(self, ids):
        return pa.table({"id": [f"v{i}" for i in ids]})

    def embeddings(self, ids):
        return self.vectors[ids]

    def info(self):
        return {"kind": "tiny", "size": self.size}


def test_registered_scheme_opens(data):
    @register_index("tinytest")
    def open_tiny(rest: str) -> TinyIndex:
        return TinyIndex(data[: int(rest)])

    assert "tinytest" in list_index_schemes() and "faiss" in list_index_schemes()
    index = open_index("tinytest:100")
    assert isinstance(index, Index) and index.size == 100


def test_unknown_scheme_and_non_index_are_refused(tmp_path):
    with pytest.raises(IndexSpecError, match=r"unknown index scheme 'nosuch:'.*faiss"):
        open_index("nosuch:/x")
    with pytest.raises(IndexSpecError, match="no such index directory"):
        open_index(str(tmp_path / "absent"))

    @register_index("notanindex")
    def open_bad(rest: str):
        return object()

    with pytest.raises(IndexSpecError, match="lacks dim, metric, size, model, search"):
        open_index("notanindex:x")


def test_entry_point_scheme(tmp_path, monkeypatch, flat_dir):
    """A real installed distribution on sys.path declaring a 'rakt.indexes' entry point."""
    site = tmp_path / "site"
    dist = site / "rakt_demo_index-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rakt-demo-index\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rakt.indexes]\ndemoidx = rakt_demo_index:open_demo\n")
    (site / "rakt_demo_index.py").write_text(
        "from rakt.indexes.faiss_index import FaissIndex\n\n"
        "def open_demo(rest):\n"
        "    index = FaissIndex.open(rest)\n"
        "    index.model = 'demo:' + index.model\n"
        "    return index\n")
    assert "demoidx" not in list_index_schemes()
    monkeypatch.syspath_prepend(str(site))
    assert "demoidx" in list_index_schemes()
    index = open_index(f"demoidx:{flat_dir}")
    assert index.model == "demo:test:model" and index.size == N
