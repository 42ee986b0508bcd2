"""sample: random transfer manifests from real shards (write_shard, the data kit) and a real FAISS index."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from conftest import image_array, jpeg_bytes, write_shard
from rakt.indexes.faiss_index import build_faiss_index
from rakt import cli
from rakt.pipeline.config import ConfigError, MaterializeConfig, SampleConfig
from rakt.pipeline.formats import embedding_table
from rakt.pipeline.io import InputError, write_json, write_parquet
from rakt.pipeline.materialize import run as materialize
from rakt.pipeline.sample import run


@pytest.fixture
def pool(tmp_path):
    """Shards tar + tar.gz (12 images each, one json-only sample) and a corrupt one; returns (dir, {key: jpeg})."""
    root, originals = tmp_path / "pool", {}
    for s, name in enumerate(["pool-000000.tar", "pool-000001.tar.gz"]):
        samples = []
        for i in range(12):
            key = f"pool_{s * 100 + i:06d}"
            originals[key] = jpeg_bytes(image_array(s * 100 + i), quality=70 + i)
            samples.append({"__key__": key, "jpg": originals[key], "json": {"caption": key}})
        samples.append({"__key__": f"noimage_{s}", "json": {"caption": "none"}})
        write_shard(root / name, samples)
    (root / "pool-000002.tar.gz").write_bytes(b"not a tar" * 100)
    return root, originals


def embedding_set(path: Path, ids: list[str]) -> Path:
    """A real embedding set (the contract's parquet + embeddings.json) holding `ids`, e.g. the labelled images."""
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    write_parquet(path / "part-00000.parquet", embedding_table(ids, [0] * len(ids), ["train"] * len(ids), vectors))
    write_json(path / "embeddings.json", {"model": "test", "dim": 8, "count": len(ids), "normalized": False})
    return path


def sample(source, out: Path, **kw) -> tuple[dict, pa.Table]:
    summary = run(SampleConfig(source=[str(s) for s in source], out=str(out), **kw))
    return summary, pq.read_table(out / "manifest.parquet")


def read_back(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False,
                               empty_check=False))


def test_shards_with_exclusion_materialize_to_the_original_bytes(tmp_path, pool):
    root, originals = pool
    keys = list(originals)
    labelled = embedding_set(tmp_path / "labelled", keys[:4])
    _, prior = sample([root], tmp_path / "prior", n=3, exclude=[str(labelled)], seed=5)
    summary, table = sample([root], tmp_path / "out", n=10, exclude=[str(labelled), str(tmp_path / "prior")])
    assert summary == {"out": str(tmp_path / "out"), "selected": 10, "available": 17, "excluded": 7}
    banned = set(keys[:4]) | set(prior["id"].to_pylist())
    assert len(banned) == 7 and not banned & set(table["id"].to_pylist())
    assert table.schema.names == ["pool_id", "id", "shard", "key", "score", "query_id", "query_label", "rank",
                                  "query_ids"]
    assert [str(t) for t in table.schema.types[:-1]] == ["int64", "string", "string", "string", "float", "string",
                                                         "int64", "int32"]
    assert table.schema.field("query_ids").type.value_type == pa.string()
    pool_ids = table["pool_id"].to_pylist()
    assert pool_ids == sorted(set(pool_ids)) and max(pool_ids) < 24
    assert all(keys[p] == k for p, k in zip(pool_ids, table["key"].to_pylist()))  # pool_id = listing position
    assert table["score"].is_null(nan_is_null=True).to_pylist() == [True] * 10
    assert table["rank"].to_pylist() == [-1] * 10 and table["query_ids"].to_pylist() == [[]] * 10
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["counts"]["unreadable_shards"] == 1 and meta["counts"]["pool"] == 24
    assert meta["sampling"]["kind"] == "random" and meta["sampling"]["seed"] == 0
    assert pq.read_table(tmp_path / "out" / "removed.parquet").num_rows == 0

    done = materialize(MaterializeConfig(manifest=str(tmp_path / "out"), out=str(tmp_path / "shards"), shard_size=4))
    assert (done["samples"], done["missing"], done["shards"]) == (10, 0, 3)
    for s in read_back(tmp_path / "shards"):
        info = json.loads(s["json"])
        assert info["id"] not in banned and s["jpg"] == originals[info["source"]["key"]]
        assert info["score"] is None and info["query_ids"] == []


def test_index_pool_like_a_manifest(tmp_path, pool):
    root, originals = pool
    keys = list(originals)
    shards = [str((root / n).resolve()) for n in ("pool-000000.tar", "pool-000001.tar.gz")]
    meta = pa.table({"id": keys, "split": ["pool"] * 24, "shard": [shards[i // 12] for i in range(24)],
                     "key": keys, "caption": [f"a photo of {k}" for k in keys]})
    vectors = np.random.default_rng(1).normal(size=(24, 8)).astype(np.float32)
    build_faiss_index(vectors, meta, tmp_path / "index", model="test", metric="ip", kind="flat")
    _, like = sample([f"{root}/{{pool-000000.tar,pool-000001.tar.gz}}"], tmp_path / "like", n=7, seed=3)
    summary, table = sample([tmp_path / "index"], tmp_path / "out", like=str(tmp_path / "like"),
                            exclude=[str(tmp_path / "like")])
    assert (summary["selected"], summary["available"], summary["excluded"]) == (7, 17, 7)
    assert table.num_rows == like.num_rows == 7
    assert table.schema.names[:5] == ["pool_id", "id", "shard", "key", "caption"]
    assert not set(table["id"].to_pylist()) & set(like["id"].to_pylist())
    assert table["id"].to_pylist() == [keys[p] for p in table["pool_id"].to_pylist()]
    assert table["caption"].to_pylist() == [f"a photo of {k}" for k in table["id"].to_pylist()]
    info = json.loads((tmp_path / "out" / "manifest.json").read_text())["sampling"]
    assert info["source_kind"] == "index" and info["like"] == str((tmp_path / "like").resolve())
    with pytest.raises(InputError, match="--pool-root"):  # an index without lineage (as if published): no roots
        materialize(MaterializeConfig(manifest=str(tmp_path / "out"), out=str(tmp_path / "shards")))
    done = materialize(MaterializeConfig(manifest=str(tmp_path / "out"), out=str(tmp_path / "shards"),
                                         pool_root=str(root)))
    assert (done["samples"], done["missing"]) == (7, 0)
    assert sorted(s["jpg"] for s in read_back(tmp_path / "shards")) == sorted(originals[k] for k in
                                                                              table["id"].to_pylist())


def test_kit_target_unlabelled(tmp_path, kit):
    """Target-unlabelled baseline on a real CIFAR-10 train shard: a draw that skips the labelled images."""
    shard = kit / "target" / "cifar10" / "cifar10-train-000000.tar.gz"
    first, _ = sample([shard], tmp_path / "probe", n=20, seed=1)
    labelled = embedding_set(tmp_path / "labelled", pq.read_table(tmp_path / "probe" / "manifest.parquet")["id"]
                             .to_pylist())
    summary, table = sample([shard], tmp_path / "out", n=20, seed=1, exclude=[str(labelled)])
    assert (summary["available"], summary["excluded"]) == (first["available"] - 20, 20) == (9980, 20)
    assert not set(table["id"].to_pylist()) & set(pq.read_table(labelled / "part-00000.parquet")["id"].to_pylist())
    assert set(table["shard"].to_pylist()) == {str(shard.resolve())}
    assert all(k.startswith("train_") for k in table["key"].to_pylist())


def test_seed_determinism(tmp_path, pool):
    root, _ = pool
    spec = [f"{root}/pool-000000.tar", f"{root}/pool-000001.tar.gz"]
    a = sample(spec, tmp_path / "a", n=8, seed=11)[1]
    b = sample(spec, tmp_path / "b", n=8, seed=11)[1]
    c = sample(spec, tmp_path / "c", n=8, seed=12)[1]
    assert a.drop_columns(["score"]).equals(b.drop_columns(["score"]))  # NaN != NaN
    assert a["pool_id"].to_pylist() != c["pool_id"].to_pylist()


def test_rerun_is_skipped_and_other_settings_refused(tmp_path, pool):
    root, _ = pool
    out = tmp_path / "out"
    first, _ = sample([root], out, n=5)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, _ = sample([root], out, n=5)
    assert again == first and stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match="new --out or delete"):
        sample([root], out, n=5, seed=1)


def test_errors(tmp_path, pool):
    root, _ = pool
    with pytest.raises(InputError, match="only 24 are available"):
        sample([root], tmp_path / "big", n=25)
    with pytest.raises(ConfigError, match="--n .* or --like"):
        sample([root], tmp_path / "none")
    with pytest.raises(InputError, match="nowhere"):
        sample([tmp_path / "nowhere"], tmp_path / "missing", n=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither an index directory nor WebDataset shards"):
        sample([tmp_path / "empty"], tmp_path / "x", n=1)
    with pytest.raises(InputError, match="--exclude takes"):
        sample([root], tmp_path / "y", n=1, exclude=[str(tmp_path / "empty")])
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").iterdir())


def test_cli(tmp_path, pool, capsys):
    root, _ = pool
    labelled = embedding_set(tmp_path / "labelled", ["pool_000000", "pool_000100"])
    out = tmp_path / "out"
    assert cli.main(["sample", str(root), "--n", "6", "--seed", "2", "--exclude", str(labelled),
                     "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "selected": 6, "available": 22, "excluded": 2}
    assert cli.main(["sample", str(root), "--out", str(tmp_path / "other")]) == 2
    assert "--like" in capsys.readouterr().err
