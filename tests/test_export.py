"""`rakt export`: a real timm student written as ONNX and TorchScript, checked on a generated test shard."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import image_array, jpeg_bytes, write_shard
from distill.evaluate import decode_rgb
from distill.students import create_student, save_student
from pipeline.cli import main

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
    for fmt in ("pytorch", "onnx", "torchscript"):
        assert report["student"][fmt]["size_mb"] > 1 and report["student"][fmt]["latency_ms"] > 0
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
    import distill.export as export

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
    import distill.export as export

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
    from pipeline.run.config import load_run_config
    from pipeline.run.plan import plan

    steps = plan(load_run_config("experiment", run_dir=str(tmp_path / "run")))
    exports = [s for s in steps if s.stage == "export"]
    assert [s.name for s in exports] == ["arms/retrieved-task-s0/export"]
    step = exports[0]
    assert step.config.checkpoint == str(tmp_path / "run/arms/retrieved-task-s0/finetune/student.pt")
    assert step.config.teacher == str(tmp_path / "run/teacher.pt") and step.deps[-1] == "teacher"
    assert [s.name for s in steps].index(step.name) > [s.name for s in steps].index("arms/retrieved-task-s0/evaluate")


def test_report_shows_the_exported_student_beside_the_teacher(tmp_path):
    from pipeline.report import write_report
    from pipeline.report.results import export_figures, results_text

    arm = tmp_path / "arms" / "retrieved-task-s0"
    (arm / "export").mkdir(parents=True)
    (arm / "eval.json").write_text(json.dumps({"accuracy": 0.5, "classes": CLASSES}))
    check = {"accuracy": {"pytorch": 0.5, "onnx": 0.5, "torchscript": 0.499}, "ok": True, "tolerance_points": 0.1,
             "difference_points": {"onnx": 0.0, "torchscript": 0.1}}
    (arm / "export" / "export.json").write_text(json.dumps({
        "arch": "resnet10t", "device": "cpu: TestCPU (2 cores)", "latency": "batch 1, median of 50 runs, fp32",
        "student": {"pytorch": {"size_mb": 18.8, "latency_ms": 6.5}, "onnx": {"size_mb": 18.9, "latency_ms": 2.25},
                    "torchscript": {"size_mb": 19.0, "latency_ms": 5.75}},
        "teacher": {"size_mb": 13.1, "latency_ms": 31.5, "input_size": 96}, "check": check}))
    (tmp_path / "results.json").write_text(json.dumps({"teacher": {"accuracy": 0.6, "mode": "linear"}}))
    md = open(write_report(tmp_path)["markdown"]).read()
    section = md[md.index("## The student as a deliverable"):]
    assert "| teacher | pytorch | 13.1 | 31.50 | 60.0% |" in section
    assert "| student | onnx | 18.9 | 2.25 | 50.0% |" in section
    assert "| student | torchscript | 19.0 | 5.75 | 49.9% |" in section
    assert "passed" in section and "cpu: TestCPU" in section and "torchscript differs from PyTorch by 0.10" in section
    text = results_text({"teacher": {}, "summary": [], "export": export_figures(tmp_path)})
    assert "teacher  pytorch          13.1             31.50" in text
    assert "student  onnx             18.9              2.25" in text
