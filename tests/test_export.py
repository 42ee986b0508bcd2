"""`rakt export`: a real timm student written as ONNX and TorchScript, checked on a generated test shard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import image_array, jpeg_bytes, write_shard
from rakt.distill.accuracy import decode_rgb
from rakt.distill.students import create_student, save_student
from rakt.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def student_and_shard(tmp_path_factory):
    """A random-init resnet10t (32 px) and 12 labelled test images on which its accuracy is exactly 8/12: the
    labels are its own predictions, moved to the next class on every third image."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(5)
    model = create_student("resnet10t", len(CLASSES), small_input=True).eval()
    ckpt = root / "student.pt"
    save_student(ckpt, model, {"mode": "task"})
    jpegs = [jpeg_bytes(image_array(i, size=32)) for i in range(12)]
    images = torch.stack([decode_rgb(j, 32) for j in jpegs])
    with torch.no_grad():
        pred = model(images).argmax(-1)
    labels = [(int(p) + (i % 3 == 0)) % len(CLASSES) for i, p in enumerate(pred)]
    shard = write_shard(root / "test" / "test-000.tar",
                        [{"__key__": f"t{i:03d}", "jpg": j, "cls": c} for i, (j, c) in enumerate(zip(jpegs, labels))])
    (shard.parent / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return model, ckpt, shard, images


def test_export_writes_checked_onnx_and_torchscript(student_and_shard, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model, ckpt, shard, images = student_and_shard
    out = tmp_path / "export"
    assert main(["export", str(shard), "--checkpoint", str(ckpt), "--format", "both", "--runs", "3",
                 "--threads", "1", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} == {"student.onnx", "student.torchscript.pt", "student.json",
                                               "export.json"}
    report = json.loads((out / "export.json").read_text())
    check = report["check"]
    assert check["count"] == 12 and check["ok"] is True
    assert check["accuracy"]["pytorch"] == pytest.approx(8 / 12)
    assert check["accuracy"]["onnx"] == check["accuracy"]["torchscript"] == check["accuracy"]["pytorch"]
    assert max(check["max_abs_logit_diff_first_batch"].values()) < 1e-3
    assert summary["check_ok"] is True and summary["device"].startswith("cpu")
    student = report["student"]
    assert student["name"] == "resnet10t" and student["input_size"] == 32 and report["teacher"] is None
    assert student["parameters"] == sum(p.numel() for p in model.parameters()) == report["parameters"]
    for fmt in ("pytorch", "onnx", "torchscript"):
        assert student["runtimes"][fmt]["size_mb"] > 1 and student["runtimes"][fmt]["latency_ms"] > 0
    meta = json.loads((out / "student.json").read_text())
    assert meta["arch"] == "resnet10t" and meta["classes"] == CLASSES and meta["normalized_inside"] is True
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["mean"] == pytest.approx([0.485, 0.456, 0.406])

    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]  # dynamic batch of 12
    np.testing.assert_allclose(onnx_logits, expected, atol=1e-4, rtol=1e-4)
    scripted = torch.jit.load(str(out / "student.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(images).numpy(), expected, atol=1e-4, rtol=1e-4)


def test_export_fails_when_the_exported_model_disagrees(student_and_shard, tmp_path, monkeypatch, capsys):
    """An exported graph whose predictions move to the next class scores 4/12 instead of 8/12: refused."""
    import rakt.distill.export as export

    _, ckpt, shard, _ = student_and_shard
    real = export.export_torchscript

    class Rolled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.image_size = inner, inner.image_size

        def forward(self, x):
            return self.inner(x).roll(1, dims=-1)

    monkeypatch.setattr(export, "export_torchscript", lambda model, path: real(Rolled(model), path))
    out = tmp_path / "bad"
    assert main(["export", str(shard), "--checkpoint", str(ckpt), "--format", "torchscript", "--runs", "1",
                 "--out", str(out)]) == 2
    assert "differs from PyTorch's by more than 0.1 points" in capsys.readouterr().err
    report = json.loads((out / "export.json").read_text())
    assert report["check"]["ok"] is False
    assert report["check"]["accuracy"]["torchscript"] == pytest.approx(4 / 12)


def test_export_without_onnx_packages(student_and_shard, tmp_path, monkeypatch, capsys):
    import rakt.distill.export as export

    _, ckpt, shard, _ = student_and_shard
    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["onnxruntime"])
    assert main(["export", str(shard), "--checkpoint", str(ckpt), "--format", "onnx", "--out",
                 str(tmp_path / "a")]) == 2
    assert 'pip install "rakt[export]"' in capsys.readouterr().err
    out = tmp_path / "b"  # auto: TorchScript alone, with a warning naming what to install
    assert main(["export", str(shard), "--checkpoint", str(ckpt), "--runs", "1", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["formats"] == ["torchscript"]
    assert (out / "student.torchscript.pt").is_file() and not (out / "student.onnx").exists()


def test_export_clear_errors(student_and_shard, tmp_path, capsys):
    _, ckpt, shard, _ = student_and_shard
    out = tmp_path / "export"
    assert main(["export", str(shard), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "student checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(shard), "--out", str(out)]) == 2
    assert "a student checkpoint is required" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "labelled target test images are required" in capsys.readouterr().err
    assert not out.exists()


def test_run_plan_exports_the_main_arm_only(tmp_path):
    from rakt.run.config import load_run_config
    from rakt.run.plan import plan

    steps = plan(load_run_config("experiment", run_dir=str(tmp_path / "run")))
    exports = [s for s in steps if s.stage == "export"]
    assert [s.name for s in exports] == ["arms/retrieved-task-s0/export"]
    step = exports[0]
    assert step.config.checkpoint == str(tmp_path / "run/arms/retrieved-task-s0/finetune/student.pt")
    assert step.config.teacher == str(tmp_path / "run/teacher.pt") and step.deps[-1] == "teacher"
    assert [s.name for s in steps].index(step.name) > [s.name for s in steps].index("arms/retrieved-task-s0/evaluate")


def teacher_checkpoint(path, tiny_clip: str) -> Path:
    """A tiny open_clip ViT teacher (random init, 32 px) with a linear head for CLASSES, as `rakt adapt` saves one."""
    from rakt.distill.teacher.checkpoint import save_teacher
    from rakt.distill.teacher.modes import build_teacher
    from rakt.pipeline.config import EncoderConfig

    torch.manual_seed(0)
    teacher = build_teacher(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"), len(CLASSES), "linear")
    save_teacher(path, teacher, {"encoder": {"model": tiny_clip, "pretrained": "", "image_size": 0},
                                 "model_id": teacher.model_id, "mode": "linear", "classes": CLASSES})
    return path


# the tiny teacher's multiply-adds, counted by hand: a 32-px image, 8-px patches -> 16 tokens + 1 class token, width 64,
# 2 blocks of 2 heads x 32, MLP 256, a 64 -> 32 projection and a 32 -> 3 head
TOKENS, WIDTH = 17, 64
TINY_TEACHER_MACS = (16 * 64 * 3 * 8 * 8  # patch embedding
                     + 2 * (TOKENS * WIDTH * 3 * WIDTH + 2 * 2 * TOKENS * TOKENS * 32 + TOKENS * WIDTH * WIDTH
                            + 2 * TOKENS * WIDTH * 256)  # per block: qkv, q.k and attention x v, out proj, MLP
                     + 64 * 32 + 32 * 3)


def test_export_times_the_teacher_in_the_students_runtimes(student_and_shard, tiny_clip, tmp_path):
    """--teacher: the teacher goes through the student's runtimes at its own input size with the same threads; its
    parameters are its image tower's and head's (not the text tower's), its multiply-adds include attention."""
    pytest.importorskip("onnxruntime")
    from rakt.distill.teacher.checkpoint import load_teacher

    _, ckpt, shard, _ = student_and_shard
    teacher_pt = teacher_checkpoint(tmp_path / "teacher.pt", tiny_clip)
    out = tmp_path / "export"
    assert main(["export", str(shard), "--checkpoint", str(ckpt), "--teacher", str(teacher_pt), "--runs", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    student, teacher = report["student"], report["teacher"]
    assert set(teacher["runtimes"]) == set(student["runtimes"]) == {"pytorch", "onnx", "torchscript"}
    assert all(fig["latency_ms"] > 0 and fig["size_mb"] > 0 for fig in teacher["runtimes"].values())
    loaded = load_teacher(teacher_pt, device="cpu")
    assert teacher["parameters"] == sum(p.numel() for p in [*loaded.backbone.visual.parameters(),
                                                            *loaded.head.parameters()])
    assert teacher["multiply_adds"] == TINY_TEACHER_MACS and teacher["input_size"] == 32
    assert teacher["name"] == tiny_clip and teacher["mode"] == "linear"
    assert max(teacher["max_abs_logit_diff"].values()) < 1e-4
    # the deliverable folder holds the student alone
    assert {p.name for p in out.iterdir()} == {"student.onnx", "student.torchscript.pt", "student.json",
                                               "export.json"}


def test_the_clip_tower_the_report_names_is_counted_as_the_export_counts():
    """The report's reason for a student that is not smaller (a CLIP image tower is far larger) is a measured
    figure: open_clip's ViT-B/32 image tower, recounted here with the export's counter."""
    import open_clip

    from rakt.distill.runtimes import model_cost
    from rakt.report.deliverable import CLIP_IMAGE_TOWER

    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    assert model_cost(tower, 224) == {k: CLIP_IMAGE_TOWER[k] for k in ("input_size", "parameters", "multiply_adds")}


def _export_json(run, student: dict, teacher: dict | None) -> None:
    arm = run / "arms" / "retrieved-task-s0"
    (arm / "export").mkdir(parents=True)
    (arm / "eval.json").write_text(json.dumps({"accuracy": 0.5, "classes": CLASSES}))
    check = {"accuracy": {"pytorch": 0.5, "onnx": 0.5, "torchscript": 0.499}, "ok": True, "tolerance_points": 0.1,
             "difference_points": {"onnx": 0.0, "torchscript": 0.1}}
    (arm / "export" / "export.json").write_text(json.dumps({
        "arch": "resnet10t", "device": "cpu: TestCPU (2 cores)", "latency": "batch 1, median of 50 runs, fp32",
        "parameters": 4_927_618, "student": student, "teacher": teacher, "check": check}))
    (run / "results.json").write_text(json.dumps({"teacher": {"accuracy": 0.6, "mode": "finetune"}}))


def _runtimes(pytorch: tuple, onnx: tuple, torchscript: tuple) -> dict:
    return {k: {"size_mb": v[0], "latency_ms": v[1]} for k, v in
            (("pytorch", pytorch), ("onnx", onnx), ("torchscript", torchscript))}


def _section(run) -> str:
    from rakt.report import write_report

    md = open(write_report(run)["markdown"]).read()
    start = md.index("## The student as a deliverable")
    return md[start:md.index("\n## ", start + 1)]


STUDENT = {"name": "resnet10t", "input_size": 64, "parameters": 4_927_618, "multiply_adds": 89_535_488,
           "runtimes": _runtimes((18.8, 6.5), (18.9, 2.25), (19.0, 5.75))}


def test_report_compares_student_and_teacher_like_for_like(tmp_path):
    """One table, both models in every runtime; the report says plainly that a student larger than its teacher is
    not smaller, and not faster where it is not, and why."""
    from rakt.report.deliverable import export_figures
    from rakt.report.results import results_text

    _export_json(tmp_path, STUDENT,
                 {"name": "timm:tf_efficientnet_lite0", "mode": "finetune", "input_size": 128, "parameters": 3_383_818,
                  "multiply_adds": 125_370_368, "runtimes": _runtimes((13.1, 7.0), (13.1, 2.5), (13.5, 5.5))})
    section = _section(tmp_path)
    assert "| model | timm:tf_efficientnet_lite0 (finetune) | resnet10t |  |" in section
    assert "| input | 128 px | 64 px |  |" in section
    assert "| parameters | 3.38M | 4.93M | 1.46 |" in section
    assert "| multiply-adds per image | 0.125 G | 0.090 G | 0.71 |" in section
    assert "| test accuracy (PyTorch) | 60.0% | 50.0% |  |" in section
    assert "| PyTorch: fp32 weights MB | 13.1 | 18.8 | 1.44 |" in section
    assert "| ONNX (onnxruntime): CPU ms per image (batch 1) | 2.50 | 2.25 | 0.90 |" in section
    assert "| TorchScript: CPU ms per image (batch 1) | 5.50 | 5.75 | 1.05 |" in section
    assert "So the student is not smaller than this teacher and not faster in every runtime (not in TorchScript)" \
        in section
    assert "ViT-B/32 image tower alone has 87.85M parameters" in section and "18x this student's parameters" in section
    assert "passed" in section and "cpu: TestCPU" in section and "torchscript differs from PyTorch by 0.10" in section
    text = results_text({"teacher": {"accuracy": 0.6}, "summary": [], "export": export_figures(tmp_path)})
    assert any(line.split() == ["parameters", "3.38M", "4.93M", "1.46"] for line in text.splitlines()), text


def test_report_says_when_the_student_is_smaller_and_faster(tmp_path):
    _export_json(tmp_path, STUDENT,
                 {"name": "ViT-B-32", "mode": "linear", "input_size": 224, "parameters": 87_854_346,
                  "multiply_adds": 4_408_819_200, "runtimes": _runtimes((335.1, 60.0), (335.2, 20.0), (335.5, 50.0))})
    section = _section(tmp_path)
    assert "It is smaller than its teacher and faster in every runtime." in section
    assert "not smaller" not in section and "ViT-B/32 image tower" not in section


def test_report_reads_an_export_from_before_the_like_for_like_table(tmp_path):
    """An export.json written before 2026-12-07 (the student's runtimes at the top, the teacher in PyTorch only)."""
    _export_json(tmp_path, _runtimes((18.8, 6.5), (18.9, 2.25), (19.0, 5.75)),
                 {"size_mb": 13.1, "latency_ms": 31.5, "input_size": 96, "parameters": 3_383_818})
    section = _section(tmp_path)
    assert "| parameters | 3.38M | 4.93M | 1.46 |" in section
    assert "| multiply-adds per image | — | — | — |" in section
    assert "| PyTorch: CPU ms per image (batch 1) | 31.50 | 6.50 | 0.21 |" in section
    assert "| ONNX (onnxruntime): CPU ms per image (batch 1) | — | 2.25 | — |" in section
    assert "not smaller than this teacher" in section
