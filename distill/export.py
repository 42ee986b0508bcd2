"""`rakt export`: the final student as a deliverable, i.e. ONNX and TorchScript files with their preprocessing.

It writes into cfg.out `student.onnx` (torch's dynamo exporter, batch dimension dynamic) and
`student.torchscript.pt` (torch.jit.trace), both taking float32 RGB images [B, 3, S, S] in [0, 1] with the
normalization inside; `student.json` says S, mean/std, the class names and the timm name. It then checks the
exported files against the PyTorch student: accuracy on labelled target test images (read and scored as
`rakt evaluate` does) within cfg.tolerance points, ONNX run by onnxruntime and TorchScript by torch.jit; and
times each (and the teacher, given one) at batch 1 on the CPU, median of cfg.runs passes, into `export.json`.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from distill.config import ExportConfig
from distill.evaluate import evaluate_model, labelled_batches, metrics_from_confusion
from distill.students import StudentModel, load_student, resize_input
from pipeline.config import to_dict
from pipeline.device import device_name, set_threads
from pipeline.io import InputError, atomic_path, prefetched, timed, write_json
from pipeline.sources import open_source

log = logging.getLogger("rakt")

ONNX_FILE, TORCHSCRIPT_FILE, META_FILE, REPORT_FILE = ("student.onnx", "student.torchscript.pt", "student.json",
                                                       "export.json")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = 'pip install "rakt[export]" (or: pip install onnx onnxscript onnxruntime)'
WARMUP = 5


class ExportCheckError(InputError):
    """An exported model disagrees with the PyTorch student beyond the tolerance (the CLI reports it, exit 2)."""


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def formats_for(fmt: str) -> list[str]:
    """The formats to write for cfg.format; 'auto' drops ONNX (with a warning) when its packages are missing."""
    missing = missing_onnx_packages()
    if fmt == "auto":
        if missing:
            log.warning("export: ONNX skipped, %s not installed; to export ONNX too: %s", ", ".join(missing),
                        INSTALL_HINT)
            return ["torchscript"]
        return ["onnx", "torchscript"]
    wanted = ["onnx", "torchscript"] if fmt == "both" else [fmt]
    if "onnx" in wanted and missing:
        raise InputError(f"rakt export: ONNX export needs {', '.join(missing)}, not installed; {INSTALL_HINT}, or "
                         f"export TorchScript alone with --format torchscript")
    return wanted


def export_onnx(model: StudentModel, path: Path) -> None:
    """ONNX through torch's dynamo exporter (torch.export), the batch dimension dynamic."""
    example = torch.rand(1, 3, model.image_size, model.image_size)
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]  # their INFO lines per rewrite pass
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()):  # it prints its progress too
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False, verbose=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)



def export_torchscript(model: StudentModel, path: Path) -> None:
    """TorchScript by tracing at the student's input size."""
    example = torch.rand(1, 3, model.image_size, model.image_size)
    with warnings.catch_warnings():  # torch 2.9+ marks torch.jit deprecated; the resize branch is fixed by design
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def load_torchscript(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


class OnnxModel(nn.Module):
    """An onnxruntime CPU session as a module: [0, 1] image batches -> logits, for evaluate_model."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would slow torch
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])


def median_latency_ms(model: Callable[[torch.Tensor], torch.Tensor], size: int, runs: int) -> float:
    """Median wall time in ms of `runs` batch-1 forward passes (after a few untimed ones)."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(WARMUP + runs):
            start = time.perf_counter()
            model(x)
            if i >= WARMUP:
                times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def _check_accuracy(cfg: ExportConfig, model: StudentModel, exported: dict[str, nn.Module]) -> dict:
    """Accuracy of the PyTorch student and of each exported model on the same decoded test images (fp32)."""
    source = open_source(cfg.source, classes_file=cfg.classes)
    if source.classes is not None and len(source.classes) != model.num_classes:
        raise InputError(f"the source has {len(source.classes)} classes but the student {model.arch} predicts "
                         f"{model.num_classes}; check it on the target task it was trained for")
    n = model.num_classes
    confusion = {name: np.zeros((n, n), dtype=np.int64) for name in ["pytorch", *exported]}
    first_diff: dict[str, float] = {}
    skipped: collections.Counter = collections.Counter()
    for images, labels in prefetched(labelled_batches(source, cfg.split, model.image_size, cfg.batch_size, skipped)):
        sized = resize_input(images, model.image_size)  # the exported graphs take exactly S x S
        confusion["pytorch"] += evaluate_model(model, (images, labels), n, precision="fp32",
                                               batch_size=len(labels))["confusion"]
        for name, m in exported.items():
            confusion[name] += evaluate_model(m, (sized, labels), n, precision="fp32",
                                              batch_size=len(labels))["confusion"]
            if name not in first_diff:
                with torch.no_grad():
                    first_diff[name] = float((m(sized) - model(images)).abs().max())
    metrics = {name: metrics_from_confusion(c) for name, c in confusion.items()}
    if metrics["pytorch"]["count"] == 0:
        raise InputError(f"{', '.join(cfg.source)}: no labelled images"
                         f"{' in split ' + repr(cfg.split) if cfg.split else ''} to check the export on "
                         f"(skipped: {dict(skipped) or 'none'})")
    ref = metrics["pytorch"]["accuracy"]
    check = {"count": metrics["pytorch"]["count"], "tolerance_points": cfg.tolerance, "skipped": dict(skipped),
             "accuracy": {name: m["accuracy"] for name, m in metrics.items()},
             "difference_points": {name: round(100 * abs(metrics[name]["accuracy"] - ref), 4) for name in exported},
             "max_abs_logit_diff_first_batch": first_diff, "classes": source.classes}
    check["ok"] = all(d <= cfg.tolerance for d in check["difference_points"].values())
    return check


def _teacher_figures(path: str, runs: int) -> dict:
    """Size (fp32 parameters and buffers) and batch-1 CPU latency of the adapted teacher, run as PyTorch."""
    from distill.teacher.checkpoint import load_teacher

    teacher = load_teacher(path, device="cpu", precision="fp32")
    size = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    return {"checkpoint": path, "input_size": teacher.input_size, "parameters": sum(p.numel() for p in
                                                                                    teacher.parameters()),
            "size_mb": round(size / 2 ** 20, 2), "latency_ms": median_latency_ms(teacher, teacher.input_size, runs)}


def _meta(model: StudentModel, classes: list[str] | None, files: dict[str, str]) -> dict:
    return {"arch": model.arch, "num_classes": model.num_classes, "classes": classes,
            "input": {"shape": ["batch", 3, model.image_size, model.image_size], "dtype": "float32",
                      "layout": "NCHW", "channels": "RGB", "range": [0.0, 1.0],
                      "resize": f"bilinear to {model.image_size} x {model.image_size} (antialiased when shrinking)"},
            "mean": [round(float(v), 6) for v in model.mean.flatten()],
            "std": [round(float(v), 6) for v in model.std.flatten()],
            "normalized_inside": True, "output": "logits [batch, num_classes]", "small_input": model.small_input,
            "files": files}


def run(cfg: ExportConfig) -> dict:
    """`rakt export`: write the student as ONNX/TorchScript into cfg.out, check accuracy, time it; export.json."""
    if not cfg.checkpoint:
        raise InputError("rakt export: a student checkpoint is required (--checkpoint, from rakt finetune)")
    if not cfg.out:
        raise InputError("rakt export: an output folder is required (--out)")
    if not cfg.source:
        raise InputError("rakt export: labelled target test images are required to check the exported models")
    if cfg.runs < 1 or cfg.tolerance < 0:
        raise InputError("rakt export: --runs must be at least 1 and --tolerance at least 0")
    formats = formats_for(cfg.format)
    model, meta = load_student(cfg.checkpoint)
    if not model.image_size:
        raise InputError(f"{cfg.checkpoint}: the student has no fixed input size; exported graphs need one")
    threads = set_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
    exported: dict[str, nn.Module] = {}
    with timed("export"):
        if "onnx" in formats:
            export_onnx(model, out / ONNX_FILE)
            exported["onnx"] = OnnxModel(out / ONNX_FILE, threads)
        if "torchscript" in formats:
            export_torchscript(model, out / TORCHSCRIPT_FILE)
            exported["torchscript"] = load_torchscript(out / TORCHSCRIPT_FILE)
        check = _check_accuracy(cfg, model, exported)
        lat_threads = set_threads(cfg.latency_threads)  # torch's; onnxruntime gets a session with as many
        if "onnx" in exported:
            exported["onnx"] = OnnxModel(out / ONNX_FILE, lat_threads)
        student = {"pytorch": {"size_mb": round(Path(cfg.checkpoint).stat().st_size / 2 ** 20, 2),
                               "latency_ms": median_latency_ms(model, model.image_size, cfg.runs)}}
        for name, m in exported.items():
            student[name] = {"file": files[name], "size_mb": round((out / files[name]).stat().st_size / 2 ** 20, 2),
                             "latency_ms": median_latency_ms(m, model.image_size, cfg.runs)}
        teacher = _teacher_figures(cfg.teacher, cfg.runs) if cfg.teacher else None
        set_threads(threads)
    write_json(out / META_FILE, _meta(model, check["classes"], {k: files[k] for k in exported}))
    report = {"arch": model.arch, "checkpoint": cfg.checkpoint, "checkpoint_meta": meta, "formats": formats,
              "parameters": sum(p.numel() for p in model.parameters()), "device": device_name(torch.device("cpu")),
              "threads": lat_threads, "latency": f"batch 1, median of {cfg.runs} runs, fp32, {lat_threads} "
                                                  f"thread{'s' if lat_threads > 1 else ''}", "student": student,
              "teacher": teacher, "check": check, "config": to_dict(cfg)}
    write_json(out / REPORT_FILE, report)
    summary = "; ".join(f"{k} {v['size_mb']} MB {v['latency_ms']} ms" for k, v in student.items())
    log.info("export: %s on %s (%s); accuracy %s", summary, report["device"], report["latency"],
             ", ".join(f"{k} {100 * v:.2f}%" for k, v in check["accuracy"].items()))
    if not check["ok"]:
        raise ExportCheckError(f"rakt export: exported accuracy differs from PyTorch's by more than {cfg.tolerance} "
                               f"points: {check['difference_points']} (report: {out / REPORT_FILE})")
    return {"out": str(out), "formats": formats, "device": report["device"], "student": student,
            "teacher": teacher, "accuracy": check["accuracy"], "check_ok": check["ok"]}
