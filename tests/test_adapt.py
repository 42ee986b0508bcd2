"""`rakt adapt`: linear probe, zero-shot head, reprogramming (real kit teacher), checkpoints, the CLI."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rakt.distill.teacher.adapt import run
from rakt.distill.teacher.checkpoint import load_teacher, read_teacher_meta, save_teacher
from rakt.distill.teacher.inputs import load_images
from rakt.distill.teacher.fit import fit_images
from rakt.distill.teacher.modes import build_teacher
from rakt.cli import main
from rakt.distill.config import AdaptConfig
from rakt.pipeline.config import ConfigError, EncoderConfig
from rakt.pipeline.encoders import encoder_model_id, load_text_encoder
from rakt.pipeline.formats import embedding_table
from rakt.pipeline.io import InputError, write_json, write_parquet

TEACHER = "teachers/tf_efficientnet_lite0.in1k.safetensors"
CLASSES = ["ant", "bee", "cat"]


def kit_teacher(kit: Path, size: int = 64) -> dict:
    return {"model": "timm:tf_efficientnet_lite0", "pretrained": str(kit / TEACHER), "image_size": size,
            "device": "cpu"}


def write_embedding_set(out: Path, model: str, vectors: np.ndarray, labels: list[int], split: str,
                        classes: list[str]) -> Path:
    """An embedding set (the `rakt embed` contract) holding the given vectors."""
    out.mkdir(parents=True)
    ids = [f"{split}-{i:04d}" for i in range(len(labels))]
    write_parquet(out / "part-00000.parquet", embedding_table(ids, labels, [split] * len(labels), vectors))
    write_json(out / "embeddings.json", {"model": model, "dim": vectors.shape[1], "normalized": True,
                                         "count": len(labels), "classes": classes})
    return out


def clustered(n_per_class: int, dim: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Unit vectors around one random center per class (the centers do not depend on `seed`)."""
    centers = np.random.default_rng(0).normal(size=(len(CLASSES), dim))
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(CLASSES)) for _ in range(n_per_class)]
    x = centers[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def kit_slice(kit, tmp_path_factory) -> dict[str, Path]:
    """Real CIFAR-10 shards cut small: the first 300 train and 100 test samples (with classes.txt beside)."""
    root = tmp_path_factory.mktemp("kit_slice")
    shutil.copy(kit / "target/cifar10/classes.txt", root / "classes.txt")
    out = {}
    for split, n in (("train", 300), ("test", 100)):
        dst = root / f"{split}.tar"
        keys: list[str] = []
        with tarfile.open(kit / f"target/cifar10/cifar10-{split}-000000.tar.gz") as src, tarfile.open(dst, "w") as w:
            for member in src:
                key = member.name.rsplit(".", 1)[0]
                if key not in keys:
                    if len(keys) == n:
                        break
                    keys.append(key)
                w.addfile(member, src.extractfile(member))
        out[split] = dst
    return out


@pytest.fixture(scope="module")
def tiny_sets(tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """Train and test embedding sets of clustered vectors in the tiny open_clip model's space."""
    root = tmp_path_factory.mktemp("tiny_sets")
    model = encoder_model_id(EncoderConfig(model=tiny_clip, pretrained=""))
    x_tr, y_tr = clustered(20, 32, seed=1)
    x_te, y_te = clustered(30, 32, seed=2)
    return {"train": write_embedding_set(root / "train", model, x_tr, y_tr, "train", CLASSES),
            "test": write_embedding_set(root / "test", model, x_te, y_te, "test", CLASSES),
            "other": write_embedding_set(root / "other", "open_clip:ViT-B-32:openai", x_tr, y_tr, "train", CLASSES)}


def test_linear_probe_separates_clusters_and_round_trips(tiny_clip, tiny_sets, tmp_path):
    out = tmp_path / "teacher.pt"
    cfg = AdaptConfig(model=tiny_clip, pretrained="", device="cpu", mode="linear", embeddings=str(tiny_sets["train"]),
                      eval=[str(tiny_sets["test"])], out=str(out))
    summary = run(cfg)
    assert summary["accuracy"] >= 0.98 and summary["eval_count"] == 90 and summary["train_count"] == 60
    assert set(summary["per_class_accuracy"]) == set(CLASSES)
    assert summary["fit"]["holdout_rows"] == 12 and summary["fit"]["weight_decay"] > 0
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["accuracy"] == summary["accuracy"] and report["mode"] == "linear" and len(report["config_hash"]) == 16

    teacher = load_teacher(out, device="cpu", classes=CLASSES)
    assert teacher.mode == "linear" and not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(4, 3, 45, 37)
    assert teacher(images).shape == (4, 3) and teacher.features(images).shape == (4, 32)
    assert torch.allclose(teacher.features(images).norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(InputError, match="adapted to 3 classes"):
        load_teacher(out, device="cpu", classes=["ant", "bee"])


def test_linear_refuses_embeddings_of_another_model(tiny_clip, tiny_sets, tmp_path):
    cfg = AdaptConfig(model=tiny_clip, pretrained="", device="cpu", mode="linear", embeddings=str(tiny_sets["other"]),
                      out=str(tmp_path / "t.pt"))
    with pytest.raises(InputError, match="was made with model 'open_clip:ViT-B-32:openai'"):
        run(cfg)
    assert not (tmp_path / "t.pt").exists()


def test_zeroshot_head_is_normalized_mean_of_templates(tiny_clip, tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "zs.pt"
    summary = run(AdaptConfig(model=tiny_clip, pretrained="", device="cpu", mode="zeroshot",
                              classes=str(tmp_path / "classes.txt"), templates=str(tmp_path / "templates.txt"),
                              out=str(out)))
    assert summary["classes"] == 3 and "accuracy" not in summary
    teacher = load_teacher(out, device="cpu")
    text = load_text_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"))
    per_prompt = text.encode([t.format(c) for c in CLASSES for t in templates]).view(3, 2, -1)
    expected = torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)
    assert torch.allclose(teacher.head.weight, expected, atol=1e-5) and teacher.head.bias is None
    images = torch.rand(5, 3, 32, 32)
    logits = teacher(images)
    assert logits.shape == (5, 3)
    assert torch.allclose(logits, 100 * teacher.features(images) @ expected.T, atol=1e-3)


def test_zeroshot_with_timm_teacher_is_refused(kit, tmp_path):
    with pytest.raises(InputError, match="text tower"):
        run(AdaptConfig(**kit_teacher(kit), mode="zeroshot", out=str(tmp_path / "t.pt")))


def test_reprogram_trains_only_prompt_and_mapping(kit, kit_slice, tmp_path):
    cfg = EncoderConfig(**kit_teacher(kit))
    data = load_images([str(kit_slice["train"])], per_class=5, seed=0)
    assert len(data.y) == 50 and data.x.shape[1:] == (3, 32, 32)
    teacher = build_teacher(cfg, 10, "reprogram", logit_scale=10.0, prompt_size=8)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "prompt.prompt"}
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}  # BN running stats included
    prompt_before = teacher.prompt.prompt.detach().clone()
    torch.manual_seed(0)
    losses = fit_images(teacher, data.x, data.y, epochs=3, lr=0.01, weight_decay=0.0, batch_size=16, seed=0)
    assert losses[-1] < losses[0] * 0.8
    after = teacher.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(prompt_before, teacher.prompt.prompt)
    assert not teacher.training and not teacher.backbone.training

    out = tmp_path / "rp.pt"
    save_teacher(out, teacher, {"encoder": {"model": cfg.model, "pretrained": cfg.pretrained, "image_size": 64},
                                "model_id": teacher.model_id, "mode": "reprogram", "prompt_size": 8,
                                "classes": [str(i) for i in range(10)]})
    state = torch.load(out, weights_only=True)["state"]
    assert not any(k.startswith("backbone.") for k in state)
    loaded = load_teacher(out, device="cpu")
    images = data.x[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(teacher(images), loaded(images))
    assert read_teacher_meta(out)["mode"] == "reprogram"


def test_load_refuses_missing_backbone_checkpoint(kit, tmp_path):
    weights = tmp_path / "lite0.safetensors"
    shutil.copy(kit / TEACHER, weights)
    cfg = EncoderConfig(**{**kit_teacher(kit), "pretrained": str(weights)})
    teacher = build_teacher(cfg, 2, "linear")
    save_teacher(tmp_path / "t.pt", teacher, {"encoder": {"model": cfg.model, "pretrained": str(weights),
                                                          "image_size": 64}, "mode": "linear", "classes": ["a", "b"]})
    weights.unlink()
    with pytest.raises(InputError, match="no longer exists"):
        load_teacher(tmp_path / "t.pt", device="cpu")


def test_cli_linear_probe_of_real_teacher(kit, kit_slice, tmp_path, capsys):
    flags = ["--model", "timm:tf_efficientnet_lite0", "--pretrained", str(kit / TEACHER), "--image-size", "64",
             "--device", "cpu", "--workers", "0"]
    assert main(["embed", str(kit_slice["train"]), "--per-class", "10", "--out", str(tmp_path / "tr"), *flags]) == 0
    assert main(["embed", str(kit_slice["test"]), "--out", str(tmp_path / "te"), *flags]) == 0
    capsys.readouterr()
    out = tmp_path / "teacher.pt"
    assert main(["adapt", "--mode", "linear", "--embeddings", str(tmp_path / "tr"), "--eval", str(tmp_path / "te"),
                 "--out", str(out), *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_count"] == 100 and summary["eval_count"] == 100
    assert summary["accuracy"] > 0.3, summary  # chance is 0.1
    assert len(summary["per_class_accuracy"]) == 10
    assert json.loads(Path(f"{out}.json").read_text())["accuracy"] == summary["accuracy"]
    # the config validation path: reprogram without training images
    assert main(["adapt", "--mode", "reprogram", "--out", str(tmp_path / "x.pt"), *flags]) == 2


def test_config_refusals(tiny_clip, tiny_sets, tmp_path):
    with pytest.raises(ConfigError, match="--embeddings"):
        run(AdaptConfig(model=tiny_clip, pretrained="", mode="linear", out=str(tmp_path / "t.pt")))
    with pytest.raises(ConfigError, match="embedding set"):
        run(AdaptConfig(model=tiny_clip, pretrained="", mode="reprogram", train=[str(tmp_path)],
                        eval=[str(tiny_sets["test"])], out=str(tmp_path / "t.pt")))


def test_finetune_updates_backbone_and_round_trips(tiny_clip, make_folder, make_images, tmp_path):
    root = make_folder(tmp_path / "imgs", {c: [make_images(10 * k + i, size=36) for i in range(4)]
                                           for k, c in enumerate(CLASSES)})
    out = tmp_path / "ft.pt"
    summary = run(AdaptConfig(model=tiny_clip, pretrained="", device="cpu", mode="finetune", train=[str(root)],
                              epochs=2, batch_size=4, lr=0.01, backbone_lr=0.1, eval=[str(root)], out=str(out)))
    assert summary["train_count"] == 12 and summary["eval_count"] == 12 and len(summary["fit"]["losses"]) == 2
    state = torch.load(out, weights_only=True)["state"]
    assert any(k.startswith("backbone.") for k in state)
    fresh = build_teacher(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"), 3, "finetune")
    key = next(k for k in state if k.startswith("backbone.visual.") and k.endswith("weight"))
    assert not torch.equal(fresh.state_dict()[key], state[key])  # the backbone was trained
    teacher = load_teacher(out, device="cpu", classes=CLASSES)
    assert not teacher.training and not teacher.backbone.training
    images = torch.rand(3, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(teacher(images), load_teacher(out, device="cpu")(images))


def test_linear_embeds_train_images_when_no_embedding_set(tiny_clip, make_folder, make_images, tmp_path):
    root = make_folder(tmp_path / "imgs", {c: [make_images(10 * k + i, size=32) for i in range(5)]
                                           for k, c in enumerate(CLASSES)})
    summary = run(AdaptConfig(model=tiny_clip, pretrained="", device="cpu", mode="linear", train=[str(root)],
                              per_class=4, eval=[str(root)], out=str(tmp_path / "t.pt")))
    assert summary["train_count"] == 12 and summary["eval_count"] == 15 and summary["fit"]["holdout_rows"] == 3
    assert read_teacher_meta(tmp_path / "t.pt")["classes"] == CLASSES


def test_adapt_modes_registry_is_the_list_of_modes():
    import dataclasses

    from rakt.distill.teacher.modes import ADAPT_MODES, get_mode
    from rakt.distill.config import AdaptConfig

    field = {f.name: f for f in dataclasses.fields(AdaptConfig)}["mode"]
    assert list(field.metadata["choices"]) == list(ADAPT_MODES) and "zeroshot" in field.metadata["choices"]
    assert [m.name for m in ADAPT_MODES.values() if m.inputs == "images"] == ["reprogram", "finetune"]
    with pytest.raises(InputError, match="unknown adapt mode 'lora'; choose one of: linear, zeroshot, reprogram, finetune"):
        get_mode("lora")


def test_samples_without_cls_are_counted_in_the_report(tiny_clip, make_shard, make_images, to_jpeg, tmp_path, capsys):
    samples = [{"__key__": f"s{i:03d}", "jpg": to_jpeg(make_images(i, size=32)), "cls": i % 3} for i in range(9)]
    samples += [{"__key__": f"bare{i}", "jpg": to_jpeg(make_images(90 + i, size=32))} for i in range(2)]
    shard = make_shard(tmp_path / "t" / "train-000000.tar", samples)
    (shard.parent / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    out = tmp_path / "teacher.pt"
    assert main(["adapt", "--mode", "linear", "--model", tiny_clip, "--pretrained", "", "--device", "cpu",
                 "--train", str(shard), "--eval", str(shard), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_count"] == 9 and summary["eval_count"] == 9
    assert summary["train_skipped"] == {"no_label": 2} and summary["eval_skipped"] == {"no_label": 2}
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["train_skipped"] == {"no_label": 2} and report["eval_skipped"] == {"no_label": 2}
