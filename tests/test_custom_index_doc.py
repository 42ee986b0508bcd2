"""docs/custom-index.md is executed: its Python blocks run for real, then retrieve runs against its index."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rakt.indexes.registry import list_index_schemes, open_index
from rakt.cli import main
from rakt.pipeline.formats import embedding_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-index.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_doc_python_blocks_run_and_retrieve_uses_the_index(tmp_path, monkeypatch):
    code = blocks("python")
    assert len(code) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "custom_index_doc"}
    for block in code:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert "npy" in list_index_schemes()
    root = namespace["root"]
    index = open_index(f"npy:{root}")
    assert type(index).__name__ == "NpyIndex" and index.size == 1000 and index.dim == 64

    # retrieve against the doc's index with a target set made here, checked against brute force
    vectors = np.load(root / "vectors.npy")
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(6, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    target = tmp_path / "target"
    target.mkdir()
    pq.write_table(embedding_table([f"q{i}" for i in range(6)], [None] * 6, ["train"] * 6, queries),
                   target / "part-00000.parquet")
    (target / "embeddings.json").write_text(f'{{"model": "{index.model}", "dim": 64, "count": 6}}')
    assert main(["retrieve", str(target), "--index", f"npy:{root}", "--k", "4", "--out", str(tmp_path / "c")]) == 0
    cands = pq.read_table(tmp_path / "c" / "candidates.parquet").to_pandas()
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :4]
    for q in range(6):
        got = cands[cands["query_id"] == f"q{q}"].sort_values("rank")["pool_id"].tolist()
        assert got == expected[q].tolist()


def test_doc_pyproject_snippet_declares_the_entry_point():
    (toml,) = blocks("toml")
    project = tomllib.loads(toml)["project"]
    assert project["entry-points"]["rakt.indexes"] == {"npy": "rakt_npy_index:open_npy"}
