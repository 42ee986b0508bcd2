"""The runtimes a deliverable model runs in (PyTorch, TorchScript, ONNX through onnxruntime), and what it costs there.

Any module that takes float32 RGB images [B, 3, S, S] in [0, 1] and has an `image_size` S can be written as ONNX
(torch's dynamo exporter, the batch dimension dynamic) and TorchScript (torch.jit.trace), loaded back, timed at
batch 1 on the CPU (`latency_ms`), and counted: parameters and multiply-adds of one forward pass at S x S
(`model_cost`, torch's own FlopCounterMode). `rakt export` runs the student and the teacher through all of it.
"""
from __future__ import annotations

import contextlib
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rakt.pipeline.io import atomic_path

log = logging.getLogger("rakt")

RUNTIMES = ("pytorch", "torchscript", "onnx")
WARMUP = 5


def export_onnx(model: nn.Module, path: Path) -> None:
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


def export_torchscript(model: nn.Module, path: Path) -> None:
    """TorchScript by tracing at the model's input size."""
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


WRITERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def load_runtime(fmt: str, path: Path, threads: int) -> nn.Module:
    """A written model back as a module: onnxruntime with `threads` intra-op threads, or torch.jit (torch's)."""
    return OnnxModel(path, threads) if fmt == "onnx" else load_torchscript(path)


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


def weights_mb(model: nn.Module) -> float:
    """Size in MB (2^20 bytes) of the fp32 state: parameters and persistent buffers."""
    return round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20, 2)


def model_cost(model: nn.Module, size: int) -> dict:
    """Parameters and multiply-adds of one batch-1 forward pass at size x size, fp32, counted by torch's
    FlopCounterMode (convolutions and matrix products). The input requires grad and attention runs its math kernel,
    so that nn.MultiheadAttention leaves its fused inference kernel, which the counter does not see, for ops it does."""
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(torch.rand(1, 3, size, size, requires_grad=True))
    return {"input_size": size, "parameters": sum(p.numel() for p in model.parameters()),
            "multiply_adds": counter.get_total_flops() // 2}


def runtime_figures(model: nn.Module, loaded: dict[str, tuple[nn.Module, Path]], runs: int) -> dict:
    """{runtime: {size_mb, latency_ms[, file]}} of the PyTorch `model` and of its `loaded` written forms (runtime ->
    (module, file)), each timed at batch 1 with the threads set now."""
    size = model.image_size
    out = {"pytorch": {"size_mb": weights_mb(model), "latency_ms": median_latency_ms(model, size, runs)}}
    for fmt, (module, path) in loaded.items():
        out[fmt] = {"file": path.name, "size_mb": round(path.stat().st_size / 2 ** 20, 2),
                    "latency_ms": median_latency_ms(module, size, runs)}
    return out


def max_logit_difference(model: nn.Module, other: Callable[[torch.Tensor], torch.Tensor], images: int = 4) -> float:
    """Largest absolute logit difference between `model` and a written form of it on seeded random images, one at a
    time (an exporter may have fixed the batch size at the example's 1)."""
    x = torch.rand(images, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return max(float((other(x[i:i + 1]) - model(x[i:i + 1])).abs().max()) for i in range(images))


class TeacherNetwork(nn.Module):
    """The adapted teacher as the student is exported: images [B, 3, S, S] in [0, 1] at its own input size S,
    normalized (and prompted) inside, fp32 logits out; the eval transform's resize and crop stay outside, as they do
    for the student. Takes the teacher over: an open_clip backbone keeps only its image tower (its text tower would
    count as parameters and weights the images never use), and the layout becomes the plain NCHW the student runs
    in (torch.export would otherwise fix the batch size: a batch of 1 makes channels_last strides ambiguous)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        if teacher.encode == "encode_image" and isinstance(getattr(teacher.backbone, "visual", None), nn.Module):
            teacher.backbone, teacher.encode = teacher.backbone.visual, "forward"  # encode_image = visual + normalize
        teacher.memory_format = torch.contiguous_format
        self.teacher = teacher.to(memory_format=torch.contiguous_format)
        self.image_size = teacher.input_size
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        inputs = t.normalize(x) if t.prompt is not None else (x - t.mean) / t.std
        return t.logits_from_features(t.embed(inputs))

