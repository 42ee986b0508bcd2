"""The torch exact search (CPU here; the same code runs on CUDA) against faiss's exact results, the FaissIndex
search backends, and `rakt retrieve --backend`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import rakt.indexes.torch_search as ts
from rakt.indexes.base import IndexSpecError
from rakt.indexes.faiss_index import FaissIndex, build_faiss_index, recall_at
from rakt.indexes.registry import register_index
from rakt.indexes.torch_search import TorchExactSearch
from rakt.cli import main
from rakt.pipeline.formats import embedding_table

D, N = 32, 5003  # N is no multiple of the block sizes used below
MODEL = "test:torch-search"


def unit(n: int, d: int = D, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (scale * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, d: int = 64, centers: int = 50, latent: int = 16) -> np.ndarray:
    """Embedding-like unit vectors (clustered, low intrinsic dimension): close neighbours, hard for low precision."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(100).normal(size=(centers, latent))
    x = (c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, latent))) @ np.random.default_rng(101).normal(
        size=(latent, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def faiss_exact(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(q, k)


def assert_same_topk(s: np.ndarray, i: np.ndarray, es: np.ndarray, ei: np.ndarray, tol: float = 1e-4) -> None:
    """Scores close; ids equal wherever the exact score is > tol from its neighbours in the ranking and the
    k-th score (a near-tie may legitimately swap), and at least 99% of ids equal overall."""
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == es.shape
    np.testing.assert_allclose(s, es, atol=tol, rtol=1e-5)
    gaps = np.abs(np.diff(es, axis=1))
    clear = np.ones_like(es, bool)
    clear[:, 1:] &= gaps > tol
    clear[:, :-1] &= gaps > tol
    clear &= np.abs(es - es[:, -1:]) > tol
    clear[:, -1] = False
    np.testing.assert_array_equal(i[clear], ei[clear])
    assert (i == ei).mean() > 0.99


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return unit(N, seed=0)


@pytest.mark.parametrize("metric,scale", [("ip", 1.0), ("l2", 3.0)])
def test_equals_faiss_flat_over_blocks(base, metric, scale):
    x, q = base * scale, unit(150, seed=1, scale=scale)
    search = TorchExactSearch(x, metric, device="cpu", block_rows=1000, query_batch=64)  # 6 blocks, 3 query batches
    es, ei = faiss_exact(x, q, 10, metric)
    assert_same_topk(*search.search(q, 10), es, ei)
    s1, i1 = search.search(q, 1)
    assert_same_topk(s1, i1, es[:, :1], ei[:, :1])


def test_k_equals_n_and_k_beyond_n(base):
    x, q = base[:700], unit(20, seed=2)
    search = TorchExactSearch(x, "l2", device="cpu", block_rows=256)
    s, i = search.search(q, len(x))
    assert (np.sort(i, 1) == np.arange(len(x))).all()  # every vector exactly once
    assert (np.diff(s, axis=1) >= 0).all()  # l2: nearest first
    assert_same_topk(s, i, *faiss_exact(x, q, len(x), "l2"))
    with pytest.raises(ValueError, match=r"k must be in \[1, 700\]"):
        search.search(q, len(x) + 1)
    with pytest.raises(ValueError, match="queries must be"):
        search.search(q[:, :5], 3)


def test_ties_lower_id_first():
    x = np.random.default_rng(3).integers(-2, 3, size=(3000, 8)).astype(np.float32)  # exact integer scores
    dup = [2990, 7, 1500, 42]  # across blocks, deliberately out of order
    x[dup] = np.array([5, 5, 5, 5, 0, 0, 0, 0], np.float32)
    search = TorchExactSearch(x, "ip", device="cpu", block_rows=700)
    s, i = search.search(x[[7]], 4)
    assert i[0].tolist() == sorted(dup) and (s[0] == 100).all()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_storage_recall(dtype):
    x, q = clustered(6000, seed=4), clustered(200, seed=5)
    search = TorchExactSearch(x, "ip", device="cpu", dtype=dtype, block_rows=2048)
    assert search.info()["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    s, i = search.search(q, 10)
    es, ei = faiss_exact(x, q, 10, "ip")
    assert recall_at(i, ei) >= 0.98
    np.testing.assert_allclose(s, es, atol=0.02)  # rounded vectors, fp32 accumulation


def test_sharded_like_several_gpus(base, monkeypatch):
    """Three shards (as on three GPUs), with the placement that would split them, give the one-shard result."""
    monkeypatch.setattr(ts, "_devices", lambda device: [torch.device("cpu")] * 3)
    monkeypatch.setattr(TorchExactSearch, "_rows_per_device", lambda self, v: [1700, 0, self.size - 1700])
    q = unit(50, seed=6)
    sharded = TorchExactSearch(base, "ip", block_rows=512)
    assert [s.offset for s in sharded._shards] == [0, 1700] and len(sharded._shards) == 2
    assert_same_topk(*sharded.search(q, 25), *faiss_exact(base, q, 25, "ip"))


def test_gpu_placement_from_free_memory(monkeypatch):
    """Rows go to the first GPU when they fit, else are split in proportion to free memory, else refused."""
    search = TorchExactSearch.__new__(TorchExactSearch)
    search.devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    search.dtype, search.dim, search.metric = torch.float16, 100, "ip"  # 200 bytes per row
    free = {0: 200 * 1000, 1: 200 * 3000}
    monkeypatch.setattr(ts, "_free_bytes", lambda dev: free[dev.index] / (1 - ts.GPU_RESERVE_FRACTION))
    search.size = 800
    assert search._rows_per_device(np.zeros((1, 1))) == [800, 0]
    search.size = 2000
    assert search._rows_per_device(np.zeros((1, 1))) == [500, 1500]
    search.size = 4001
    with pytest.raises(IndexSpecError, match="GPU memory"):
        search._rows_per_device(np.zeros((1, 1)))


def test_gpu_block_rows_from_free_memory(monkeypatch):
    """On CUDA, block rows follow free memory (score tiles within half of it, capped), in multiples of 256."""
    search = TorchExactSearch.__new__(TorchExactSearch)
    search.query_batch = search.block_rows = 0
    shard = ts._Shard(torch.empty((10**7, 64), device="meta"), None, 0)  # takes the GPU branch, allocates nothing
    monkeypatch.setattr(ts, "_free_bytes", lambda dev: 12 * 2**30)
    qb, rows = search._sizes(shard, 100_000)
    assert qb == ts.GPU_QUERY_BATCH and rows % 256 == 0
    assert qb * rows * 4 * 3 <= 6 * 2**30 < qb * (rows + 256) * 4 * 3
    monkeypatch.setattr(ts, "_free_bytes", lambda dev: 200 * 2**30)
    assert search._sizes(shard, 100_000)[1] == ts.TILE_MAX_ELEMENTS // qb
    monkeypatch.setattr(ts, "_free_bytes", lambda dev: 2**20)
    assert search._sizes(shard, 100_000)[1] == 1024  # a floor
    assert search._sizes(shard, 10)[0] == 10  # 10 queries make a batch of 10


def test_from_faiss_shares_memory_and_refuses_ivfpq(base):
    flat = faiss.IndexFlatIP(D)
    flat.add(base)
    search = TorchExactSearch.from_faiss(flat, device="cpu")
    assert search._shards[0].x.data_ptr() == int(flat.get_xb())  # no copy of the database on CPU
    ivf = faiss.index_factory(D, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)  # any non-flat index
    ivf.train(base[:1000])
    with pytest.raises(IndexSpecError, match="flat"):
        TorchExactSearch.from_faiss(ivf)


# --- FaissIndex backends and the CLI -------------------------------------------------------------------

def two_part_dir(root: Path, x: np.ndarray, split: int, metric: str = "ip") -> Path:
    (root / "metadata").mkdir(parents=True)
    for j, (chunk, offset) in enumerate(((x[:split], 0), (x[split:], split))):
        part = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
        part.add(chunk)
        faiss.write_index(part, str(root / f"part-{j}.faiss"))
        pq.write_table(pa.table({"id": [f"p{i}" for i in range(offset, offset + len(chunk))]}),
                       root / "metadata" / f"part-{j:05d}.parquet")
    (root / "index.json").write_text(json.dumps({"kind": "flat", "factory": "Flat", "model": MODEL, "dim": x.shape[1],
                                                 "metric": metric, "count": len(x), "nprobe": 0,
                                                 "parts": ["part-0.faiss", "part-1.faiss"]}))
    return root


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_index_torch_backend_matches_faiss(tmp_path, base, metric, caplog):
    root = two_part_dir(tmp_path / "two", base, split=2100, metric=metric)
    q = unit(40, seed=7)
    with caplog.at_level(logging.INFO, logger="rakt.indexes"):
        by_faiss = FaissIndex.open(root, backend="faiss")
        s_f, i_f = by_faiss.search(q, 30)
    assert "no GPU: searching on CPU" in caplog.text
    by_torch = FaissIndex.open(root, backend="torch")
    s_t, i_t = by_torch.search(q, 30)
    assert by_faiss.info()["search"] == ["faiss-cpu"] * 2 and by_torch.info()["search"] == ["torch-cpu"] * 2
    assert (i_t >= 2100).any() and (i_t < 2100).any()  # both parts contribute
    assert_same_topk(s_t, i_t, s_f, i_f)
    by_torch.set_backend("faiss")
    assert by_torch.info()["search"] == ["faiss-cpu"] * 2
    with pytest.raises(IndexSpecError, match="backend must be one of auto, faiss, torch"):
        by_torch.set_backend("gpu")


def test_auto_backend_without_gpu_uses_faiss_cpu(tmp_path, base, caplog):
    index = FaissIndex.open(two_part_dir(tmp_path / "two", base, split=100))
    assert index.info()["search"] is None  # nothing is set up before the first search
    with caplog.at_level(logging.INFO, logger="rakt.indexes"):
        index.search(unit(3, seed=8), 5)
    assert index.info()["search"] == ["faiss-cpu"] * 2 and index.device == "cpu"
    assert "no GPU: searching on CPU" in caplog.text


def test_auto_backend_choices_with_gpus(tmp_path, base, monkeypatch, caplog):
    """The auto decisions with a GPU, simulated on CPU: torch for flat parts when only torch sees a CUDA GPU (faiss
    on CPU for a part that does not fit), faiss-gpu clones when faiss-gpu sees one (CPU for k > its limit)."""
    import rakt.indexes.faiss_index as fi

    asked = []

    def fake_torch(part, device):
        asked.append(device)
        if len(asked) == 2:
            raise IndexSpecError("needs 9 GiB of GPU memory")
        return TorchExactSearch.from_faiss(part, device="cpu")

    monkeypatch.setattr(fi, "_torch_cuda", lambda: True)
    monkeypatch.setattr(fi, "_torch_search", fake_torch)
    root = two_part_dir(tmp_path / "two", base, split=2100)
    q = unit(5, seed=10)
    exact = FaissIndex.open(root, backend="faiss").search(q, 10)
    index = FaissIndex.open(root)
    with caplog.at_level(logging.INFO, logger="rakt.indexes"):
        assert_same_topk(*index.search(q, 10), *exact)
    assert asked == ["cuda", "cuda"] and index.info()["search"] == ["torch-cpu", "faiss-cpu"]
    assert "needs 9 GiB" in caplog.text and "no GPU" not in caplog.text

    monkeypatch.setattr(fi, "gpu_count", lambda: 2)
    monkeypatch.setattr(fi, "_clone_to_gpus", lambda part, ngpu: faiss.clone_index(part))
    index = FaissIndex.open(root)
    assert_same_topk(*index.search(q, 10), *exact)
    assert index.info()["search"] == ["faiss-gpu"] * 2 and index.device == "gpu" and len(asked) == 2
    with caplog.at_level(logging.WARNING, logger="rakt.indexes"):
        assert index.search(q, 2100 + 1)[1].shape == (5, 2101)
    assert "exceeds faiss GPU's limit" in caplog.text


def test_torch_backend_on_ivfpq_is_refused(tmp_path, base, monkeypatch, caplog):
    import rakt.indexes.faiss_index as fi

    out = tmp_path / "ivf"
    build_faiss_index(base[:2000], pa.table({"id": [f"p{i}" for i in range(2000)]}), out, model=MODEL,
                      kind="IVF16,PQ4", train_size=2000)
    index = FaissIndex.open(out)
    with pytest.raises(IndexSpecError, match=r"index-000\.faiss: backend 'torch' is exact search over flat"):
        index.set_backend("torch")
    index.set_backend("auto")  # the documented way: auto searches IVF-PQ with faiss
    assert index.search(base[:3], 5)[1].shape == (3, 5)
    monkeypatch.setattr(fi, "_torch_cuda", lambda: True)  # a CUDA GPU but no faiss-gpu: faiss CPU, and it says so
    with caplog.at_level(logging.INFO, logger="rakt.indexes"):
        FaissIndex.open(out).search(base[:3], 5)
    assert "IVF16,PQ4 without faiss-gpu: searching it with faiss on CPU" in caplog.text


def by_query(frame: pd.DataFrame) -> pd.DataFrame:
    """Candidate rows by query and rank (the file holds each search batch's rows in rank order)."""
    return frame.sort_values(["query_id", "rank"], kind="mergesort").reset_index(drop=True)


def test_cli_retrieve_backend_torch_equals_faiss(tmp_path, base):
    root = two_part_dir(tmp_path / "index", base, split=2500)
    target = tmp_path / "target"
    target.mkdir()
    q = unit(60, seed=9)
    pq.write_table(embedding_table([f"q{i}" for i in range(60)], [i % 4 for i in range(60)], ["train"] * 60, q),
                   target / "part-00000.parquet")
    (target / "embeddings.json").write_text(json.dumps({"model": MODEL, "dim": D, "count": 60, "normalized": True}))
    frames = {}
    for backend in ("faiss", "torch"):
        out = tmp_path / f"cand-{backend}"
        assert main(["retrieve", str(target), "--index", f"faiss:{root}", "--k", "20", "--batch-size", "25",
                     "--backend", backend, "--out", str(out)]) == 0
        frames[backend] = by_query(pd.read_parquet(out / "candidates.parquet"))
    f, t = frames["faiss"], frames["torch"]
    assert len(f) == len(t) == 60 * 20
    assert (f["query_id"] == t["query_id"]).all() and (f["rank"] == t["rank"]).all()
    assert (f["pool_id"] == t["pool_id"]).mean() > 0.99
    np.testing.assert_allclose(f["score"], t["score"], atol=1e-5)
    class Plain:  # a custom index without set_backend: --backend is ignored
        def __init__(self, inner: FaissIndex) -> None:
            self.inner, self.dim, self.metric, self.size, self.model = inner, D, "ip", inner.size, MODEL

        def search(self, queries, k):
            return self.inner.search(queries, k)

        def metadata(self, ids):
            return self.inner.metadata(ids)

        def embeddings(self, ids):
            return self.inner.embeddings(ids)

        def info(self):
            return {"kind": "plain"}

    register_index("plaintorchtest")(lambda rest: Plain(FaissIndex.open(rest, backend="faiss")))

    assert main(["retrieve", str(target), "--index", f"plaintorchtest:{root}", "--k", "20", "--backend", "torch",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = by_query(pd.read_parquet(tmp_path / "plain" / "candidates.parquet"))
    assert (plain["pool_id"] == f["pool_id"]).all()
    with pytest.raises(SystemExit):  # argparse choices
        main(["retrieve", str(target), "--index", f"faiss:{root}", "--backend", "gpu", "--out", str(tmp_path / "x")])
