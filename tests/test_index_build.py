"""`rakt index build` from an embedding set, from pool images (tiny open_clip), and killed + resumed."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import image_array, kill_rakt_when, write_folder
from rakt.indexes.faiss_index import FaissIndex
from rakt.cli import main
from rakt.pipeline.formats import embedding_matrix, embedding_table, read_embedding_set



def pool_set(root: Path, n: int = 300, d: int = 16, model: str = "open_clip:test:random") -> tuple[Path, np.ndarray]:
    """A pool embedding set with a `path` locator column, in three partitions."""
    root.mkdir(parents=True)
    x = np.random.default_rng(0).normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for j, begin in enumerate(range(0, n, 100)):
        rows = range(begin, min(n, begin + 100))
        table = embedding_table([f"img{i:04d}" for i in rows], [None] * len(rows), ["pool"] * len(rows), x[begin:begin + 100],
                                {"path": [f"/pool/img{i:04d}.jpg" for i in rows]})
        pq.write_table(table, root / f"part-{j:05d}.parquet")
    (root / "embeddings.json").write_text(json.dumps({"model": model, "dim": d, "count": n, "normalized": True}))
    return root, x


def test_build_from_embedding_set(tmp_path, capsys):
    emb, x = pool_set(tmp_path / "emb")
    out = tmp_path / "index"
    assert main(["index", "build", str(emb), "--kind", "flat", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["kind"], summary["count"], summary["dim"], summary["skipped"]) == ("flat", 300, 16, False)
    assert summary["recall_at_10"] == 1.0
    info = json.loads((out / "index.json").read_text())
    assert info["model"] == "open_clip:test:random" and info["embeddings"] == str(emb.resolve())
    meta = pd.read_parquet(out / "metadata")
    assert meta.columns.tolist() == ["id", "split", "path"]  # all-null label dropped, no embedding column
    assert meta["id"].tolist() == [f"img{i:04d}" for i in range(300)]
    ids = FaissIndex.open(out).search(x[[5, 250]], 3)[1]
    assert ids[:, 0].tolist() == [5, 250]
    # same config + same embeddings: skipped; another setting: rebuilt
    assert main(["index", "build", str(emb), "--kind", "flat", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True
    assert main(["index", "build", str(emb), "--kind", "IVF4,Flat", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is False
    assert json.loads((out / "index.json").read_text())["factory"] == "IVF4,Flat"


def test_build_joins_extra_metadata(tmp_path, capsys):
    emb, _ = pool_set(tmp_path / "emb", n=200)
    extra = pa.table({"id": [f"img{i:04d}" for i in reversed(range(200))],
                      "caption": [f"a photo {i}" for i in reversed(range(200))]})
    pq.write_table(extra, tmp_path / "extra.parquet")
    assert main(["index", "build", str(emb), "--metadata", str(tmp_path / "extra.parquet"),
                 "--out", str(tmp_path / "index")]) == 0
    meta = FaissIndex.open(tmp_path / "index").metadata(np.array([7, 0, 199]))
    assert meta["caption"].to_pylist() == ["a photo 7", "a photo 0", "a photo 199"]
    assert main(["index", "build", str(emb), "--metadata", str(tmp_path / "extra.parquet"), "--kind", "IVF4,Flat",
                 "--on-disk", "--task-rows", "100", "--out", str(tmp_path / "on-disk")]) == 0  # joined in the add tasks
    meta = FaissIndex.open(tmp_path / "on-disk").metadata(np.array([7, 0, 199]))
    assert meta["caption"].to_pylist() == ["a photo 7", "a photo 0", "a photo 199"]
    pq.write_table(extra.slice(0, 150), tmp_path / "short.parquet")
    capsys.readouterr()
    assert main(["index", "build", str(emb), "--metadata", str(tmp_path / "short.parquet"),
                 "--out", str(tmp_path / "index2")]) == 2
    assert "50 of 200 pool ids have no metadata row" in capsys.readouterr().err


def _pool_folder(root: Path, per_class: int) -> Path:
    return write_folder(root, {c: [image_array(100 * k + i) for i in range(per_class)]
                               for k, c in enumerate(("cat", "dog"))})


def _enc(tiny_clip: str) -> list[str]:
    return ["--model", tiny_clip, "--pretrained", "", "--workers", "0", "--device", "cpu", "--batch-size", "8"]


def test_build_from_pool_images(tmp_path, tiny_clip, capsys):
    pool = _pool_folder(tmp_path / "pool", per_class=6)
    out = tmp_path / "index"
    assert main(["index", "build", str(pool), *_enc(tiny_clip), "--partition-size", "5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 12 and summary["dim"] == 32 and summary["kind"] == "flat"
    emb_meta = json.loads((out / "embeddings" / "embeddings.json").read_text())
    index = FaissIndex.open(out)
    assert index.model == emb_meta["model"] and index.size == 12
    assert len(list((out / "embeddings").glob("part-*.stats.json"))) == 3  # 12 images / partitions of 5
    meta = index.metadata(np.arange(12))
    assert "path" in meta.column_names and "embedding" not in meta.column_names
    assert all(Path(p).exists() for p in meta["path"].to_pylist())
    # the index holds the embedding set's vectors, row for row
    vec = embedding_matrix(read_embedding_set(out / "embeddings")[1])
    assert index.search(vec, 1)[1][:, 0].tolist() == list(range(12))


def _files(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("part-*.stats.json")}


def test_killed_build_resumes(tmp_path, tiny_clip):
    """SIGKILL `rakt index build` once the first partition is done; the rerun keeps it and matches a clean build."""
    pool = _pool_folder(tmp_path / "pool", per_class=60)  # 120 images, 30 partitions of 4
    args = ["index", "build", str(pool), *_enc(tiny_clip), "--partition-size", "4"]
    killed = tmp_path / "killed"
    done = lambda: (killed / "embeddings").exists() and any((killed / "embeddings").glob("part-*.stats.json"))  # noqa: E731
    assert kill_rakt_when([*args, "--out", killed], done) == -signal.SIGKILL
    done_before = _files(killed)
    assert 1 <= len(done_before) < 30 and not (killed / "index.json").exists()

    assert main([*args, "--out", str(killed)]) == 0
    done_after = _files(killed)
    assert len(done_after) == 30
    assert all(done_after[name] == mtime for name, mtime in done_before.items())  # not embedded again

    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    a, b = FaissIndex.open(killed), FaissIndex.open(clean)
    info_a, info_b = json.loads((killed / "index.json").read_text()), json.loads((clean / "index.json").read_text())
    assert info_a["count"] == info_b["count"] == 120 and info_a["factory"] == info_b["factory"]
    assert pd.read_parquet(killed / "metadata").equals(pd.read_parquet(clean / "metadata"))
    queries = b.embeddings(np.arange(0, 120, 7))
    sa, ia = a.search(queries, 5)
    sb, ib = b.search(queries, 5)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_rebuild_after_the_pool_changed_holds_every_image_once(tmp_path, tiny_clip, capsys):
    pool = _pool_folder(tmp_path / "pool", per_class=4)
    out = tmp_path / "index"
    flags = ["index", "build", str(pool), *_enc(tiny_clip), "--partition-size", "3", "--out", str(out)]
    assert main(flags) == 0
    (pool / "cat" / "0new.jpg").write_bytes((pool / "dog" / "dog_0000.jpg").read_bytes())  # sorts first in cat
    capsys.readouterr()
    assert main(flags) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 9
    ids = FaissIndex.open(out).metadata(np.arange(9))["id"].to_pylist()
    assert sorted(ids) == sorted(str(p.relative_to(pool)) for p in pool.rglob("*.jpg"))


def test_damaged_index_metadata_is_named(tmp_path, capsys):
    emb, _ = pool_set(tmp_path / "emb", n=50)
    out = tmp_path / "index"
    assert main(["index", "build", str(emb), "--kind", "flat", "--out", str(out)]) == 0
    meta = sorted((out / "metadata").glob("*.parquet"))[0]
    meta.write_bytes(meta.read_bytes()[:100])
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(meta) in err and "rebuild the index" in err
