"""`rakt export`: the final student as a deliverable, i.e. ONNX and TorchScript files with their preprocessing.

It writes into cfg.out `student.onnx` (torch's dynamo exporter, batch dimension dynamic) and
`student.torchscript.pt` (torch.jit.trace), both taking float32 RGB images [B, 3, S, S] in [0, 1] with the
normalization inside; `student.json` says S, mean/std, the class names and the timm name. It then checks the
exported files against the PyTorch student: accuracy on labelled target test images (read and scored as
`rakt evaluate` does) within cfg.tolerance points, ONNX run by onnxruntime and TorchScript by torch.jit. Into
`export.json` go the student's and (given one) the teacher's parameters and multiply-adds at their own input sizes,
and their sizes and batch-1 CPU latencies in the same runtimes with the same threads (rakt/distill/runtimes.py).
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rakt.distill.config import ExportConfig
from rakt.distill.accuracy import evaluate_model, labelled_batches, metrics_from_confusion
from rakt.distill.runtimes import (WRITERS, TeacherNetwork, export_onnx, export_torchscript, load_runtime,
                                   max_logit_difference, model_cost, runtime_figures)
from rakt.distill.students import StudentModel, load_student, resize_input
from rakt.pipeline.config import to_dict
from rakt.pipeline.device import device_name, set_threads
from rakt.pipeline.io import InputError, prefetched, timed, write_json
from rakt.pipeline.sources import open_source

log = logging.getLogger("rakt")

ONNX_FILE, TORCHSCRIPT_FILE, META_FILE, REPORT_FILE = ("student.onnx", "student.torchscript.pt", "student.json",
                                                       "export.json")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = 'pip install "rakt[export]" (or: pip install onnx onnxscript onnxruntime)'
TEACHER_LOGIT_TOLERANCE = 1e-3  # a larger logit difference of the teacher's written forms from PyTorch is logged


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


def _teacher_figures(cfg: ExportConfig, formats: list[str], out: Path, threads: int) -> dict:
    """The adapted teacher through the student's runtimes, at its own input size, with `threads` threads: its
    parameters and multiply-adds, and each runtime's size and batch-1 latency (its ONNX and TorchScript files are
    written to a temporary folder and deleted: the deliverable is the student)."""
    from rakt.distill.teacher.checkpoint import load_teacher, read_teacher_meta

    network = TeacherNetwork(load_teacher(cfg.teacher, device="cpu", precision="fp32"))
    with tempfile.TemporaryDirectory(dir=out, prefix=".teacher-") as folder:
        loaded = {}
        for fmt in formats:
            path = Path(folder) / f"teacher{SUFFIXES[fmt]}"
            WRITERS[fmt](network, path)
            loaded[fmt] = (load_runtime(fmt, path, threads), path)
        differences = {fmt: max_logit_difference(network, module) for fmt, (module, _) in loaded.items()}
        runtimes = runtime_figures(network, loaded, cfg.runs)
    for runtime in runtimes.values():
        runtime.pop("file", None)  # deleted with the folder
    meta = read_teacher_meta(cfg.teacher)
    figures = {"name": (meta.get("encoder") or {}).get("model", ""), "mode": meta.get("mode"),
               "checkpoint": cfg.teacher, **model_cost(network, network.image_size), "runtimes": runtimes, "max_abs_logit_diff": differences}
    if any(d > TEACHER_LOGIT_TOLERANCE for d in differences.values()):
        log.warning("export: the teacher's written forms differ from PyTorch by more than %s in a logit: %s",
                    TEACHER_LOGIT_TOLERANCE, differences)
    return figures


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
    """`rakt export`: write the student as ONNX/TorchScript into cfg.out, check accuracy, time it and the teacher in
    the same runtimes; export.json."""
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
    writers = {"onnx": export_onnx, "torchscript": export_torchscript}  # looked up here, so a test can swap one
    with timed("export"):
        for fmt in formats:
            writers[fmt](model, out / files[fmt])
        check = _check_accuracy(cfg, model, {fmt: load_runtime(fmt, out / files[fmt], threads) for fmt in formats})
        lat_threads = set_threads(cfg.latency_threads)  # torch's; onnxruntime gets sessions with as many
        loaded = {fmt: (load_runtime(fmt, out / files[fmt], lat_threads), out / files[fmt]) for fmt in formats}
        student = {"name": model.arch, **model_cost(model, model.image_size),
                   "runtimes": runtime_figures(model, loaded, cfg.runs)}
        teacher = _teacher_figures(cfg, formats, out, lat_threads) if cfg.teacher else None
    write_json(out / META_FILE, _meta(model, check["classes"], {k: files[k] for k in formats}))
    report = {"arch": model.arch, "checkpoint": cfg.checkpoint, "checkpoint_meta": meta, "formats": formats,
              "parameters": student["parameters"], "device": device_name(torch.device("cpu")),
              "threads": lat_threads, "latency": f"batch 1, median of {cfg.runs} runs, fp32, {lat_threads} "
                                                  f"thread{'s' if lat_threads > 1 else ''}", "student": student,
              "teacher": teacher, "check": check, "config": to_dict(cfg)}
    write_json(out / REPORT_FILE, report)
    for role, fig in (("student", student), ("teacher", teacher)):
        if fig:
            log.info("export: %s %s at %d px, %.2fM parameters, %.3f G multiply-adds; %s", role, fig["name"],
                     fig["input_size"], fig["parameters"] / 1e6, fig["multiply_adds"] / 1e9,
                     "; ".join(f"{k} {v['size_mb']} MB {v['latency_ms']} ms" for k, v in fig["runtimes"].items()))
    log.info("export: on %s (%s); accuracy %s", report["device"], report["latency"],
             ", ".join(f"{k} {100 * v:.2f}%" for k, v in check["accuracy"].items()))
    if not check["ok"]:
        raise ExportCheckError(f"rakt export: exported accuracy differs from PyTorch's by more than {cfg.tolerance} "
                               f"points: {check['difference_points']} (report: {out / REPORT_FILE})")
    return {"out": str(out), "formats": formats, "device": report["device"], "student": student,
            "teacher": teacher, "accuracy": check["accuracy"], "check_ok": check["ok"]}
