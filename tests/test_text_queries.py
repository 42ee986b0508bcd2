"""Text->image queries: the open_clip text tower on the tiny config, prompts, text/both retrieval, curation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rakt.indexes.faiss_index import build_faiss_index
from rakt.cli import main
from rakt.pipeline.config import CurateConfig, EncoderConfig, RetrieveConfig
from rakt.pipeline.curate.curate import plan_quotas
from rakt.pipeline.curate.curate import run as curate
from rakt.pipeline.encoders import encoder_model_id, load_image_encoder, load_text_encoder
from rakt.pipeline.formats import embedding_table, read_classes
from rakt.pipeline.io import InputError
from rakt.pipeline.prompts import DEFAULT_TEMPLATES, load_templates, prompt, text_queries
from rakt.pipeline.retrieve import run as retrieve

CLASSES = ["cat", "dog", "maple_tree"]
GROUP = 12  # planted pool images per class
NOISE = 0.03


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return load_text_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip, encoder):
    """A flat index whose pool holds, per class, GROUP vectors planted near its text query, plus random vectors;
    a classes file; an image embedding set (queries near the class vectors; class 0 has two) of the tiny model."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    _, _, class_vecs = text_queries(encoder, CLASSES, list(DEFAULT_TEMPLATES), "class")
    planted = [unit(v + NOISE * unit(rng.normal(size=(GROUP, v.size)))) for v in class_vecs]
    pool = np.concatenate(planted + [unit(rng.normal(size=(200, class_vecs.shape[1])))])
    n = len(pool)
    meta = pa.table({"id": [f"p{i:03d}" for i in range(n)], "path": [f"/pool/{i}.jpg" for i in range(n)]})
    build_faiss_index(pool, meta, root / "index", model=encoder.model_id, kind="flat")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    labels = [0, 0, 1, 2]
    vecs = unit(class_vecs[labels] + NOISE * unit(rng.normal(size=(len(labels), class_vecs.shape[1]))))
    target = root / "target"
    target.mkdir()
    pq.write_table(embedding_table([f"img{i}" for i in range(len(labels))], labels, ["train"] * len(labels), vecs),
                   target / "part-00000.parquet")
    (target / "embeddings.json").write_text(json.dumps({
        "model": encoder.model_id, "model_name": tiny_clip, "pretrained": "", "dim": int(vecs.shape[1]),
        "count": len(labels), "normalized": True, "classes": CLASSES}))
    groups = {c: set(range(ci * GROUP, (ci + 1) * GROUP)) for ci, c in enumerate(CLASSES)}
    return {"root": root, "index": f"faiss:{root / 'index'}", "target": target, "groups": groups,
            "classes": root / "classes.txt", "class_vecs": class_vecs}


# --- encoder ----------------------------------------------------------------------------------------

def test_text_encoder_normalized_deterministic_same_space(tiny_clip, encoder):
    cfg = EncoderConfig(model=tiny_clip, pretrained="", device="cpu")
    texts = ["a photo of a cat.", "a photo of a dog.", "an image of a maple tree.", "x", "a blurry photo of a cat."]
    out = encoder.encode(texts)
    assert out.shape == (5, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(out[0], out[1])  # different prompts, different vectors
    torch.testing.assert_close(encoder.encode(texts), out)
    again = load_text_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu", batch_size=2))
    torch.testing.assert_close(again.encode(texts), out, atol=1e-5, rtol=1e-5)  # seeded init, batches of 2
    assert encoder.encode([]).shape == (0, 32)
    image = load_image_encoder(cfg)
    assert encoder.model_id == image.model_id == encoder_model_id(cfg) == "open_clip:rakt-tiny-clip:random"
    shared = load_text_encoder(cfg, image_encoder=image)
    assert shared.model is image.model  # one model for both towers, not a second copy
    torch.testing.assert_close(shared.encode(texts), out, atol=1e-5, rtol=1e-5)


def test_timm_model_has_no_text_tower(world):
    with pytest.raises(InputError, match="text queries need an open_clip model with a text tower"):
        load_text_encoder(EncoderConfig(model="timm:resnet18", pretrained="", device="cpu"))
    with pytest.raises(InputError, match="text tower"):
        retrieve(RetrieveConfig(index=world["index"], out="unused", query_mode="text",
                                classes=str(world["classes"]), model="timm:resnet18", force=True))


# --- classes and templates --------------------------------------------------------------------------

def test_templates_and_classes(tmp_path, kit):
    default = load_templates("default")
    assert 8 <= len(default) <= 16 and all("{}" in t for t in default)
    good = tmp_path / "good.txt"
    good.write_text("# comment\na photo of a {}.\n\n  a sketch of a {}  \n")
    assert load_templates(str(good)) == ["a photo of a {}.", "a sketch of a {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of a cat\n")
    with pytest.raises(InputError, match=r"line 2: 'a photo of a cat' has no '\{\}'"):
        load_templates(str(bad))
    with pytest.raises(InputError, match="neither 'default' nor a file"):
        load_templates(str(tmp_path / "missing.txt"))
    assert prompt("a photo of a {}.", "maple_tree") == "a photo of a maple tree."

    assert read_classes(kit / "target" / "cifar10" / "classes.txt")[:3] == ["airplane", "automobile", "bird"]
    (tmp_path / "c.txt").write_text("cat\n\n dog \n")
    assert read_classes(tmp_path / "c.txt") == ["cat", "dog"]
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(InputError, match=r"dup.txt: class 'cat' appears twice \(lines 1 and 3\)"):
        read_classes(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="empty"):
        read_classes(tmp_path / "empty.txt")


def test_class_query_is_normalized_mean_of_prompts(encoder):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    ids, labels, vecs = text_queries(encoder, CLASSES, templates, "class")
    assert ids == ["text:cat", "text:dog", "text:maple_tree"] and labels == [0, 1, 2]
    for ci, name in enumerate(CLASSES):
        mean = encoder.encode([prompt(t, name) for t in templates]).numpy().mean(axis=0)
        np.testing.assert_allclose(vecs[ci], mean / np.linalg.norm(mean), atol=1e-5)
    pids, plabels, pvecs = text_queries(encoder, CLASSES, templates, "prompt")
    assert pids[:4] == ["text:cat:0", "text:cat:1", "text:cat:2", "text:dog:0"]
    assert plabels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(pvecs[4], encoder.encode(["a drawing of the dog."]).numpy()[0], atol=1e-5)


# --- retrieval --------------------------------------------------------------------------------------

def test_duplicate_class_name_is_refused_via_cli(world, tiny_clip, tmp_path, capsys):
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\nmaple_tree\ndog\n")  # text:dog twice: two queries, one id
    assert main(["retrieve", "--index", world["index"], "--query-mode", "text", "--classes", str(dup),
                 "--model", tiny_clip, "--pretrained", "", "--out", str(tmp_path / "cand")]) == 2
    assert f"classes file {dup}: class 'dog' appears twice (lines 2 and 4)" in capsys.readouterr().err
    assert not (tmp_path / "cand" / "candidates.parquet").exists()


def test_text_mode_retrieves_planted_groups_via_cli(world, tiny_clip, tmp_path):
    out = tmp_path / "cand"
    assert main(["retrieve", "--index", world["index"], "--query-mode", "text", "--classes", str(world["classes"]),
                 "--model", tiny_clip, "--pretrained", "", "--k", str(GROUP), "--out", str(out)]) == 0
    df = pq.read_table(out / "candidates.parquet").to_pandas()
    assert sorted(df["query_id"].unique()) == ["text:cat", "text:dog", "text:maple_tree"]
    for ci, name in enumerate(CLASSES):
        rows = df[df["query_id"] == f"text:{name}"]
        assert set(rows["pool_id"]) == world["groups"][name]
        assert (rows["query_label"] == ci).all()
    info = json.loads((out / "candidates.json").read_text())
    assert (info["query_mode"], info["classes"], info["templates"]) == ("text", CLASSES, list(DEFAULT_TEMPLATES))
    assert (info["n_image_queries"], info["n_text_queries"], info["n_queries"]) == (0, 3, 3)
    assert info["embeddings"] is None and info["text_model"] == info["index_model"]


def test_prompt_mode_one_query_per_class_and_template(world, tmp_path, tiny_clip):
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na photo of the {}.\n")
    retrieve(RetrieveConfig(index=world["index"], out=str(tmp_path / "c"), query_mode="text", text_queries="prompt",
                            templates=str(templates), classes=str(world["classes"]), model=tiny_clip, k=3))
    df = pq.read_table(tmp_path / "c" / "candidates.parquet").to_pandas()
    assert sorted(df["query_id"].unique()) == sorted(f"text:{c}:{t}" for c in CLASSES for t in (0, 1))
    assert df.groupby("query_id")["query_label"].first().to_dict()["text:maple_tree:1"] == 2
    assert json.loads((tmp_path / "c" / "candidates.json").read_text())["n_text_queries"] == 6


def test_both_mode_mixes_image_and_text_queries(world, tmp_path):
    out = tmp_path / "both"
    # model, pretrained and classes come from the embedding set's embeddings.json
    retrieve(RetrieveConfig(embeddings=str(world["target"]), index=world["index"], out=str(out), query_mode="both",
                            k=20))
    df = pq.read_table(out / "candidates.parquet").to_pandas()
    assert set(df["query_id"]) == {"img0", "img1", "img2", "img3", "text:cat", "text:dog", "text:maple_tree"}
    labels = df.groupby("query_id")["query_label"].first().to_dict()
    assert labels == {"img0": 0, "img1": 0, "img2": 1, "img3": 2, "text:cat": 0, "text:dog": 1, "text:maple_tree": 2}
    for qid, name in (("img2", "dog"), ("text:dog", "dog"), ("img3", "maple_tree")):
        assert set(df[(df["query_id"] == qid) & (df["rank"] < GROUP)]["pool_id"]) == world["groups"][name]
    info = json.loads((out / "candidates.json").read_text())
    assert info["query_mode"] == "both"
    assert (info["n_image_queries"], info["n_text_queries"], info["n_queries"]) == (4, 3, 7)
    assert info["classes"] == CLASSES and info["embeddings"] == str(world["target"].resolve())


def test_class_list_must_match_image_labels(world, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("dog\ncat\nmaple_tree\n")
    with pytest.raises(InputError, match="differs from the classes the image queries' labels index"):
        retrieve(RetrieveConfig(embeddings=str(world["target"]), index=world["index"], out=str(tmp_path / "x"),
                                query_mode="both", classes=str(other)))
    with pytest.raises(InputError, match="--classes"):
        retrieve(RetrieveConfig(index=world["index"], out=str(tmp_path / "y"), query_mode="text", model="ViT-B-32"))


def test_model_mismatch_refused_unless_forced(world, tmp_path, tiny_clip):
    rng = np.random.default_rng(1)
    build_faiss_index(unit(rng.normal(size=(50, 32))), pa.table({"id": [f"o{i}" for i in range(50)]}),
                      tmp_path / "other", model="open_clip:ViT-B-32:laion2b_s34b_b79k", kind="flat")
    cfg = RetrieveConfig(index=f"faiss:{tmp_path / 'other'}", out=str(tmp_path / "c"), query_mode="text",
                         classes=str(world["classes"]), model=tiny_clip, k=5)
    with pytest.raises(InputError, match="text queries would be encoded with model 'open_clip:rakt-tiny-clip:random'"
                                         ".*--force to query anyway"):
        retrieve(cfg)
    cfg.force = True
    assert retrieve(cfg)["n_queries"] == 3
    info = json.loads((tmp_path / "c" / "candidates.json").read_text())
    assert info["text_model"] == "open_clip:rakt-tiny-clip:random" != info["index_model"]


# --- curation ---------------------------------------------------------------------------------------

def test_budget_rule_counts_only_image_queries():
    queries = pd.DataFrame({"query_id": ["a", "b", "text:x", "text:y"],
                            "query_label": pd.array([0, 1, 0, 1], "Int64")})
    text_only = queries[queries["query_id"].str.startswith("text:")]
    quotas, k, _ = plan_quotas(text_only, CurateConfig(out="o", budget=20), 0)
    assert k == 10 and quotas.sum() == 20  # text only: k = N // Nq
    quotas, k, _ = plan_quotas(queries, CurateConfig(out="o", budget=22), 2)
    assert k == 5 and quotas.sum() == 20  # both: (N - n_image) // Nq
    quotas, k, _ = plan_quotas(queries.iloc[:2], CurateConfig(out="o", budget=20))
    assert k == 9  # images only: the paper's N // Nq - 1
    with pytest.raises(InputError, match="minimum budget is 6"):
        plan_quotas(queries, CurateConfig(out="o", budget=5), 2)


def test_curate_balances_classes_over_text_and_mixed_queries(world, tmp_path, tiny_clip):
    text = tmp_path / "text"
    retrieve(RetrieveConfig(index=world["index"], out=str(text), query_mode="text", classes=str(world["classes"]),
                            model=tiny_clip, k=20))
    res = curate(CurateConfig(candidates=str(text), out=str(tmp_path / "m1"), budget=30, balance="class"))
    meta = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    assert res["per_query_k"] == 10  # text queries are not images: k = N // Nq
    assert meta["quota"]["per_class"] == meta["counts"]["per_class"] == {"0": 10, "1": 10, "2": 10}
    manifest = pq.read_table(tmp_path / "m1" / "manifest.parquet").to_pandas()
    for ci, name in enumerate(CLASSES):
        assert set(manifest[manifest["query_label"] == ci]["pool_id"]) <= world["groups"][name]

    both = tmp_path / "both"
    retrieve(RetrieveConfig(embeddings=str(world["target"]), index=world["index"], out=str(both), query_mode="both",
                            k=20))
    # 4 image queries (two of class 0) + 3 text queries; budget 34 -> pool share 30 -> 10 per class
    curate(CurateConfig(candidates=str(both), out=str(tmp_path / "m2"), budget=34, balance="class"))
    meta = json.loads((tmp_path / "m2" / "manifest.json").read_text())
    assert meta["quota"]["per_class"] == meta["counts"]["per_class"] == {"0": 10, "1": 10, "2": 10}
    counts = meta["counts"]
    assert (counts["image_queries"], counts["text_queries"], counts["empty_slots"]) == (4, 3, 0)
