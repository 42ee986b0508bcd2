"""The ray engine on a local Ray (2 CPUs): the same files and indexes as the local engine; failures retried
and reported; unknown or unavailable engines refused. Ray starts once for the module (~6 s) and each Ray
Data run starts its actors (~5-10 s on 2 shared cores), so the tests use as few runs as they can."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402  (part of the test extra: a missing Ray fails this module, it is not skipped)

import rakt.pipeline.index_parts as index_parts  # noqa: E402
from conftest import image_array, write_folder  # noqa: E402
from rakt.indexes.faiss_index import FaissIndex  # noqa: E402
from rakt.cli import main  # noqa: E402
from rakt.pipeline.config import ConfigError, EmbedConfig, from_dict  # noqa: E402
from rakt.pipeline.engines import EngineOptions, RayEngine, connect_ray, get_engine  # noqa: E402
from rakt.pipeline.formats import embedding_matrix, embedding_table, read_embedding_set  # noqa: E402
from rakt.pipeline.io import InputError


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module; workers unpickle this module's builders by value (tests/ is not on
    their path)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    connect_ray("", num_cpus=2)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def tiny(model: str) -> list[str]:
    return ["--model", model, "--pretrained", "", "--workers", "0", "--device", "cpu", "--batch-size", "4"]


def part_tables(out: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))}


def stats(out: Path) -> dict:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            for p in sorted(out.glob("part-*.stats.json"))}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip) -> dict:
    """`rakt embed` of the same folder (3 partitions) with each engine: {engine: out dir, "flags": [...]}."""
    root = tmp_path_factory.mktemp("embed")
    folder = write_folder(root / "imgs", {c: [image_array(10 * k + i, size=40) for i in range(4)]
                                          for k, c in enumerate(("ant", "bee", "cat"))})
    (folder / "bee" / "corrupt.jpg").write_bytes(b"not a jpeg")
    flags = [str(folder), *tiny(tiny_clip), "--partition-size", "5"]
    result = {"flags": flags}
    for engine in ("local", "ray"):
        result[engine] = root / engine
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert main(["embed", *flags, "--engine", engine, "--out", str(result[engine])]) == 0
        summary = json.loads(stdout.getvalue())
        assert (summary["count"], summary["partitions"], summary["skipped"]) == (12, 3, {"undecodable_image": 1})
    return result


def test_embed_ray_writes_what_local_writes(embedded, capsys):
    local, on_ray = part_tables(embedded["local"]), part_tables(embedded["ray"])
    assert list(local) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert on_ray.keys() == local.keys() and all(on_ray[name].equals(table) for name, table in local.items())
    assert stats(embedded["ray"]) == stats(embedded["local"])
    meta = {e: json.loads((embedded[e] / "embeddings.json").read_text()) for e in ("local", "ray")}
    same = ("model", "dim", "count", "skipped", "classes", "partitions", "sources", "normalized")
    assert all(meta["ray"][k] == meta["local"][k] for k in same)
    assert not list(embedded["ray"].glob(".part-*"))  # no temp files left by the actors

    # resume: every partition is done, so a rerun on Ray embeds nothing and changes no file
    before = {p.name: p.stat().st_mtime_ns for p in embedded["ray"].glob("part-*")}
    assert main(["embed", *embedded["flags"], "--engine", "ray", "--out", str(embedded["ray"])]) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in embedded["ray"].glob("part-*")} == before


def test_flat_index_added_in_parts_on_ray_equals_local(embedded, tmp_path, capsys):
    outs = {engine: tmp_path / engine for engine in ("local", "ray")}
    for engine, out in outs.items():
        assert main(["index", "build", str(embedded[engine]), "--kind", "flat", "--engine", engine,
                     "--task-rows", "5", "--out", str(out)]) == 0  # one add task per embedding partition
        assert json.loads(capsys.readouterr().out)["count"] == 12
    info = json.loads((outs["ray"] / "index.json").read_text())
    assert info["add"] == "in parts, merged" and info["factory"] == "Flat"
    assert not (outs["ray"] / index_parts.ADD_PARTS_SUBDIR).exists()
    a, b = FaissIndex.open(outs["ray"]), FaissIndex.open(outs["local"])
    queries = embedding_matrix(read_embedding_set(embedded["local"])[1])
    (sa, ia), (sb, ib) = a.search(queries, 5), b.search(queries, 5)
    assert np.array_equal(ia, ib) and np.array_equal(sa, sb) and ia[:, 0].tolist() == list(range(12))
    assert pd.read_parquet(outs["ray"] / "metadata").equals(pd.read_parquet(outs["local"] / "metadata"))


def test_index_build_embeds_the_pool_with_its_engine(tmp_path, monkeypatch, capsys):
    """Pool images go through `rakt embed` with the index build's engine and Ray address (no Ray run here)."""
    import rakt.pipeline.embed

    seen = []

    def stop(cfg: EmbedConfig) -> dict:
        seen.append(cfg)
        raise InputError("stopped after the embed config")

    monkeypatch.setattr(rakt.pipeline.embed, "run", stop)
    pool = write_folder(tmp_path / "pool", {"cat": [image_array(1)]})
    assert main(["index", "build", str(pool), "--engine", "ray", "--ray-address", "auto", "--workers", "3",
                 "--out", str(tmp_path / "index")]) == 2
    assert "stopped after the embed config" in capsys.readouterr().err
    assert (seen[0].engine, seen[0].ray_address, seen[0].workers) == ("ray", "auto", 3)


def _embedding_set(root: Path, n: int, d: int, per_part: int) -> np.ndarray:
    """A pool embedding set of clustered unit vectors in n / per_part partitions."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, d))[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    root.mkdir(parents=True)
    for j, begin in enumerate(range(0, n, per_part)):
        ids = [f"img{i:05d}" for i in range(begin, min(n, begin + per_part))]
        table = embedding_table(ids, [None] * len(ids), ["pool"] * len(ids), x[begin:begin + len(ids)],
                                {"url": [f"http://pool.example/{i}.jpg" for i in ids]})
        pq.write_table(table, root / f"part-{j:05d}.parquet")
    (root / "embeddings.json").write_text(json.dumps({"model": "open_clip:test:random", "dim": d, "count": n}))
    return x


def test_ivfpq_built_in_parts_on_ray_equals_local(tmp_path, capsys):
    x = _embedding_set(tmp_path / "emb", n=4000, d=32, per_part=1000)
    outs = {engine: tmp_path / engine for engine in ("local", "ray")}
    for engine, out in outs.items():
        assert main(["index", "build", str(tmp_path / "emb"), "--kind", "IVF32,PQ8", "--nprobe", "4",
                     "--engine", engine, "--task-rows", "1000", "--out", str(out)]) == 0  # 4 add tasks
        assert json.loads(capsys.readouterr().out)["factory"] == "IVF32,PQ8"
    a, b = FaissIndex.open(outs["ray"]), FaissIndex.open(outs["local"])
    (sa, ia), (sb, ib) = a.search(x[::40], 10), b.search(x[::40], 10)
    assert np.array_equal(ia, ib) and np.array_equal(sa, sb) and (ia >= 0).all()
    # merged lists hold the same codes and ids in the same order: the two index files are one index
    files = [faiss.read_index(str(out / "index-000.faiss")) for out in outs.values()]
    assert np.array_equal(faiss.serialize_index(files[0]), faiss.serialize_index(files[1]))
    assert pd.read_parquet(outs["ray"] / "metadata").equals(pd.read_parquet(outs["local"] / "metadata"))
    info = {e: json.loads((out / "index.json").read_text()) for e, out in outs.items()}
    assert info["ray"]["recall_at_10"] == info["local"]["recall_at_10"] and info["ray"]["count"] == 4000

    # an index kind whose parts cannot be merged is refused before any add task runs
    assert main(["index", "build", str(tmp_path / "emb"), "--kind", "HNSW8", "--engine", "ray",
                 "--out", str(tmp_path / "hnsw")]) == 2
    assert "'HNSW8' indexes cannot be built in parts" in capsys.readouterr().err


@dataclass
class FlakyBuilder:
    """Records each build (one per actor) and each attempt in `log_dir`; task 'bad' always fails."""
    log_dir: str

    def __call__(self):
        Path(self.log_dir, f"build-{os.getpid()}-{os.urandom(4).hex()}").touch()

        def work(task: str) -> None:
            Path(self.log_dir, f"try-{task}-{os.urandom(4).hex()}").touch()
            if task == "bad":
                raise RuntimeError(f"boom in {task}")
        return work


@dataclass
class BrokenBuilder:
    def __call__(self):
        raise InputError("no weights for this model here")


def test_failing_task_is_retried_then_returned(tmp_path, caplog):
    failed = RayEngine(EngineOptions(num_workers=1)).run(["a", "bad", "c"], FlakyBuilder(str(tmp_path)),
                                                         max_retries=1)
    assert failed == ["bad"]
    tries = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("try-*"))
    assert tries == ["try-a", "try-bad", "try-bad", "try-c"]  # retried once, the others ran once
    assert len(list(tmp_path.glob("build-*"))) == 2  # once per actor (one per round here), not once per task
    messages = [r.getMessage() for r in caplog.records]
    assert "task bad failed (attempt 1 of 2): RuntimeError: boom in bad" in messages
    assert "task bad failed (attempt 2 of 2): RuntimeError: boom in bad" in messages
    # a worker that cannot be built stops the stage with its own error, as in the local engine
    with pytest.raises(InputError, match="no weights for this model here"):
        get_engine("ray", EngineOptions(num_workers=1)).run(["a"], BrokenBuilder(), max_retries=1)


def test_unknown_or_unavailable_engine_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="unknown engine 'spark'; choose one of: local, ray"):
        get_engine("spark")
    with pytest.raises(ConfigError, match="'engine' must be one of local, ray, got 'spark'"):
        from_dict(EmbedConfig, {"engine": "spark", "source": ["x"], "out": str(tmp_path)})
    with pytest.raises(SystemExit):
        main(["index", "build", str(tmp_path), "--engine", "spark", "--out", str(tmp_path / "i")])
    assert "invalid choice: 'spark'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'rakt\[ray\]'"):
        get_engine("ray")
    assert main(["embed", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "emb")]) == 2
    assert "pip install 'rakt[ray]'" in capsys.readouterr().err and not (tmp_path / "emb").exists()
