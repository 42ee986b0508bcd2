"""`rakt retrieve` through the CLI: candidates against brute force, model/dim/k checks, query-split filtering."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rakt.indexes.faiss_index import build_faiss_index
from rakt.cli import main
from rakt.pipeline.formats import embedding_table
from rakt.pipeline.io import json_hash

POOL, D, MODEL = 400, 16, "open_clip:test:random"


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_set(root: Path, vectors: np.ndarray, splits: list[str], labels: list, model: str = MODEL) -> Path:
    """An embedding set directory: two partitions + embeddings.json."""
    root.mkdir(parents=True)
    ids = [f"q{i:03d}" for i in range(len(vectors))]
    half = len(vectors) // 2
    for j, sl in enumerate((slice(0, half), slice(half, None))):
        table = embedding_table(ids[sl], labels[sl], splits[sl], vectors[sl])
        pq.write_table(table, root / f"part-{j:05d}.parquet")
    (root / "embeddings.json").write_text(json.dumps({"model": model, "dim": vectors.shape[1],
                                                      "count": len(vectors), "normalized": True}))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    pool = unit(POOL, D, 0)
    meta = pa.table({"id": [f"p{i:03d}" for i in range(POOL)], "path": [f"/pool/{i}.jpg" for i in range(POOL)]})
    build_faiss_index(pool, meta, root / "index", model=MODEL, kind="flat")
    queries = unit(30, D, 1)
    splits = ["train"] * 20 + ["test"] * 10
    labels = [i % 3 if i % 5 else None for i in range(30)]
    target = write_set(root / "target", queries, splits, labels)
    return {"root": root, "pool": pool, "queries": queries, "splits": splits, "labels": labels, "target": target}


def test_candidates_match_brute_force(world, tmp_path):
    out = tmp_path / "cand"
    assert main(["retrieve", str(world["target"]), "--index", f"faiss:{world['root'] / 'index'}", "--k", "7",
                 "--batch-size", "6", "--out", str(out)]) == 0
    table = pq.read_table(out / "candidates.parquet")
    assert table.schema.field("query_id").type == pa.string()
    assert table.schema.field("query_label").type == pa.int64()
    assert table.schema.field("rank").type == pa.int32()
    assert table.schema.field("pool_id").type == pa.int64()
    assert table.schema.field("score").type == pa.float32()
    df = table.to_pandas()
    assert len(df) == 20 * 7 and df["query_id"].nunique() == 20  # default query split: train
    sims = world["queries"][:20] @ world["pool"].T
    for q in range(20):
        rows = df[df["query_id"] == f"q{q:03d}"].sort_values("rank")
        assert rows["rank"].tolist() == list(range(7))
        assert rows["pool_id"].tolist() == np.argsort(-sims[q])[:7].tolist()
        np.testing.assert_allclose(rows["score"], np.sort(sims[q])[::-1][:7], atol=1e-5)
        label = world["labels"][q]
        assert (rows["query_label"].isna().all() if label is None else (rows["query_label"] == label).all())
    info = json.loads((out / "candidates.json").read_text())
    assert info["index"] == f"faiss:{(world['root'] / 'index').resolve()}"
    assert info["embeddings"] == str(world["target"].resolve())
    assert info["index_model"] == info["embeddings_model"] == MODEL
    assert (info["k"], info["n_queries"], info["n_candidates"], info["query_split"]) == (7, 20, 140, "train")
    index_json = json.loads((world["root"] / "index" / "index.json").read_text())
    emb_json = json.loads((world["target"] / "embeddings.json").read_text())
    assert info["inputs"] == {"embeddings_json_hash": json_hash(emb_json), "index_json_hash": json_hash(index_json)}
    assert info["config_hash"] and info["created"]


def test_query_split_filtering(world, tmp_path):
    index = str(world["root"] / "index")  # a plain directory means faiss
    assert main(["retrieve", str(world["target"]), "--index", index, "--k", "3", "--query-split", "test",
                 "--out", str(tmp_path / "test")]) == 0
    df = pd.read_parquet(tmp_path / "test" / "candidates.parquet")
    assert sorted(df["query_id"].unique()) == [f"q{i:03d}" for i in range(20, 30)]
    assert json.loads((tmp_path / "test" / "candidates.json").read_text())["index"] == str(Path(index).resolve())
    assert main(["retrieve", str(world["target"]), "--index", index, "--k", "3", "--query-split", "",
                 "--out", str(tmp_path / "all")]) == 0
    assert pd.read_parquet(tmp_path / "all" / "candidates.parquet")["query_id"].nunique() == 30


def test_empty_query_split_is_refused(world, tmp_path, capsys):
    assert main(["retrieve", str(world["target"]), "--index", str(world["root"] / "index"), "--k", "3",
                 "--query-split", "val", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no rows with split 'val'" in err and "test, train" in err
    assert not (tmp_path / "c" / "candidates.parquet").exists()


def test_model_mismatch_is_refused_unless_forced(world, tmp_path, capsys):
    other = write_set(tmp_path / "other", world["queries"], world["splits"], world["labels"], model="timm:other")
    args = ["retrieve", str(other), "--index", str(world["root"] / "index"), "--k", "3"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "timm:other" in err and MODEL in err and "--force" in err
    assert not (tmp_path / "refused" / "candidates.parquet").exists()
    assert main([*args, "--force", "--out", str(tmp_path / "forced")]) == 0
    info = json.loads((tmp_path / "forced" / "candidates.json").read_text())
    assert info["embeddings_model"] == "timm:other" and info["index_model"] == MODEL


def test_dim_mismatch_is_refused(world, tmp_path, capsys):
    small = write_set(tmp_path / "small", unit(30, 8, 2), world["splits"], world["labels"])
    assert main(["retrieve", str(small), "--index", str(world["root"] / "index"), "--k", "3", "--force",
                 "--out", str(tmp_path / "c")]) == 2
    assert "dim 8" in capsys.readouterr().err


def test_k_beyond_pool_is_refused(world, tmp_path, capsys):
    assert main(["retrieve", str(world["target"]), "--index", str(world["root"] / "index"), "--k", str(POOL + 1),
                 "--out", str(tmp_path / "c")]) == 2
    assert f"holds only {POOL} images" in capsys.readouterr().err
    assert main(["retrieve", str(world["target"]), "--index", str(world["root"] / "index"), "--k", str(POOL),
                 "--out", str(tmp_path / "ok")]) == 0
    assert len(pd.read_parquet(tmp_path / "ok" / "candidates.parquet")) == 20 * POOL
