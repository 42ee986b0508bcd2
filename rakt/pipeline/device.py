"""Where and how models run: the device, the autocast dtype (`--precision`), the memory layout, CPU threads and
DataLoader workers chosen together from the cores this process may use, and the C allocator's thresholds
(keep_freed_memory).

Auto threads (`--threads -1`) are the cores of the affinity mask, capped by a cgroup CPU quota, less the cores that
other processes keep busy (from /proc/stat, this process's own CPU time left out), looked at when a stage sets them and
every 10 s while its loop runs (adapt_threads): an OpenMP team that shares a core with another busy process waits for
its descheduled thread at every barrier.

`--precision auto` is bf16 autocast on CUDA and on CPUs with native bf16 arithmetic (avx512_bf16 or AMX on x86,
FEAT_BF16 on Arm, read from the CPU's own feature flags), fp32 elsewhere. Outputs that are stored (embeddings,
teacher logits) are always written as float32.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rakt.pipeline.config import PRECISIONS
from rakt.pipeline.io import InputError

log = logging.getLogger("rakt")

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


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask); every CPU where the OS has no affinity call."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> float | None:
    """CPUs the container's cgroup quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, as
    seen from inside the container); None when there is no quota or no cgroup file to read."""
    try:
        quota, period = (Path(root) / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota = int((Path(root) / v1 / "cpu.cfs_quota_us").read_text())
            period = int((Path(root) / v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_cores() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup's CPU quota (rounded up)."""
    limit = cgroup_cpu_limit()
    cores = len(allowed_cpus())
    return max(1, min(cores, math.ceil(limit)) if limit else cores)


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


@dataclass(frozen=True)
class CpuSample:
    """Busy and total ticks of each allowed CPU (/proc/stat) and this process's own CPU seconds, at one moment."""
    at: float
    ticks: dict[int, tuple[int, int]]
    own_seconds: float


def cpu_sample() -> CpuSample | None:
    """Now's counters; None where /proc/stat cannot be read (not Linux)."""
    allowed, ticks = allowed_cpus(), {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
                    continue
                if int(name[3:]) in allowed:
                    v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    ticks[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v))
    except (OSError, ValueError, IndexError):
        return None
    times = os.times()
    return CpuSample(time.monotonic(), ticks, times.user + times.system) if ticks else None


def busy_elsewhere(before: CpuSample, after: CpuSample) -> float:
    """Cores' worth of the allowed CPUs that other processes (and steal) kept busy between two samples."""
    busy = 0.0
    for cpu, (b1, t1) in after.ticks.items():
        b0, t0 = before.ticks.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    own = (after.own_seconds - before.own_seconds) / max(after.at - before.at, 1e-6)
    return max(0.0, busy - own)


FREE_SHARE = 0.6  # a core counts as free when other processes leave at least this share of it
CHECK_SECONDS = 10.0  # auto threads: how often a running stage looks again (adapt_threads)
FIRST_WINDOW = 0.2  # seconds of load a stage looks at when it sets its threads


def threads_for(cores: int, allowed: int, busy: float) -> int:
    """Auto intra-op threads: one per core this process may use, less the cores other processes keep busy. An
    OpenMP team that shares a core with another busy process waits at every barrier for its descheduled thread
    (on the 2-core CPU beside one busy process, a distill-like loop ran 0.14 steps/s at 2 threads and 1.23 at 1;
    docs/benchmarks.md, bench/shared_cores.py)."""
    free = int(allowed - busy + (1 - FREE_SHARE))
    return max(1, min(cores, free))


class _AutoThreads:
    """The state of auto threads: on or off (an explicit count), and the last sample to compare with."""
    enabled = False
    sample: CpuSample | None = None


def _auto_count(since: CpuSample | None) -> tuple[int, float]:
    """(threads, cores busy elsewhere) from the load since `since`, or over the next FIRST_WINDOW seconds."""
    if since is None:
        since = cpu_sample()
        time.sleep(FIRST_WINDOW)
    now = cpu_sample()
    _AutoThreads.sample = now
    if since is None or now is None:
        return cpu_cores(), 0.0
    busy = busy_elsewhere(since, now)
    return threads_for(cpu_cores(), len(now.ticks), busy), busy


def set_threads(requested: int = AUTO) -> int:
    """Intra-op threads for the model: an explicit count wins; auto = one per core this process may use (affinity,
    cgroup quota) less the cores other processes keep busy, looked at again while the stage runs (adapt_threads).
    Also sets the allocator's thresholds (keep_freed_memory)."""
    keep_freed_memory()
    _AutoThreads.enabled = requested <= 0
    if requested > 0:
        threads = requested
    else:
        threads, busy = _auto_count(None)
        log.info("threads: %d (%d cores this process may use, %.1f kept busy by other processes)", threads,
                 cpu_cores(), busy)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def adapt_threads(every: float = CHECK_SECONDS) -> int:
    """With auto threads, at most once per `every` seconds: follow the other processes' load (call it from a stage's
    loop, on the thread that runs the model). Returns the threads in use."""
    last = _AutoThreads.sample
    if not _AutoThreads.enabled or last is None or time.monotonic() - last.at < every:
        return torch.get_num_threads()
    threads, busy = _auto_count(last)
    if threads != torch.get_num_threads():
        log.info("threads: %d -> %d (other processes kept %.1f of %d cores busy)", torch.get_num_threads(), threads,
                 busy, len(last.ticks))
        torch.set_num_threads(threads)
    return threads


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed (0, 1 outside it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
