"""Where and how models run: the device, the autocast dtype (`--precision`), the memory layout, and CPU threads
and DataLoader workers chosen together from the core count, and the C allocator's thresholds (keep_freed_memory).

`--precision auto` is bf16 autocast on CUDA and on CPUs with native bf16 arithmetic (avx512_bf16 or AMX on x86,
FEAT_BF16 on Arm, read from the CPU's own feature flags), fp32 elsewhere. Outputs that are stored (embeddings,
teacher logits) are always written as float32.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import subprocess

import torch

from pipeline.io import InputError

log = logging.getLogger("rakt")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO = -1  # workers / threads: choose from the core count


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; an unusable name raises InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {name!r} not understood; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu or auto")
    return chosen


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as the OS reports them (Linux /proc/cpuinfo, macOS sysctl); empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return frozenset({"bf16"} if out == "1" else set())
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset()


def cpu_bf16_native() -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 / AMX on x86, bf16 on Arm); never assumed."""
    return bool(cpu_features() & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None = plain fp32)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16_native() else None
    if precision == "fp16" and device.type != "cuda":
        log.warning("fp16 is for GPUs; running fp32 on %s", device)
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def channels_last(x: torch.Tensor | torch.nn.Module):
    """A module or a 4-d batch in channels_last layout (conv nets run faster so on CPU and GPU alike)."""
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def loader_workers(requested: int, device: torch.device) -> int:
    """DataLoader workers: an explicit count wins; auto leaves the CPU's cores to the model on a CPU device (its
    threads would fight the workers for them; a batch of small images decodes in a few ms in process) and
    gives a GPU's feeder all cores but one (at most 8)."""
    if requested != AUTO:
        return max(0, requested)
    cores = cpu_cores()
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


# glibc mallopt parameters, and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 << 20, 256 << 20


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """On glibc, let freed blocks up to 64 MiB go back to the heap (not to the kernel) and keep up to 256 MiB of free
    heap. glibc's defaults hand an activation-sized block back with munmap when it is freed, so each forward pass on
    CPU page-faults its activations in again: on this project's 2-core CPU that cost a third of a ResNet-10t's bf16
    inference at batch 256 (docs/benchmarks.md). Left alone where MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_
    is set, or another allocator is preloaded. True when the thresholds were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def set_threads(requested: int = AUTO) -> int:
    """Intra-op threads for the model: an explicit count wins, auto = every core this process may use. Also sets
    the allocator's thresholds (keep_freed_memory)."""
    keep_freed_memory()
    threads = requested if requested > 0 else cpu_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def device_name(device: torch.device | None = None) -> str:
    """'cuda: NVIDIA H100 ...' or 'cpu: MODEL (N cores, bf16 native|no native bf16)'."""
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    bf16 = "native bf16" if cpu_bf16_native() else "no native bf16"
    return f"cpu: {model or 'unknown'} ({cpu_cores()} cores, {bf16})"
